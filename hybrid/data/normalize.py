"""Normalisation of state and action vectors from a dataset's `meta/stats.json`.

Lives outside the models: data is normalised on the way in and actions unnormalised on the way out,
so a policy directory carries its statistics and the experts only ever see normalised values.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Mode = Literal["mean_std", "min_max", "identity"]
EPS = 1e-6


class Normalizer:
    """Maps a feature to zero mean / unit std (`mean_std`) or to [-1, 1] (`min_max`) and back.

    `stats` is {feature: {"mean", "std", "min", "max": (D,)}}; works on numpy arrays and tensors
    of shape (..., D).
    """

    def __init__(self, stats: dict[str, dict[str, np.ndarray]], modes: dict[str, Mode]):
        self.modes = dict(modes)
        self.params: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key, mode in self.modes.items():
            if mode == "identity":
                continue
            if key not in stats:
                raise ValueError(f"no statistics for {key!r}; stats hold {sorted(stats)}")
            s = stats[key]
            if mode == "mean_std":
                shift, scale = s["mean"], s["std"]
            elif mode == "min_max":
                shift, scale = (s["max"] + s["min"]) / 2, (s["max"] - s["min"]) / 2
            else:
                raise ValueError(f"unknown normalisation mode {mode!r} for {key!r}")
            self.params[key] = (
                np.asarray(shift, np.float32),
                np.maximum(np.asarray(scale, np.float32), EPS),
            )

    def _get(self, key: str, like):
        shift, scale = self.params[key]
        if isinstance(like, torch.Tensor):
            return torch.as_tensor(shift, device=like.device), torch.as_tensor(
                scale, device=like.device
            )
        return shift, scale

    def normalize(self, key: str, x):
        if key not in self.params:
            return x
        shift, scale = self._get(key, x)
        return (x - shift) / scale

    def deviation(self, key: str, x: np.ndarray) -> float:
        """The largest |normalised value| of x (..., D) over the dimensions that vary in the data
        (a constant one has no scale to measure by); 0 for an `identity` feature."""
        if key not in self.params:
            return 0.0
        varies = self.params[key][1] > EPS
        return float(np.abs(self.normalize(key, x))[..., varies].max(initial=0.0))

    def unnormalize(self, key: str, x):
        if key not in self.params:
            return x
        shift, scale = self._get(key, x)
        return x * scale + shift
