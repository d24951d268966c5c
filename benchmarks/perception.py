"""Where the policy's eyes put the object and the goal, against where they are: the action
expert's scene estimate, in cm, per task, open loop on held-out frames and in closed loop at
every planned chunk, for any simulated robot of the policy (its adapter active). Prints numbers;
asserts nothing.

    python benchmarks/perception.py --policy outputs/scene_estimator/policy --data data/quickstart \
        --tasks reach-v3 push-v3 pick-place-v3 --episodes 5 --readme README.md
    python benchmarks/perception.py --policy outputs/quickstart/policy --embodiment panda \
        --data data/panda --tasks all --episodes 5

Open loop: every frame of the task's held-out episodes (the validation split `hybrid fit` used),
by where it lies in its episode: the first frame, the next five, the rest. Closed loop: the
planner runs the task from new placements (seed 1000, as `hybrid eval` draws them) and, at each
chunk it plans, its estimate from the frames it planned on is set against the simulator's
positions: at the first chunk, then at later ones split by whether the object has left its
start (by 1 cm) and whether the hand is within 8 cm of it; demonstrations go straight for the
object, so a still object with the hand far from it is a view they rarely show. Beside the goal's
error, the distance from the estimated goal to the hand and from the true goal to the hand: an
estimate that sits nearer the hand than the goal does follows the arm (which, in every
demonstration, ends at the goal) instead of reading the goal marker.
"""

import argparse

import numpy as np
import torch
from einops import rearrange
from readme import check_figure, show_table
from rich.console import Console

from hybrid.collect import episode_seed
from hybrid.data.datamodule import HybridDataModule
from hybrid.data.windows import SCENE_KEY, STATE_KEY, resize_frames
from hybrid.sim import simulator_for
from hybrid.types import Observation
from planners.hierarchical import HybridPlanner

COLUMNS = ["task", "frames", "n", "object (cm)", "goal (cm)", "goal estimate to hand (cm)"]
COLUMNS += ["goal to hand (cm)"]
PARTS = ["first chunk", "object still, hand within 8 cm", "object still, hand farther"]
PARTS += ["object moved"]


def scene_parts(sim) -> tuple[list[int], list[int]]:
    """Where the object's and the goal's xyz lie in the simulator's scene vector."""
    names = sim.SCENE_NAMES
    return [i for i, n in enumerate(names) if n.startswith("object_")], [
        i for i, n in enumerate(names) if n.startswith("goal_")
    ]


@torch.no_grad()
def estimate(planner: HybridPlanner, frames: np.ndarray) -> np.ndarray:
    """Frames (T, N, S, S, 3) uint8 at the policy's side -> the scene estimate (T, 9) in the
    simulator's units."""
    policy = planner.policy
    images = rearrange(torch.from_numpy(frames), "t n h w c -> t n c h w").float() / 255
    ids = policy.embodiment_ids([planner.embodiment] * len(frames))
    scene = policy.action_expert.estimate_scene(images.to(planner.device), ids)
    width = len(simulator_for(planner.embodiment).SCENE_NAMES)
    normalizer = policy.normalizers[planner.embodiment]
    return normalizer.unnormalize(SCENE_KEY, scene[:, :width].cpu().numpy())


def estimate_rendered(planner: HybridPlanner, rendered: dict[str, np.ndarray]) -> np.ndarray:
    """One step's frames as the simulator renders them (camera -> (S, S, 3) uint8, the policy's
    cameras in order) -> the scene estimate (9,) in the simulator's units."""
    frames = np.stack([resize_frames(f[None], planner.image_size)[0] for f in rendered.values()])
    return estimate(planner, frames[None])[0]


def _row(sim, task: str, label: str, est, truth, hand) -> list:
    """One table row from estimates, true scenes (n, width) and hand positions (n, 3)."""
    OBJECT, GOAL = scene_parts(sim)

    def cm(a: np.ndarray, b: np.ndarray) -> str:
        return f"{100 * np.linalg.norm(a - b, axis=1).mean():.1f}"

    goal, true_goal = est[:, GOAL], truth[:, GOAL]
    row = [task, label, str(len(est)), cm(est[:, OBJECT], truth[:, OBJECT]), cm(goal, true_goal)]
    return row + [cm(goal, hand), cm(true_goal, hand)]


def open_loop(planner: HybridPlanner, data: HybridDataModule, task: str) -> list[list[str]]:
    """Rows for the held-out episodes of `task`: the first frame, the next five, the rest."""
    sim = simulator_for(planner.embodiment)
    instruction = sim.task_language()[task].instruction
    episodes = [e for e in data.val_set.episodes if e["instruction"] == instruction]
    if not episodes:
        return []
    parts = {"held-out, first frame": [], "held-out, frames 1-5": [], "held-out, the rest": []}
    normalizer = data.normalizer
    for episode in episodes:
        est = estimate(planner, episode["images"])
        truth = normalizer.unnormalize(SCENE_KEY, episode["scene"])
        hand = normalizer.unnormalize(STATE_KEY, episode["state"])[:, :3]
        for rows, part in zip(
            parts.values(), (slice(0, 1), slice(1, 6), slice(6, None)), strict=True
        ):
            rows.append((est[part], truth[part], hand[part]))
    return [
        _row(sim, task, label, *(np.concatenate(column) for column in zip(*rows, strict=True)))
        for label, rows in parts.items()
        if sum(len(r[0]) for r in rows)
    ]


def closed_loop(planner, task: str, episodes: int, seed: int, max_steps: int) -> list[list[str]]:
    """Rows for `episodes` rollouts of `task`, one per part of PARTS any chunk fell in."""
    sim = simulator_for(planner.embodiment)
    object_dims = scene_parts(sim)[0]
    language = sim.task_language()[task]
    cameras = {key.rsplit(".", 1)[-1]: key for key in planner.spec.cameras}
    env = sim.make_env(task, tuple(cameras), planner.image_size, seed)
    parts = {label: [] for label in PARTS}
    successes = 0
    try:
        for i in range(episodes):
            obs = env.reset(episode_seed(seed, task, i))
            planner.reset(episode_seed(seed, task, i))  # the noise `hybrid eval` draws
            start = sim.scene_state(obs)[object_dims]
            success, steps, chunk = False, 0, 0
            while steps < max_steps and not success:
                steps += 1
                rendered = env.render()
                images = {cameras[name]: frame for name, frame in rendered.items()}
                if not planner.queue:
                    truth, hand = sim.scene_state(obs), sim.policy_state(obs)[:3]
                    part = _closed_loop_part(chunk, truth[object_dims], hand, start)
                    found = estimate_rendered(planner, rendered)[None]
                    parts[part].append((found, truth[None], hand[None]))
                    chunk += 1
                state = sim.policy_state(obs)
                action = planner.act(Observation(images, state), language.instruction)
                obs, success = env.step(action)
            successes += success
    finally:
        env.close()
    label = f"closed loop ({successes}/{episodes} succeeded)"
    return [
        _row(sim, task, f"{label}, {which}", *(np.concatenate(c) for c in zip(*rows, strict=True)))
        for which, rows in parts.items()
        if rows
    ]


def _closed_loop_part(chunk: int, obj: np.ndarray, hand: np.ndarray, start: np.ndarray) -> str:
    """Which of PARTS a chunk belongs to, from the object's position now and at the start and
    the hand's (m)."""
    if chunk == 0:
        return PARTS[0]
    if np.linalg.norm(obj - start) > 0.01:
        return PARTS[3]
    return PARTS[1] if np.linalg.norm(hand - obj) < 0.08 else PARTS[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--embodiment", help="the robot to run (default: the policy's first)")
    parser.add_argument("--data", required=True, help="the robot's dataset the policy trained on")
    parser.add_argument("--tasks", nargs="+", default=["reach-v3", "push-v3", "pick-place-v3"])
    parser.add_argument("--episodes", type=int, default=5, help="closed-loop episodes per task")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="as in training")
    parser.add_argument("--readme", help="rewrite this README's `perception` table")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, "perception")
    planner = HybridPlanner.from_pretrained(args.policy, embodiment=args.embodiment, decode="none")
    if not planner.policy.action_expert.config.scene_dim:
        parser.error(f"{args.policy}: its action expert estimates no scene (scene_dim 0)")
    data = HybridDataModule(
        args.data, image_size=planner.image_size, val_fraction=args.val_fraction
    )
    data.setup("fit")
    rows = []
    for task in simulator_for(planner.embodiment).resolve_tasks(args.tasks):
        rows += open_loop(planner, data, task)
        rows += closed_loop(planner, task, args.episodes, args.seed, args.max_steps)
    title = "the scene estimate against the simulator's positions"
    show_table(Console(), title, COLUMNS, rows, left=2, readme=args.readme, figure="perception")


if __name__ == "__main__":
    main()
