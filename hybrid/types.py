"""The data contracts between a robot and the planner: what comes in, what a plan holds.

Observation   images {camera key: (H, W, 3) uint8}, state (state_dim,) float, in robot units;
              scene (E,) float or None: privileged object and goal positions (diagnosis only)
Plan          subgoal text, K candidate visual subgoals (latents and images) with their scores,
              the chosen index, the action chunk (H, action_dim) in robot units, per-tier ms
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Observation:
    """One time step from a robot: upright RGB camera frames and proprioceptive state. `scene`
    is the simulator's privileged state (its `scene_state`: object and goal positions), given
    only to measure a policy trained to read it (`hybrid eval --privileged-scene`); a robot
    has none."""

    images: dict[str, np.ndarray]
    state: np.ndarray
    scene: np.ndarray | None = None


@dataclass
class Plan:
    """What `HybridPlanner.plan` decided, tier by tier.

    candidate_latents (K, C, h, w), candidate_images (K, S, S, 3) uint8 and scores (K,) are
    empty (K = 0) on a chunk where nothing was imagined, and candidate_images also when the planner
    does not decode them all; chosen_image (S, S, 3) uint8 is the chosen visual subgoal as an
    image where the planner decodes it, else None; actions (H, action_dim) are in the robot's
    units, clipped to its limits. subgoal_refreshed says whether this plan set a new language
    subgoal, and target_reached whether it did so because the frame had reached the last
    subgoal's visual target (`RefreshSchedule.reached_fraction`), not at the time-out.
    """

    subgoal: str
    candidate_latents: np.ndarray
    candidate_images: np.ndarray
    scores: np.ndarray
    chosen: int
    actions: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)
    subgoal_refreshed: bool = False
    target_reached: bool = False
    chosen_image: np.ndarray | None = None
