"""Per-embodiment layers: one weight row per robot, picked per sample.

Robots differ in state and action dimensions. Vectors are zero-padded to `max_dim`; each robot
owns a slice of an indexed weight tensor, `W[embodiment_ids]`, so one batch may mix robots and a
new robot adds a row, not a model.
"""

from __future__ import annotations

import torch
from torch import nn


class EmbodimentLinear(nn.Module):
    """x (B, ..., in_dim) and embodiment_ids (B,) -> (B, ..., out_dim) with per-robot weights."""

    def __init__(self, num_embodiments: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embodiments, out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(num_embodiments, out_dim))
        for row in self.weight:
            nn.init.kaiming_uniform_(row, a=5**0.5)  # nn.Linear's initialisation, per robot

    def add_row(self) -> None:
        """One more robot: its row starts as the mean of the existing rows (the robots' shared
        layout: xyz first, gripper last, is the best guess for a new one)."""
        self.weight = nn.Parameter(torch.cat([self.weight.data, self.weight.data.mean(0)[None]]))
        self.bias = nn.Parameter(torch.cat([self.bias.data, self.bias.data.mean(0)[None]]))

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these robots' rows, in this order."""
        self.weight = nn.Parameter(self.weight.data[rows].clone())
        self.bias = nn.Parameter(self.bias.data[rows].clone())

    def forward(self, x: torch.Tensor, embodiment_ids: torch.Tensor) -> torch.Tensor:
        weight, bias = (
            self.weight[embodiment_ids],
            self.bias[embodiment_ids],
        )  # (B, out, in), (B, out)
        extra = [1] * (x.dim() - 2)
        y = torch.einsum("b...i,boi->b...o", x, weight)
        return y + bias.reshape(bias.shape[0], *extra, bias.shape[1])


class StateEncoder(nn.Module):
    """Proprio state (B, max_state_dim), zero-padded -> one token (B, 1, hidden)."""

    def __init__(self, num_embodiments: int, max_state_dim: int, hidden: int):
        super().__init__()
        self.proj = EmbodimentLinear(num_embodiments, max_state_dim, hidden)
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, state: torch.Tensor, embodiment_ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(state, embodiment_ids)).unsqueeze(1)
