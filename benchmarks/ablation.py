"""Closed-loop success of the planner's ablation modes on the same trained policy, beside a
zero-action baseline, with 95% Wilson intervals, and each mode's difference from the first on the
same episodes with its paired 95% interval. Prints numbers; asserts nothing.

    python benchmarks/ablation.py --policy outputs/quickstart/policy --episodes 20 \
        --readme README.md --out outputs/quickstart/ablation.json --chart docs/ablation.png

Modes: full (K candidates scored, the planner's default schedule: the VLM and the world model
run with each new language subgoal), K = 1 (no scoring), the K candidates chosen by consensus
(`medoid`) or by the value head among the half nearest the others (`central`;
`planners/scoring.py`), flat (no visual subgoal for the action
expert), no language subgoal (the instruction stands in); and three schedules of the full
hierarchy: every tier on every chunk, as in training (`every tier every chunk`), the VLM's prefix
pass alone at the subgoal's rate (`VLM per subgoal`), and both slow tiers at that rate (`slow
tiers per subgoal`, the default since 2026-12-07; before it, `full` ran every tier every
chunk); and `reached rule`, the default with each subgoal also ending once its visual target is
reached (`RefreshSchedule.reached_fraction` 0.5; the default until 2026-12-07, when every mode
checked it). Each switch changes one thing: the refresh rule is the same in every mode
(`planners/schedule.py`). Task configurations come from --seed, which differs from the seeds of
the training data. Every mode runs the same
episodes (placements, and the planner's noise streams seeded per episode), so two modes pair up
episode by episode: the last column counts the episodes a mode solved that the first did not,
and the reverse, and Newcombe's paired interval of the difference (`hybrid.intervals`) is far
narrower than two overlapping Wilson intervals when the modes mostly agree. `--readme` rewrites
the README's table between its `--figure` markers (default `ablation`).
"""

import argparse
from pathlib import Path
from types import ModuleType

import numpy as np
from closed_loop import QUICKSTART, outcomes, rollouts
from readme import check_figure, report_successes
from rich.console import Console

from hybrid.collect import episode_seed
from hybrid.intervals import format_rate
from hybrid.plots import success_chart
from hybrid.sim import metaworld
from planners.schedule import RefreshSchedule

MODES = {
    "full (K=8, scored)": {"num_candidates": 8},
    "K=1, no scoring": {"num_candidates": 1},
    "K=8, medoid": {"choice": "medoid"},
    "K=8, central": {"choice": "central"},
    "flat: no visual subgoal": {"visual_subgoal": False},
    "no language subgoal": {"language_subgoal": False},
    "every tier every chunk": {"schedule": RefreshSchedule(visual="chunk", features="chunk")},
    "VLM per subgoal": {"schedule": RefreshSchedule(visual="chunk", features="subgoal")},
    "slow tiers per subgoal": {"schedule": RefreshSchedule(visual="subgoal", features="subgoal")},
    "reached rule": {"schedule": RefreshSchedule(reached_fraction=0.5)},
}


def zero_action(
    sim: ModuleType, tasks: list[str], episodes: int, seed: int, max_steps: int
) -> tuple[list[int], list[bool]]:
    """What doing nothing solves on the task configurations of `seed`: the successes per task,
    and each episode's outcome, task by task, in the order `closed_loop.outcomes` lists a
    policy's; `sim` is a simulator adapter (`hybrid.sim.metaworld`, `hybrid.sim.panda`)."""
    still = np.zeros(sim.EMBODIMENT.action_dim, np.float32)
    counts, solved = [], []
    for task in tasks:
        env = sim.make_env(task, image_size=32, seed=seed)
        for episode in range(episodes):
            env.reset(episode_seed(seed, task, episode))
            success = False
            for _ in range(max_steps):
                _, success = env.step(still)
                if success:
                    break
            solved.append(bool(success))
        env.close()
        counts.append(sum(solved[-episodes:]))
    return counts, solved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--tasks", nargs="+", default=QUICKSTART)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--readme", help="rewrite this README's table named by --figure")
    parser.add_argument("--figure", default="ablation", help="the README table's marker name")
    parser.add_argument("--out", help="write every count to this JSON file")
    parser.add_argument("--chart", help="draw the modes side by side in this PNG")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, args.figure)
    console = Console()
    tasks = metaworld.resolve_tasks(args.tasks)
    counts: dict[str, list[int]] = {}  # mode -> successes per task
    solved: dict[str, list[bool]] = {}  # mode -> each episode's outcome, paired across modes
    for mode in args.modes:
        summary = rollouts(
            args.policy,
            tasks,
            args.episodes,
            seed=args.seed,
            max_steps=args.max_steps,
            workers=args.workers,
            planner=MODES[mode],
        )
        counts[mode] = [summary["tasks"][t]["successes"] for t in tasks]
        solved[mode] = outcomes(summary, tasks)
        rate = format_rate(sum(counts[mode]), args.episodes * len(tasks))
        console.print(f"{mode}: mean success {rate}")
    counts["zero action"], solved["zero action"] = zero_action(
        metaworld, tasks, args.episodes, args.seed, args.max_steps
    )
    table = report_successes(
        counts, "mode", tasks, args.episodes, args.seed, args.figure, args.readme, args.out, solved
    )
    console.print(
        f"success, {args.episodes} episodes per task (seed {args.seed}), 95% Wilson; each mode "
        "against the first on the same episodes, with the paired 95% interval of the difference"
    )
    console.print(table)
    if args.chart:
        modes = {
            mode: {t: (c, args.episodes) for t, c in zip(tasks, per_task, strict=True)}
            for mode, per_task in counts.items()
        }
        console.print(success_chart(modes, Path(args.chart), f"ablation of {args.policy}"))


if __name__ == "__main__":
    main()
