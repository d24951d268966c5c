"""One rendered scripted-expert rollout, as every simulator adapter returns it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Episode:
    """T steps of a rollout: images, camera name -> (T, S, S, 3) uint8; state (T, state_dim)
    float32; actions (T, action_dim) float32, the expert's at each step (executed as they are,
    unless the rollout injects `action_noise`, which is never stored); phases (T,) int indexing
    the task's subgoal list; scene (T, E) float32, the simulator's object and goal positions
    (privileged: recorded as a training target, never given to a policy)."""

    task: str
    seed: int
    success: bool
    images: dict[str, np.ndarray]
    state: np.ndarray
    actions: np.ndarray
    phases: np.ndarray
    scene: np.ndarray


NOISE_STEPS = 5  # correlation time of the injected action noise, in steps


def record_rollout(
    env,
    seed: int,
    act: Callable[[object], tuple[np.ndarray, int]],
    state_of: Callable[[object], np.ndarray],
    scene_of: Callable[[object], np.ndarray],
    max_steps: int,
    action_noise: float = 0.0,
    **reset_options,
) -> Episode:
    """Roll out `act(obs) -> (action, phase)` in `env` from the configuration chosen by `seed`
    (and `reset_options`, the simulator's own), rendering every step, until success or
    `max_steps`; `state_of(obs)` is the robot's state, `scene_of(obs)` the scene's.

    With `action_noise` > 0 the executed action is the expert's plus noise on its first three
    dims (the position deltas of both robots; never the gripper), while the expert's own action
    is what is stored: the hand wanders off the expert's path and the labels say how to come
    back (DART, Laskey et al. 2017). Demonstrations of straight paths from one start pose let a
    policy act from the step count alone; these make what it sees decide the action. The noise is
    an Ornstein-Uhlenbeck process of standard deviation `action_noise` (in action units) and a
    correlation time of `NOISE_STEPS`, drawn from `seed`'s own stream."""
    if action_noise < 0:
        raise ValueError(f"action_noise must be >= 0, got {action_noise}")
    rng = np.random.default_rng([seed, 2])
    keep = np.exp(-1.0 / NOISE_STEPS)
    noise = np.zeros(3)
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
        executed = action
        if action_noise:
            noise = keep * noise + np.sqrt(1 - keep**2) * action_noise * rng.standard_normal(3)
            executed = action.copy()
            executed[:3] = np.clip(action[:3] + noise, -1.0, 1.0)
        obs, success = env.step(executed)
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
