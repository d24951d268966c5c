"""Each training frame's VAE latent, encoded once while the VAE is frozen.

Every training step encodes the batch's current and future frames with the world model's VAE,
for the world model's flow, the value head and the action expert's visual subgoal. While the
VAE trains, those latents change with it; once it is frozen (a pretrained VAE, the tiny one
after `model.vae_steps`, or a fine-tune's shared base) they do not, so each frame is encoded
the first time a batch holds it and looked up afterwards, by its episode and frame index:

    images (B, N, 3, S, S), episode (B,), frame (B,)  ->  latents (B, C, h, w)

At the quickstart's size a step after the freeze costs about 0.78 of one before it on the 2-core
CPU (README, "Training").
The cache lives in memory, one latent per frame (C x h x w floats: 1 KiB for the quickstart's
4 x 8 x 8), and is filled again after a resume; it must be dropped if the VAE's weights change.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class LatentCache:
    """See the module docstring. `encode` maps images (M, N, 3, S, S) to latents (M, C, h, w)."""

    def __init__(self) -> None:
        self._latents: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._latents)

    @torch.no_grad()
    def __call__(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        episode: torch.Tensor,
        frame: torch.Tensor,
    ) -> torch.Tensor:
        keys = list(zip(episode.tolist(), frame.tolist(), strict=True))
        first: dict[tuple[int, int], int] = {}  # each missing frame once, from its first row
        for row, key in enumerate(keys):
            if key not in self._latents:
                first.setdefault(key, row)
        if first:
            new = encode(images[list(first.values())])
            for key, latent in zip(first, new, strict=True):
                self._latents[key] = latent.clone()
        return torch.stack([self._latents[key] for key in keys])
