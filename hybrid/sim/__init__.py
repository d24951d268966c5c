"""Simulator adapters: environments, scripted experts and their language annotations.

Each adapter module offers the same names, so collection and evaluation take any of them:
    ROBOT_TYPE, FPS, STATE_NAMES, ACTION_NAMES, CAMERAS, DEFAULT_CAMERAS, EMBODIMENT
    task_language()[task].instruction / .subgoals, resolve_tasks(names)
    make_env(task, cameras, image_size, seed) -> env with reset(seed), step(action) ->
        (obs, success), render() -> {camera: (S, S, 3) uint8}, close()
    policy_state(obs) -> the robot's state vector, rollout_expert(env, seed) -> Episode
    camera_info(camera) -> how the camera is placed (stored in the dataset's info.json)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from hybrid.embodiment import EmbodimentSpec

SIMULATORS = {"metaworld": "sawyer", "panda": "panda"}  # simulator -> the robot it simulates


def simulator(name: str) -> ModuleType:
    """The adapter module of a simulator by name."""
    if name not in SIMULATORS:
        raise ValueError(f"unknown simulator {name!r}; valid: {', '.join(SIMULATORS)}")
    return importlib.import_module(f"hybrid.sim.{name}")


def simulator_for(embodiment: str) -> ModuleType:
    """The adapter module that simulates a robot (`sawyer` -> Meta-World, `panda` -> panda-gym)."""
    for name, robot in SIMULATORS.items():
        if robot == embodiment:
            return simulator(name)
    raise ValueError(
        f"no simulator for embodiment {embodiment!r}; simulated robots: "
        f"{', '.join(f'{r} ({s})' for s, r in SIMULATORS.items())}"
    )


def simulated_robot(
    name: str, state_names: list[str], action_names: list[str], cameras: tuple[str, ...]
) -> EmbodimentSpec:
    """The spec of a simulated robot: its adapter scales every action dim to [-1, 1]."""
    return EmbodimentSpec(
        name=name,
        state_dim=len(state_names),
        action_dim=len(action_names),
        action_low=[-1.0] * len(action_names),
        action_high=[1.0] * len(action_names),
        cameras=[f"observation.images.{camera}" for camera in cameras],
    )


def camera_names(camera, known, simulator_label: str) -> tuple[str, ...]:
    """One camera name or several as a tuple, each checked against `known` (an unknown one is
    named with the valid ones)."""
    names = (camera,) if isinstance(camera, str) else tuple(camera)
    for name in names:
        if name not in known:
            raise ValueError(
                f"unknown {simulator_label} camera {name!r}; valid: {', '.join(known)}"
            )
    return names


def expand_tasks(
    names: list[str], known, presets: dict, simulator_label: str, hint: str = ""
) -> list[str]:
    """Expand preset names and check every task against `known` (the language table); order
    kept, duplicates dropped. An unknown name is named with the valid ones (and `hint`)."""
    tasks: list[str] = []
    for name in names:
        for task in presets.get(name, (name,)):
            if task not in known:
                raise ValueError(
                    f"unknown {simulator_label} task {task!r}; valid tasks: "
                    f"{', '.join(sorted(known))}; presets: {', '.join(presets)}{hint}"
                )
            if task not in tasks:
                tasks.append(task)
    return tasks
