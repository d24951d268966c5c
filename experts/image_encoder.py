"""The action expert's own eyes: camera frames -> spatial tokens, from a small strided CNN trained
by the action loss alone (the VLM's features are insulated, so they cannot learn where the
gripper and the object are for the actions' sake).

    images (B, N, 3, S, S) in [0, 1]  ->  tokens (B, N * g * g, hidden),  g = S / 2**len(channels)

`random_shift` is the augmentation that keeps such an encoder from memorising pixel positions on
a few demonstrations (pad by replication, crop back at a random offset; Kostrikov et al. 2020).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator | None = None):
    """Each image of (B, N, 3, S, S) shifted by its own random offset in [-pad, pad] pixels per
    axis; borders repeat the edge pixels. pad 0 returns the images unchanged."""
    if pad <= 0:
        return images
    b, n, c, h, w = images.shape
    x = F.pad(rearrange(images, "b n c h w -> (b n) c h w"), (pad,) * 4, mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b * n), generator=generator).tolist()
    crops = [x[i, :, y : y + h, z : z + w] for i, (y, z) in enumerate(zip(dy, dx, strict=True))]
    return rearrange(torch.stack(crops), "(b n) c h w -> b n c h w", b=b)


class ImageEncoder(nn.Module):
    """See the module docstring. Each stage halves the side (3x3 convolution, stride 2, group
    norm, SiLU); a learned position embedding per camera and grid cell follows the projection.
    A robot with fewer cameras than `num_cameras` (one added by `hybrid finetune`) uses the
    first ones' embeddings."""

    def __init__(
        self,
        hidden: int,
        image_size: int,
        num_cameras: int = 1,
        channels: tuple[int, ...] = (32, 64, 128),
    ):
        super().__init__()
        if image_size % 2 ** len(channels):
            raise ValueError(
                f"image_size {image_size} must be divisible by 2**{len(channels)} "
                f"(one halving per entry of channels {list(channels)})"
            )
        layers, width = [], 3
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, stride=2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            width = c
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Linear(width, hidden)
        self.image_size, self.num_cameras = image_size, num_cameras
        grid = image_size // 2 ** len(channels)
        self.pos = nn.Parameter(torch.randn(1, num_cameras * grid * grid, hidden) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if (
            images.dim() != 5
            or not 1 <= images.shape[1] <= self.num_cameras
            or images.shape[2] != 3
        ):
            raise ValueError(
                f"images must be (B, N, 3, S, S) with 1 <= N <= {self.num_cameras} cameras, "
                f"got {tuple(images.shape)}"
            )
        b = images.shape[0]
        x = rearrange(images, "b n c h w -> (b n) c h w")
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="area")
        x = self.stem(x * 2 - 1)  # (B * N, C, g, g)
        tokens = rearrange(x, "(b n) c h w -> b (n h w) c", b=b)
        return self.proj(tokens) + self.pos[:, : tokens.shape[1]]  # a robot may have fewer cameras
