"""One rendered scripted-expert rollout, as every simulator adapter returns it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Episode:
    """T steps of a rollout: images, camera name -> (T, S, S, 3) uint8; state (T, state_dim)
    float32; actions (T, action_dim) float32 as executed; phases (T,) int indexing the task's
    subgoal list; scene (T, E) float32, the simulator's object and goal positions (privileged:
    recorded as a training target, never given to a policy)."""

    task: str
    seed: int
    success: bool
    images: dict[str, np.ndarray]
    state: np.ndarray
    actions: np.ndarray
    phases: np.ndarray
    scene: np.ndarray


def record_rollout(
    env,
    seed: int,
    act: Callable[[object], tuple[np.ndarray, int]],
    state_of: Callable[[object], np.ndarray],
    scene_of: Callable[[object], np.ndarray],
    max_steps: int,
    **reset_options,
) -> Episode:
    """Roll out `act(obs) -> (action, phase)` in `env` from the configuration chosen by `seed`
    (and `reset_options`, the simulator's own), rendering every step, until success or
    `max_steps`; `state_of(obs)` is the robot's state, `scene_of(obs)` the scene's."""
    obs = env.reset(seed, **reset_options)
    images: dict[str, list[np.ndarray]] = {}
    state, actions, phases, scene = [], [], [], []
    success = False
    for _ in range(max_steps):
        action, phase = act(obs)
        for camera, frame in env.render().items():
            images.setdefault(camera, []).append(frame)
        state.append(state_of(obs))
        scene.append(scene_of(obs))
        actions.append(action)
        phases.append(phase)
        obs, success = env.step(action)
        if success:
            break
    return Episode(
        task=env.task,
        seed=seed,
        success=success,
        images={camera: np.stack(frames) for camera, frames in images.items()},
        state=np.stack(state),
        actions=np.stack(actions),
        phases=np.asarray(phases, np.int64),
        scene=np.stack(scene).astype(np.float32),
    )
