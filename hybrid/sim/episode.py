"""One rendered scripted-expert rollout, as every simulator adapter returns it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Episode:
    """T steps of a rollout: images (T, S, S, 3) uint8, state (T, state_dim) float32, actions
    (T, action_dim) float32 as executed, phases (T,) int indexing the task's subgoal list."""

    task: str
    seed: int
    success: bool
    images: np.ndarray
    state: np.ndarray
    actions: np.ndarray
    phases: np.ndarray
