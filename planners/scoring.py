"""Scoring K candidate visual subgoals and choosing one (best-of-K).

The default scorer is the world model's value head: the predicted task progress of each imagined
future under the instruction. A scorer is any callable (latents (B, K, C, h, w), features (B, L, D),
mask (B, L)) -> scores (B, K); higher is better.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from experts.world_model import WorldModel

Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ValueScorer:
    """Predicted progress of each candidate, from the world model's value head."""

    def __init__(self, world_model: WorldModel):
        self.world_model = world_model

    def __call__(self, latents, features, mask) -> torch.Tensor:
        return self.world_model.score(latents, features, mask)


def best_of_k(scores: torch.Tensor) -> torch.Tensor:
    """Index of the best candidate per sample: scores (B, K) -> (B,)."""
    return scores.argmax(dim=-1)
