"""Closed-loop success of the planner's ablation modes on the same trained policy, beside a
zero-action baseline. Prints numbers; asserts nothing.

    python benchmarks/ablation.py --policy outputs/quickstart/policy --episodes 5

Modes: full (K candidates scored), K = 1 (no scoring), flat (no visual subgoal), no language
subgoal (the instruction stands in). Task configurations come from --seed, which differs from
the seeds of the training data.
"""

import argparse
import tempfile

import numpy as np
from rich.console import Console
from rich.table import Table

from hybrid.collect import episode_seed
from hybrid.evaluate import evaluate
from hybrid.sim import metaworld

QUICKSTART = ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3", "button-press-topdown-v3"]
MODES = {
    "full (K=8)": {"num_candidates": 8},
    "K=1, no scoring": {"num_candidates": 1},
    "flat: no visual subgoal": {"visual_subgoal": False},
    "no language subgoal": {"language_subgoal": False},
}


def zero_action_success(task: str, episodes: int, seed: int, max_steps: int) -> float:
    env = metaworld.MetaWorldEnv(task, "corner", 32, seed)
    successes = []
    for episode in range(episodes):
        env.reset(episode_seed(seed, task, episode))
        success = False
        for _ in range(max_steps):
            _, success = env.step(np.zeros(4, np.float32))
            if success:
                break
        successes.append(success)
    env.close()
    return float(np.mean(successes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--tasks", nargs="+", default=QUICKSTART)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    console = Console()
    tasks = metaworld.resolve_tasks(args.tasks)
    rows = {}
    for mode, switches in MODES.items():
        with tempfile.TemporaryDirectory() as out:
            summary = evaluate(
                args.policy,
                tasks,
                args.episodes,
                out,
                seed=args.seed,
                max_steps=args.max_steps,
                workers=args.workers,
                planner=switches,
                console=Console(quiet=True),
            )
        rows[mode] = [summary["tasks"][t]["success_rate"] for t in tasks]
        rows[mode].append(summary["mean_success_rate"])
        console.print(f"{mode}: mean success {summary['mean_success_rate']:.0%}")
    zero = [zero_action_success(t, args.episodes, args.seed, args.max_steps) for t in tasks]
    rows["zero action"] = [*zero, float(np.mean(zero))]
    table = Table(title=f"success over {args.episodes} episodes per task (seed {args.seed})")
    table.add_column("mode")
    for task in [*tasks, "mean"]:
        table.add_column(task.removesuffix("-v3"), justify="right")
    for mode, values in rows.items():
        table.add_row(mode, *(f"{v:.0%}" for v in values))
    console.print(table)


if __name__ == "__main__":
    main()
