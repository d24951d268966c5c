"""Meta-World adapter: env factory with fast upright offscreen rendering, and the scripted experts
labelled with language subgoals.

One episode of a scripted expert yields, per step t (T steps until success or the time limit):
    images (T, S, S, 3) uint8, upright    state (T, 4) float32: end-effector xyz + gripper opening
    actions (T, 4) float32 in [-1, 1]      phases (T,) int: index into the task's subgoal list
The simulator's privileged observations (object and goal positions) only drive the phase labels;
they never enter the stored state.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from hybrid.sim import camera_names, expand_tasks, simulated_robot
from hybrid.sim.episode import Episode, record_rollout

ROBOT_TYPE = "sawyer"
FPS = 80  # Meta-World steps at dt = 0.0125 s
STATE_NAMES = ["ee_x", "ee_y", "ee_z", "gripper"]
ACTION_NAMES = ["dx", "dy", "dz", "grip"]
MAX_EPISODE_STEPS = 500
# Our own cameras, placed over the workspace: name -> (position, point looked at, vertical field
# of view in degrees), in world metres. Meta-World's stock views see the table from afar: at 64 px
# the push puck covers ~4 pixels from `corner`, ~14 from `front` (28 at 96 px), and its goal
# marker ~1 against ~12. `front` faces the robot from across the table, so the gripper never hides
# the object it approaches. Each placement re-poses a stock camera (`_PLACED_SLOTS`) in this env's
# model, which then no longer offers that stock camera.
PLACED_CAMERAS = {
    "front": ((0.0, 1.25, 0.65), (0.0, 0.62, 0.08), 50.0),
    # from the robot's right: depth and height, which one view cannot tell apart (a goal in the
    # air, seen from `front` alone, could lie anywhere along its line of sight)
    "side": ((0.75, 0.68, 0.45), (0.0, 0.68, 0.1), 55.0),
    # from high above the far edge of the table, looking down at it: over a tall object (the
    # coffee machine) that hides what stands in front of it from `front`. Not recorded by
    # default: as a third camera it did not lift success (README, "five tasks outside MT10")
    "top": ((0.0, 1.0, 1.1), (0.0, 0.62, 0.0), 50.0),
}
# the stock cameras they re-pose
_PLACED_SLOTS = {"front": "corner2", "side": "corner3", "top": "corner4"}
DEFAULT_CAMERA = "front"
DEFAULT_CAMERAS = ("front", "side")  # what `hybrid collect metaworld` records
CAMERAS = (
    *PLACED_CAMERAS,
    "corner",
    "corner2",
    "corner3",
    "corner4",
    "topview",
    "behindGripper",
    "gripperPOV",
)
# These stock cameras render rotated by 180 degrees; flipping both image axes makes them upright.
ROTATED_CAMERAS = frozenset({"corner", "corner2", "corner3", "corner4"})
PRESETS = {
    "mt10": (
        "reach-v3",
        "push-v3",
        "pick-place-v3",
        "door-open-v3",
        "drawer-open-v3",
        "drawer-close-v3",
        "button-press-topdown-v3",
        "peg-insert-side-v3",
        "window-open-v3",
        "window-close-v3",
    ),
}

EMBODIMENT = simulated_robot(ROBOT_TYPE, STATE_NAMES, ACTION_NAMES, DEFAULT_CAMERAS)

# Observation layout of every Meta-World v3 task (39 dims).
_POINTS = {"hand": slice(0, 3), "object": slice(4, 7), "goal": slice(36, 39)}
_AXES = {"x": 0, "y": 1, "z": 2}


@dataclass(frozen=True)
class TaskLanguage:
    """The instruction of a task and the subgoal sentence and end condition of each expert phase."""

    instruction: str
    subgoals: tuple[str, ...]
    until: tuple[tuple[dict, ...], ...]  # conditions that end phase i; empty for the last phase


# A user's own task entries: YAML files in the table's format, named in this variable (several
# separated by os.pathsep), read after the package's table; an entry of the same name replaces
# the package's. `hybrid collect metaworld --task-file` and `hybrid eval --task-file` set it.
TASKS_ENV = "HYBRID_METAWORLD_TASKS"
_CONDITION_KEYS = {"dist", "diff", "gripper_below", "axes", "axis", "offset", "below"}


@cache
def task_language() -> dict[str, TaskLanguage]:
    """The table in `metaworld_tasks.yaml`, keyed by Meta-World task name, with the entries of
    the files named in $HYBRID_METAWORLD_TASKS over it."""
    package = resources.files(__package__).joinpath("metaworld_tasks.yaml")
    table = _parse_table(package.read_text(), "metaworld_tasks.yaml")
    for path in filter(None, os.environ.get(TASKS_ENV, "").split(os.pathsep)):
        try:
            text = Path(path).read_text()
        except OSError as error:
            raise OSError(f"task file {path}: {error.strerror or error}") from None
        table.update(_parse_table(text, path))
    return table


def use_task_files(paths: list[Path]) -> None:
    """Read the task entries of `paths` after the package's table, in this process and in the
    processes it starts (evaluation and collection workers)."""
    os.environ[TASKS_ENV] = os.pathsep.join(str(p) for p in paths)
    task_language.cache_clear()
    task_language()  # a bad file fails here, before any work


def _parse_table(text: str, source: str) -> dict[str, TaskLanguage]:
    """Task entries of one YAML file, each checked, so that a mistake is named with its file and
    entry before any rollout: `instruction`, and `phases` whose every one but the last ends on
    conditions the phase tracker knows."""
    try:
        entries = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"task file {source}: not YAML ({' '.join(str(error).split())})") from None
    if not isinstance(entries, dict):
        raise ValueError(f"task file {source}: expected task names mapped to entries")
    table = {}
    for name, entry in entries.items():
        where = f"task file {source}, task {name!r}"
        phases = entry.get("phases") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("instruction"), str):
            raise ValueError(f"{where}: expected `instruction: <sentence>` and `phases`")
        if not isinstance(phases, list) or not phases:
            raise ValueError(f"{where}: expected `phases`, a list of `subgoal:` entries")
        for i, phase in enumerate(phases):
            if not isinstance(phase, dict) or not isinstance(phase.get("subgoal"), str):
                raise ValueError(f"{where}, phase {i}: expected `subgoal: <sentence>`")
            until = phase.get("until", [])
            if i < len(phases) - 1 and not until:
                raise ValueError(f"{where}, phase {i}: only the last phase may lack `until`")
            for condition in until:
                _check_condition(condition, f"{where}, phase {i}")
        table[name] = TaskLanguage(
            instruction=entry["instruction"],
            subgoals=tuple(p["subgoal"] for p in phases),
            until=tuple(tuple(p.get("until", ())) for p in phases),
        )
    return table


def _check_condition(cond, where: str) -> None:
    """One `until` condition in a form `_condition_holds` reads (the table's header)."""
    kinds = set(cond) & {"dist", "diff", "gripper_below"} if isinstance(cond, dict) else set()
    unknown = set(cond) - _CONDITION_KEYS if isinstance(cond, dict) else set()
    if len(kinds) != 1 or unknown:
        raise ValueError(
            f"{where}: condition {cond!r}: expected one of dist, diff or gripper_below (keys: "
            f"{', '.join(sorted(_CONDITION_KEYS))})"
        )
    if "gripper_below" in cond:
        return
    points, offset = cond.get("dist", cond.get("diff")), cond.get("offset", [0, 0, 0])
    axes = cond.get("axes", "") if "dist" in cond else cond.get("axis", "")
    good = (
        isinstance(points, list)
        and len(points) == 2
        and all(p in _POINTS for p in points)
        and isinstance(axes, str)
        and axes != ""
        and set(axes) <= set(_AXES)
        and ("dist" in cond or len(axes) == 1)
        and isinstance(cond.get("below"), int | float)
        and isinstance(offset, list)
        and len(offset) == 3
        and all(isinstance(x, int | float) for x in offset)
    )
    if not good:
        raise ValueError(
            f"{where}: condition {cond!r}: expected two of {', '.join(_POINTS)}, "
            f"{'axes' if 'dist' in cond else 'axis'} from xyz, `below: <number>` and an optional "
            "3-number `offset`"
        )


def resolve_tasks(names: list[str]) -> list[str]:
    """Expand presets (`mt10`) and check every name against the language table and Meta-World's
    own environments (an entry of a user's task file may name one that does not exist)."""
    hint = "; a task of your own: an entry in a --task-file (the format of metaworld_tasks.yaml)"
    tasks = expand_tasks(names, task_language(), PRESETS, "Meta-World", hint)
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    for task in tasks:
        if task not in ALL_V3_ENVIRONMENTS:
            raise ValueError(
                f"task {task!r} has a language entry but is no Meta-World v3 environment; "
                f"they are: {', '.join(sorted(ALL_V3_ENVIRONMENTS))}"
            )
    return tasks


# The scene: what the scripted expert reads and the policy must see in the frames.
SCENE_NAMES = [f"{point}_{axis}" for point in ("object", "object2", "goal") for axis in "xyz"]


def scene_state(obs: np.ndarray) -> np.ndarray:
    """Object, second object (zeros where the task has one) and goal positions from a 39-dim
    observation, (9,) float32: the dataset's `observation.environment_state`."""
    return np.concatenate([obs[4:7], obs[11:14], obs[36:39]]).astype(np.float32)


def policy_state(obs: np.ndarray) -> np.ndarray:
    """The robot's own 4 numbers (end-effector xyz, gripper opening) from a 39-dim observation."""
    return obs[:4].astype(np.float32)


def _condition_holds(cond: dict, obs: np.ndarray) -> bool:
    if "gripper_below" in cond:
        return bool(obs[3] < cond["gripper_below"])
    offset = np.asarray(cond.get("offset", (0.0, 0.0, 0.0)))
    if "dist" in cond:
        a, b = (obs[_POINTS[p]] for p in cond["dist"])
        axes = [_AXES[c] for c in cond["axes"]]
        return bool(np.linalg.norm((a - (b + offset))[axes]) < cond["below"])
    a, b = (obs[_POINTS[p]] for p in cond["diff"])
    return bool((a - (b + offset))[_AXES[cond["axis"]]] < cond["below"])


class PhaseTracker:
    """Labels each step of an expert rollout with its phase; the phase never moves backwards."""

    def __init__(self, language: TaskLanguage):
        self.language = language
        self.phase = 0

    def update(self, obs: np.ndarray) -> int:
        last = len(self.language.subgoals) - 1
        while self.phase < last and all(
            _condition_holds(c, obs) for c in self.language.until[self.phase]
        ):
            self.phase += 1
        return self.phase


def camera_info(camera: str) -> dict:
    """How `camera` is placed, as recorded with its video feature in the dataset's info.json."""
    if camera not in PLACED_CAMERAS:
        return {"camera.name": camera, "camera.placement": "Meta-World's stock camera"}
    position, target, fovy = PLACED_CAMERAS[camera]
    return {
        "camera.name": camera,
        "camera.position": list(position),
        "camera.look_at": list(target),
        "camera.fovy": fovy,
    }


def look_at(position, target) -> np.ndarray:
    """MuJoCo camera quaternion (w, x, y, z) that looks from `position` at `target`, z up. A
    MuJoCo camera looks along its -z axis with +y up in the image."""
    import mujoco

    position, target = np.asarray(position, float), np.asarray(target, float)
    forward = (target - position) / np.linalg.norm(target - position)
    right = np.cross(forward, (0.0, 0.0, 1.0))
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    quat = np.zeros(4)
    mujoco.mju_mat2Quat(quat, np.stack([right, up, -forward], axis=1).reshape(-1))
    return quat


def _place_camera(model, name: str) -> None:
    """Pose the placed camera `name` in `model`, in its slot (`_PLACED_SLOTS`)."""
    import mujoco

    position, target, fovy = PLACED_CAMERAS[name]
    slot = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, _PLACED_SLOTS[name])
    model.cam_pos[slot] = position
    model.cam_quat[slot] = look_at(position, target)
    model.cam_fovy[slot] = fovy


class MetaWorldEnv:
    """One Meta-World v3 task with fast offscreen rendering and upright frames.

    Rendering settings follow what was measured on CPU machines: no MSAA, shadows or reflections
    (~10x faster, nearly identical images). Only one instance should render at a time per process:
    call `close()` before making the next (an old renderer collected late blanks the new one).
    """

    def __init__(
        self,
        task: str,
        camera: str | tuple[str, ...] = DEFAULT_CAMERA,
        image_size: int = 96,
        seed: int = 0,
    ):
        os.environ.setdefault("MUJOCO_GL", "egl")
        import gymnasium as gym
        import metaworld  # noqa: F401  (registers the Meta-World environments)
        import mujoco

        self.cameras = camera_names(camera, CAMERAS, "Meta-World")
        taken = {_PLACED_SLOTS[c] for c in self.cameras if c in PLACED_CAMERAS}
        if taken & set(self.cameras):
            raise ValueError(
                f"cameras {list(self.cameras)}: the placed cameras re-pose the stock "
                f"{sorted(taken)}, which cannot be asked for beside them"
            )
        self.task = task
        self.env = gym.make(
            "Meta-World/MT1",
            env_name=task,
            seed=seed,
            disable_env_checker=True,
            render_mode="rgb_array",
            camera_name=self.mujoco_camera(self.cameras[0]),
            width=image_size,
            height=image_size,
        )
        model = self.env.unwrapped.model
        for name in self.cameras:
            if name in PLACED_CAMERAS:
                _place_camera(model, name)
        self._camera_ids = {
            name: mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, self.mujoco_camera(name))
            for name in self.cameras
        }
        self.env.unwrapped.model.vis.quality.offsamples = 0
        viewer = self._viewer = self.env.unwrapped.mujoco_renderer._get_viewer("rgb_array")
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        # Each episode draws its own object and goal placement from the seed given to `reset`,
        # from the task's whole random-reset space (with Meta-World's own rejection of
        # placements too close together). MT1's fixed list of 50 placements would repeat:
        # 20 episodes drawn from it hold about 16 distinct placements.
        self.env.get_wrapper_attr("toggle_sample_tasks_on_reset")(False)
        unwrapped = self.env.unwrapped
        unwrapped.set_task(self.env.get_wrapper_attr("tasks")[0])  # the task's fixed settings
        unwrapped._freeze_rand_vec, unwrapped.seeded_rand_vec = False, True
        self._hand_start = np.array(unwrapped.hand_init_pos, dtype=np.float64)

    def reset(self, seed: int, start_spread: float = 0.0) -> np.ndarray:
        """Reset to the placement `seed` draws; returns the 39-dim observation. With
        `start_spread` > 0 the hand starts up to that far (m) from the task's start pose in x
        and y, half as far in z, also drawn from `seed`; 0 is Meta-World's one start pose."""
        import mujoco

        unwrapped = self.env.unwrapped
        unwrapped.np_random = np.random.default_rng(seed)
        # a stream of its own: the placement's draws stay those of `seed` whatever the spread
        offset = np.random.default_rng([seed, 1]).uniform(-1, 1, 3) * [1, 1, 0.5] * start_spread
        unwrapped.hand_init_pos = self._hand_start + offset
        obs, _ = self.env.reset(seed=seed)
        # Meta-World moves the goal marker (model.site_pos) after its last forward pass, so the
        # frame rendered now would draw the marker where another draw put it: every episode's
        # first frame showed a wrong goal, in the data and when planning. Recompute positions.
        mujoco.mj_forward(unwrapped.model, unwrapped.data)
        return obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, bool]:
        """Returns (observation, success)."""
        obs, _, _, _, info = self.env.step(action)
        return obs, bool(info["success"])

    @staticmethod
    def mujoco_camera(name: str) -> str:
        """The MuJoCo camera that renders our camera `name`."""
        return _PLACED_SLOTS.get(name, name)

    def render(self) -> dict[str, np.ndarray]:
        """Each camera's current frame, upright: name -> (S, S, 3) uint8."""
        frames = {}
        for name in self.cameras:
            frame = self._viewer.render(render_mode="rgb_array", camera_id=self._camera_ids[name])
            if name in ROTATED_CAMERAS:
                frame = frame[::-1, ::-1]
            if not frame.any():
                raise RuntimeError(
                    f"Meta-World rendered an all-black frame for {self.task}; another env's "
                    "renderer was probably released after this one was made (close envs before "
                    "making new ones)"
                )
            frames[name] = np.ascontiguousarray(frame)
        return frames

    def close(self) -> None:
        self.env.close()
        del self.env, self._viewer  # no reference may keep the renderer alive past this
        gc.collect()


make_env = MetaWorldEnv


def expert_for(task: str):
    """Meta-World's own scripted policy for `task`."""
    from metaworld.policies import ENV_POLICY_MAP

    return ENV_POLICY_MAP[task]()


def rollout_expert(
    env: MetaWorldEnv,
    seed: int,
    max_steps: int = MAX_EPISODE_STEPS,
    start_spread: float = 0.0,
    action_noise: float = 0.0,
) -> Episode:
    """Run the scripted expert from the configuration chosen by `seed` until success or time out;
    `start_spread` as in `MetaWorldEnv.reset`, `action_noise` as in `record_rollout`.

    Raw expert actions often exceed [-1, 1]; the env would clip them, so they are clipped here
    and the clipped action is what is stored.
    """
    import warnings

    expert = expert_for(env.task)
    tracker = PhaseTracker(task_language()[env.task])

    def act(obs: np.ndarray) -> tuple[np.ndarray, int]:
        # a copy: some experts (door-open, door-close) write into the observation they read,
        # which the phase tracker and the recorded scene read after them
        action = np.clip(expert.get_action(obs.copy()), -1.0, 1.0).astype(np.float32)
        return action, tracker.update(obs)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant\\(s\\) may be too high")
        return record_rollout(
            env,
            seed,
            act,
            policy_state,
            scene_state,
            max_steps,
            action_noise,
            start_spread=start_spread,
        )
