"""When each tier of the hierarchy runs again; everything not rerun is reused from the cache.

The action expert runs every chunk. A language subgoal is kept for `max_chunks_per_subgoal`
chunks. It also comes with a visual target, the candidate future chosen when it was set, and with
`reached_fraction` set the subgoal ends early once that target is *reached*: the current frame's
latent has closed at least `1 - reached_fraction` of its distance to the target
(d(now, target) <= reached_fraction * d(then, target)). A robot that stalls keeps its subgoal
until the time-out; one that gets where it imagined moves on at once. The check encodes the
current frame on every chunk, so it is opt-in (`reached_fraction` None, the default, is the
time-out alone): on the quickstart's policies it fired on 3 of 1,385 chunks, because an imagined
future there lies about as far from the frame that comes as the current frame does (README,
"Planning"). The rule reads only latents, so it runs the same in every ablation mode (K = 1, no
language subgoal, flat). The visual subgoal the action expert reads is imagined only with each
new language subgoal (`visual="subgoal"`, the default: the future chosen as the subgoal's target
is what the action expert acts towards while the subgoal stands) or again every chunk
(`visual="chunk"`, so it is always `future_offset` steps ahead of the frame, as in training). The
VLM's prefix features, which the world model and the action expert read, are computed only with
each new language subgoal (`features="subgoal"`, the default: the VLM runs at the subgoal's rate,
a slow tier above a fast one, and the chunks between reuse the features of the frame where the
subgoal was set) or again every chunk (`features="chunk"`, from the current frame, as in
training). The defaults plan a chunk at about the flat path's cost; on the quickstart's policy,
200 episodes paired, they succeeded as often as every tier on every chunk (README, "Inference
cost"). A flat VLA (neither subgoal) has no subgoal rate: its VLM runs every chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


def latent_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square distance of latents (B, C, h, w) -> (B,)."""
    return (a - b).square().flatten(1).mean(1).sqrt()


@dataclass(frozen=True)
class RefreshSchedule:
    max_chunks_per_subgoal: int = 4
    visual: Literal["subgoal", "chunk"] = "subgoal"
    reached_fraction: float | None = None
    features: Literal["subgoal", "chunk"] = "subgoal"

    def __post_init__(self):
        if self.max_chunks_per_subgoal < 1:
            raise ValueError(
                f"max_chunks_per_subgoal must be >= 1, got {self.max_chunks_per_subgoal}"
            )
        for tier, rate in (("visual", self.visual), ("features", self.features)):
            if rate not in ("subgoal", "chunk"):
                raise ValueError(f"{tier} must be 'subgoal' or 'chunk', got {rate!r}")
        if self.reached_fraction is not None and not 0.0 < self.reached_fraction < 1.0:
            raise ValueError(
                f"reached_fraction must be in (0, 1), or None for the time-out alone, got "
                f"{self.reached_fraction}"
            )

    @property
    def checks_reached(self) -> bool:
        """Whether a subgoal ends when its visual target is reached, not only at the time-out."""
        return self.reached_fraction is not None

    def reached(self, distance_now: float, distance_at_start: float) -> bool:
        """Whether the frame is now close enough to the subgoal's visual target (never, where the
        rule is off)."""
        return self.checks_reached and distance_now <= self.reached_fraction * distance_at_start

    def subgoal_due(self, chunks_since: int | None, reached: bool) -> bool:
        """chunks_since is None before the first plan of an episode."""
        return chunks_since is None or chunks_since >= self.max_chunks_per_subgoal or reached

    def visual_due(self, subgoal_refreshed: bool) -> bool:
        return subgoal_refreshed or self.visual == "chunk"

    def features_due(self, subgoal_refreshed: bool) -> bool:
        return subgoal_refreshed or self.features == "chunk"
