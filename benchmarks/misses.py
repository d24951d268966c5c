"""Where failed episodes end: in closed loop, how near the hand came to the goal and how near the
object came to it, against where each was when the episode ran out, and how far the policy's
own estimate of the goal was from the goal at its first and last planned chunk. Prints numbers;
asserts nothing.

    python benchmarks/misses.py --policy outputs/quickstart/policy --tasks reach-v3 push-v3 \
        pick-place-v3 --episodes 40 --seed 2000 --readme README.md

The episodes are `hybrid eval`'s (the same placements and the same noise per episode from
`--seed`, the planner's default schedule). Per task: the episodes that failed; of those, how many
brought the hand, or the object, within 5 cm of the goal at some step (a policy that gets there
and does not finish, against one that never gets there); the median over failed episodes of
the closest and the final distances, in cm; and the median error of the scene estimate's goal
at the first and the last chunk, for failed and for solved episodes (where the action expert
estimates a scene: an estimate that goes wrong late, as the arm nears the goal, shows here).
Positions are the simulator's (`SCENE_NAMES`: object and goal; the hand is the state's first
three numbers), so the distances are those of the points the scene records, not necessarily
the ones the task's success test measures (Meta-World's reach scores the fingertips, 4.5 cm
below the hand its scripted expert steers to the goal).
"""

import argparse

import numpy as np
from perception import estimate_rendered, scene_parts
from readme import check_figure, show_table
from rich.console import Console

from hybrid.collect import episode_seed
from hybrid.sim import simulator_for
from hybrid.types import Observation
from planners.hierarchical import HybridPlanner

NEAR = 0.05  # m: "came within 5 cm"
COLUMNS = [
    "task",
    "failed",
    "hand within 5 cm of the goal",
    "object within 5 cm",
    "hand-goal closest / final (cm)",
    "object-goal closest / final (cm)",
    "goal estimate error, first / last chunk (cm): failed",
    "solved",
]


def episode(planner, env, sim, language, cameras, seed: int, max_steps: int) -> dict:
    """One rollout: success, the hand's and the object's distances to the goal at every step
    (m), and the goal estimate's error at each planned chunk (m; empty without a scene head)."""
    objects, goals = scene_parts(sim)
    estimates = planner.policy.action_expert is not None and bool(
        planner.policy.action_expert.config.scene_dim
    )
    hand, item, errors, success, steps = [], [], [], False, 0

    def measure(obs: np.ndarray) -> np.ndarray:
        """Records the hand's and the object's distances to the goal; returns the scene."""
        scene = sim.scene_state(obs)
        hand.append(np.linalg.norm(sim.policy_state(obs)[:3] - scene[goals]))
        item.append(np.linalg.norm(scene[objects] - scene[goals]))
        return scene

    obs = env.reset(seed)
    planner.reset(seed)
    while steps < max_steps and not success:
        steps += 1
        rendered = env.render()
        scene = measure(obs)
        if estimates and not planner.queue:
            found = estimate_rendered(planner, rendered)
            errors.append(np.linalg.norm(found[goals] - scene[goals]))
        images = {cameras[name]: frame for name, frame in rendered.items()}
        action = planner.act(Observation(images, sim.policy_state(obs)), language.instruction)
        obs, success = env.step(action)
    measure(obs)
    return {"success": success, "hand": np.array(hand), "object": np.array(item), "goal": errors}


def row(task: str, episodes: list[dict]) -> list[str]:
    failed = [e for e in episodes if not e["success"]]
    solved = [e for e in episodes if e["success"]]

    def median_cm(values) -> str:
        return f"{100 * np.median(values):.1f}" if len(values) else "-"

    def estimate_cm(group: list[dict]) -> str:
        group = [e for e in group if e["goal"]]
        if not group:
            return "-"
        first, last = ([e["goal"][i] for e in group] for i in (0, -1))
        return f"{median_cm(first)} / {median_cm(last)}"

    near = {key: sum(e[key].min() < NEAR for e in failed) for key in ("hand", "object")}
    closest = {key: [e[key].min() for e in failed] for key in ("hand", "object")}
    final = {key: [e[key][-1] for e in failed] for key in ("hand", "object")}
    return [
        task,
        f"{len(failed)} of {len(episodes)}",
        f"{near['hand']} of {len(failed)}",
        f"{near['object']} of {len(failed)}",
        f"{median_cm(closest['hand'])} / {median_cm(final['hand'])}",
        f"{median_cm(closest['object'])} / {median_cm(final['object'])}",
        estimate_cm(failed),
        estimate_cm(solved),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--embodiment", help="the robot to run (default: the policy's first)")
    parser.add_argument("--tasks", nargs="+", default=["reach-v3", "push-v3", "pick-place-v3"])
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--readme", help="rewrite this README's table named by --figure")
    parser.add_argument("--figure", default="misses", help="the README table's marker name")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, args.figure)
    planner = HybridPlanner.from_pretrained(args.policy, embodiment=args.embodiment, decode="none")
    sim = simulator_for(planner.embodiment)
    cameras = {key.rsplit(".", 1)[-1]: key for key in planner.spec.cameras}
    rows = []
    for task in sim.resolve_tasks(args.tasks):
        language = sim.task_language()[task]
        env = sim.make_env(task, tuple(cameras), planner.image_size, args.seed)
        try:
            runs = [
                episode(
                    planner, env, sim, language, cameras, episode_seed(args.seed, task, i),
                    args.max_steps,
                )
                for i in range(args.episodes)
            ]  # fmt: skip
        finally:
            env.close()
        rows.append(row(task, runs))
    title = f"where failed episodes end, {args.episodes} per task, seed {args.seed}"
    show_table(Console(), title, COLUMNS, rows, readme=args.readme, figure=args.figure)


if __name__ == "__main__":
    main()
