"""panda-gym adapter: a Franka Panda in PyBullet, rendered by PyBullet's CPU TinyRenderer (no GL),
with our own scripted experts labelled with language subgoals.

The second embodiment differs from the Meta-World Sawyer in robot, visuals, state layout and
action scaling. Every task builds the same robot (gripper free), so the embodiment is one:
    state (T, 7) float32: end-effector xyz, end-effector velocity xyz, finger width
    actions (T, 4) float32 in [-1, 1]: end-effector displacement (x 0.05 m per step), finger
        width change (x 0.2)
    images (T, S, S, 3) uint8       phases (T,) int: index into the task's subgoal list
Object and goal positions only drive the experts and the phase labels; they never enter the state.
Every episode starts the gripper at its own place in `START_BOX`, drawn from the episode's seed
(panda-gym itself always starts from one pose, which makes reaching a few-step memorised move).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np
import yaml

from hybrid.sim import camera_names, expand_tasks, simulated_robot
from hybrid.sim.episode import Episode, record_rollout

ROBOT_TYPE = "panda"
FPS = 25  # 20 PyBullet substeps of 2 ms per step
STATE_NAMES = ["ee_x", "ee_y", "ee_z", "ee_vx", "ee_vy", "ee_vz", "finger_width"]
ACTION_NAMES = ["dx", "dy", "dz", "grip"]
MAX_EPISODE_STEPS = 100
DEFAULT_CAMERA = "front"
DEFAULT_CAMERAS = (DEFAULT_CAMERA,)  # what `hybrid collect panda` records
# Named viewpoints: PyBullet yaw/pitch/distance around a target point on the table.
CAMERAS = {
    # close enough that the 4 cm cube and target span ~4 px at 64 px
    "front": {"target": (0.0, 0.0, 0.05), "distance": 0.45, "yaw": 90.0, "pitch": -50.0},
    "side": {"target": (0.0, 0.0, 0.05), "distance": 0.6, "yaw": 0.0, "pitch": -30.0},
    "top": {"target": (0.0, 0.0, 0.0), "distance": 0.6, "yaw": 90.0, "pitch": -89.0},
}


def camera_info(camera: str) -> dict:
    """How `camera` is placed, as recorded with its video feature in the dataset's info.json."""
    return {"camera.name": camera, **{f"camera.{k}": v for k, v in CAMERAS[camera].items()}}


TARGET_RGBA = (0.9, 0.1, 0.1, 1.0)  # panda-gym draws cube and target in the same green
PRESETS = {"all": ("reach", "push", "pick-and-place")}

EMBODIMENT = simulated_robot(ROBOT_TYPE, STATE_NAMES, ACTION_NAMES, DEFAULT_CAMERAS)

# where an episode's gripper starts (metres, world frame; the table top is z = 0): above the
# objects, within the tasks' goal area
START_BOX = (np.array([-0.15, -0.15, 0.1]), np.array([0.15, 0.15, 0.3]))
STEP_M = 0.05  # metres of end-effector displacement per unit action
EXPERT_SPEED = 0.25  # a quarter of the top speed: smooth demonstrations, long enough to learn from
OPEN, CLOSE = 1.0, -1.0


@dataclass(frozen=True)
class TaskLanguage:
    instruction: str
    subgoals: tuple[str, ...]


@cache
def task_language() -> dict[str, TaskLanguage]:
    """The table in `panda_tasks.yaml`, keyed by task name."""
    text = resources.files(__package__).joinpath("panda_tasks.yaml").read_text()
    return {
        name: TaskLanguage(entry["instruction"], tuple(entry["subgoals"]))
        for name, entry in yaml.safe_load(text).items()
    }


def resolve_tasks(names: list[str]) -> list[str]:
    """Expand the `all` preset and check every name against the language table."""
    return expand_tasks(names, task_language(), PRESETS, "panda")


# The scene: the object (the end-effector in `reach`, which has none) and the goal.
SCENE_NAMES = [f"{point}_{axis}" for point in ("object", "goal") for axis in "xyz"]


def scene_state(obs: dict) -> np.ndarray:
    """Object and goal positions, (6,) float32: the dataset's `observation.environment_state`."""
    return np.concatenate([obs["achieved_goal"], obs["desired_goal"]]).astype(np.float32)


def policy_state(obs: dict) -> np.ndarray:
    """The robot's own 7 numbers (see the module docstring) from a panda-gym observation."""
    return obs["observation"][:7].astype(np.float32)


class PandaEnv:
    """One panda-gym task with the Panda's gripper free and one or more named cameras."""

    def __init__(
        self,
        task: str,
        camera: str | tuple[str, ...] = DEFAULT_CAMERA,
        image_size: int = 96,
        seed: int = 0,
    ):
        resolve_tasks([task])
        self.cameras = camera_names(camera, CAMERAS, "panda")
        self.task, self.image_size = task, image_size
        # PyBullet prints its build time on import (stderr) and its renderer arguments (stdout)
        with _quiet_c_output():
            from panda_gym.envs.core import RobotTaskEnv
            from panda_gym.envs.robots.panda import Panda
            from panda_gym.envs.tasks.pick_and_place import PickAndPlace
            from panda_gym.envs.tasks.push import Push
            from panda_gym.envs.tasks.reach import Reach
            from panda_gym.pybullet import PyBullet

            sim = PyBullet(render_mode="rgb_array", renderer="Tiny")
        robot = Panda(sim, block_gripper=False, base_position=np.array([-0.6, 0.0, 0.0]))
        tasks = {
            "reach": lambda: Reach(sim, get_ee_position=robot.get_ee_position),
            "push": lambda: Push(sim),
            "pick-and-place": lambda: PickAndPlace(sim, goal_z_range=0.15),
        }
        task_model = tasks[task]()
        sim.physics_client.changeVisualShape(sim._bodies_idx["target"], -1, rgbaColor=TARGET_RGBA)
        self.env = RobotTaskEnv(robot, task_model)

    def reset(self, seed: int) -> dict:
        """The task configuration of `seed`, with the gripper moved to a start drawn from it."""
        self.env.reset(seed=seed)
        robot = self.env.robot
        # a stream of its own: default_rng(seed) would repeat the draws of the task's goal
        start = np.random.default_rng([seed, 1]).uniform(*START_BOX)
        down = np.array([1.0, 0.0, 0.0, 0.0])  # the gripper pointing at the table, as in its steps
        arm = robot.inverse_kinematics(link=robot.ee_link, position=start, orientation=down)[:7]
        robot.set_joint_angles(np.concatenate([arm, robot.neutral_joint_values[7:]]))
        return self.env._get_obs()  # panda-gym's own observation assembly, after the move

    def step(self, action: np.ndarray) -> tuple[dict, bool]:
        """Returns (observation, success)."""
        obs, _, _, _, info = self.env.step(np.asarray(action, np.float32))
        return obs, bool(info["is_success"])

    def render(self) -> dict[str, np.ndarray]:
        """Each camera's frame: name -> (S, S, 3) uint8."""
        frames = {}
        for name in self.cameras:
            view = CAMERAS[name]
            frame = self.env.sim.render(
                width=self.image_size,
                height=self.image_size,
                target_position=np.asarray(view["target"]),
                distance=view["distance"],
                yaw=view["yaw"],
                pitch=view["pitch"],
            )
            frame = np.asarray(frame)[..., :3]
            if not frame.any():
                raise RuntimeError(f"PyBullet rendered an all-black frame for panda {self.task}")
            frames[name] = np.ascontiguousarray(frame, dtype=np.uint8)
        return frames

    def close(self) -> None:
        self.env.close()


make_env = PandaEnv


@contextmanager
def _quiet_c_output():
    """Silence writes to file descriptors 1 and 2 from C, which Python's redirection does not
    reach. Python exceptions still propagate (and print) as usual."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    try:
        with open(os.devnull, "w") as devnull:
            for fd in (1, 2):
                os.dup2(devnull.fileno(), fd)
            yield
    finally:
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def _towards(ee: np.ndarray, target: np.ndarray, grip: float) -> np.ndarray:
    """A proportional step to `target`, at most one unit (STEP_M metres) per axis."""
    move = np.clip((target - ee) / STEP_M, -EXPERT_SPEED, EXPERT_SPEED)
    return np.append(move, grip).astype(np.float32)


class ScriptedExpert:
    """Phase-based controller for one task. `act(obs)` -> (action (4,), phase); phases only move
    forward. It reads object and goal positions (privileged), which is fine for a demonstrator."""

    def __init__(self, task: str):
        self.task = task
        self.phase = 0
        self.closing = 0

    def act(self, obs: dict) -> tuple[np.ndarray, int]:
        ee, width = obs["observation"][:3], obs["observation"][6]
        goal = obs["desired_goal"]
        if self.task == "reach":
            return _towards(ee, goal, OPEN), 0
        cube = obs["observation"][7:10]
        if self.task == "push":
            direction = goal[:2] - cube[:2]
            direction = direction / max(np.linalg.norm(direction), 1e-6)
            behind = np.append(cube[:2] - 0.06 * direction, cube[2])
            if self.phase == 0 and np.linalg.norm(ee[:2] - behind[:2]) < 0.01:
                self.phase = 1
            if self.phase == 1 and abs(ee[2] - behind[2]) < 0.01:
                self.phase = 2
            if self.phase == 0:
                return _towards(ee, behind + [0, 0, 0.06], CLOSE), 0
            if self.phase == 1:
                return _towards(ee, behind, CLOSE), 1
            # stay on the cube's far side from the goal (re-aimed every step) while moving on
            contact = np.append(cube[:2] - 0.035 * direction, cube[2])
            move = 0.5 * (contact - ee) / STEP_M + 0.3 * np.append(direction, 0.0)
            move = np.clip(move, -EXPERT_SPEED, EXPERT_SPEED)
            return np.append(move, CLOSE).astype(np.float32), 2
        # pick-and-place
        if self.phase == 0 and np.linalg.norm(ee[:2] - cube[:2]) < 0.01:
            self.phase = 1
        if self.phase == 1 and np.linalg.norm(ee - cube) < 0.01:
            self.phase = 2
        if self.phase == 2:
            self.closing += 1
            if width < 0.045 or self.closing > 8:
                self.phase = 3
        if self.phase == 0:
            return _towards(ee, cube + [0, 0, 0.08], OPEN), 0
        if self.phase == 1:
            return _towards(ee, cube, OPEN), 1
        if self.phase == 2:
            return np.array([0, 0, 0, CLOSE], np.float32), 2
        return _towards(ee, goal, CLOSE), 3


def rollout_expert(
    env: PandaEnv, seed: int, max_steps: int = MAX_EPISODE_STEPS, action_noise: float = 0.0
) -> Episode:
    """Run the scripted expert from the configuration chosen by `seed` until success or time out;
    `action_noise` as in `record_rollout`."""
    return record_rollout(
        env, seed, ScriptedExpert(env.task).act, policy_state, scene_state, max_steps, action_noise
    )
