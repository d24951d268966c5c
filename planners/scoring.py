"""Choosing one of K imagined candidate visual subgoals.

candidates (B, K, C, h, w) and their scores (B, K) -> the chosen index per sample (B,).
The scores are the world model's value head's (`HybridPolicy.imagine`): the predicted task
progress of each imagined future under the instruction, higher is better. The value head trains
on real futures and ranks imagined ones, so it can favour a candidate that no real episode would
reach; the candidates' consensus is a second judge, with no scorer at all:

- "value": the best score (best-of-K);
- "medoid": the candidate nearest the other K - 1 (least summed latent distance), the most
  typical future the world model imagines;
- "central": the best score among the ceil(K / 2) candidates nearest the others, so that progress
  is weighed only among the likely futures.
"""

from __future__ import annotations

import torch

CHOICES = ("value", "medoid", "central")


def best_of_k(scores: torch.Tensor) -> torch.Tensor:
    """Index of the best candidate per sample: scores (B, K) -> (B,)."""
    return scores.argmax(dim=-1)


def centrality(candidates: torch.Tensor) -> torch.Tensor:
    """Each candidate's summed distance to the others, lower is more typical: (B, K, C, h, w) ->
    (B, K)."""
    flat = candidates.flatten(2).float()
    return torch.cdist(flat, flat).sum(-1)


def choose(rule: str, candidates: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The chosen candidate per sample under `rule` (one of CHOICES):
    candidates (B, K, C, h, w), scores (B, K) -> (B,)."""
    if rule == "value":
        return best_of_k(scores)
    if rule not in CHOICES:
        raise ValueError(f"unknown candidate choice {rule!r}; choose one of {CHOICES}")
    apart = centrality(candidates)
    if rule == "medoid":
        return apart.argmin(dim=-1)
    keep = apart.topk(-(-apart.shape[-1] // 2), dim=-1, largest=False).indices  # (B, ceil(K/2))
    return keep.gather(-1, best_of_k(scores.gather(-1, keep))[:, None])[:, 0]
