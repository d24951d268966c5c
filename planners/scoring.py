"""Choosing one of K scored candidate visual subgoals (best-of-K).

The scores are the world model's value head's (`HybridPolicy.imagine`): the predicted task
progress of each imagined future under the instruction, higher is better.
"""

from __future__ import annotations

import torch


def best_of_k(scores: torch.Tensor) -> torch.Tensor:
    """Index of the best candidate per sample: scores (B, K) -> (B,)."""
    return scores.argmax(dim=-1)
