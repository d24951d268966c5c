"""Latency of the full hierarchy against the flat path of the same policy, on this machine, in
replay and in closed loop. Prints a table, asserts nothing; `--readme README.md` regenerates it
there.

    python benchmarks/latency.py --policy outputs/film/policy --dataset data/qs_fresh \
        --episodes 20 --readme README.md

Modes, each a planner setting on the same trained policy:
    full          every tier: subgoal schedule, K = 8 imagined and scored futures each chunk
    K=1           one imagined future, nothing to choose between
    flat          the VLA path: instruction -> VLM features -> action chunk; nothing imagined
    full, async   the full hierarchy planning each chunk in the background, 2 steps ahead
    visual per subgoal  the full hierarchy imagining only with each new language subgoal
                  (`hybrid eval --visual-refresh subgoal`), the action expert keeping its future
Replay: the frames and states of recorded episodes through `HybridPlanner.act` (no simulator;
one torch thread by default, as an evaluation worker). Closed loop: `hybrid eval` with one
worker, no video, on the five quickstart tasks; amortised milliseconds of planning per chunk,
the time of each call to `act` (what the control loop waits for), and success with its 95%
interval. Every measurement runs in this one process, one after another.
"""

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from closed_loop import QUICKSTART, rollouts
from readme import check_figure, show_table
from rich.console import Console

from hybrid.data.lerobot_dataset import LeRobotDataset
from hybrid.intervals import format_rate
from hybrid.types import Observation
from planners.hierarchical import HybridPlanner
from planners.schedule import RefreshSchedule

MODES = {
    "full": {},
    "K=1": {"num_candidates": 1},
    "flat": {"language_subgoal": False, "visual_subgoal": False},
    "full, async": {"async_delay": 2},
    "visual per subgoal": {"schedule": RefreshSchedule(visual="subgoal")},
}


def replay(planner: HybridPlanner, dataset: LeRobotDataset, episodes: list[int]) -> list[dict]:
    """The tier timings of every chunk planned while replaying `episodes`."""
    keys = planner.spec.cameras or dataset.camera_keys
    timings = []
    for index in episodes:
        columns = dataset.episode(index)
        frames = {key: dataset.camera_frames(index, key) for key in keys}
        planner.reset()
        for t, state in enumerate(columns["observation.state"]):
            plans = planner.plans
            images = {key: frames[key][t] for key in keys}
            planner.act(Observation(images, state), columns["task"])
            if planner.plans > plans:
                timings.append(planner.executing.timings_ms)
        planner.reset()
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--dataset", required=True, help="recorded episodes to replay")
    parser.add_argument("--replay-episodes", type=int, default=5)
    parser.add_argument(
        "--episodes", type=int, default=20, help="closed-loop episodes per task (0: replay only)"
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the replay")
    parser.add_argument("--readme", type=Path, help="regenerate the `latency` table there")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, "latency")
    console = Console()
    torch.set_num_threads(args.threads)
    dataset = LeRobotDataset(args.dataset)
    picks = np.linspace(0, dataset.num_episodes - 1, args.replay_episodes).astype(int).tolist()
    rows = {}
    for mode in args.modes:
        torch.set_num_threads(args.threads)  # an evaluation below sets 1 for its worker
        planner = HybridPlanner.from_pretrained(args.policy, decode_candidates=False, **MODES[mode])
        replay(planner, dataset, picks[:1])  # warm-up
        timings = replay(planner, dataset, picks)
        tiers = defaultdict(list)
        for plan in timings:
            for tier, ms in plan.items():
                tiers[tier].append(ms)
        row = {
            "replay": float(np.mean([sum(plan.values()) for plan in timings])),
            "imagine": float(np.median(tiers["imagine"])) if tiers["imagine"] else None,
        }
        if args.episodes:
            summary = rollouts(
                args.policy, QUICKSTART, args.episodes, workers=1, planner=MODES[mode]
            )
            row |= {
                "closed": summary["amortised_ms_per_chunk"],
                "step": summary["control_step_ms"],
                "refresh": summary["subgoal_refreshes_per_chunk"],
                "success": format_rate(summary["successes"], summary["episodes_total"]),
            }
        rows[mode] = row
        console.print(f"{mode}: {row}")
    flat = rows.get("flat", {})
    header = [
        "mode",
        "replay ms/chunk",
        "closed loop ms/chunk",
        "x flat (closed loop)",
        "imagine and score ms (p50)",
        "subgoal refreshes per chunk",
        "control step p50 / p99 ms",
        f"success ({args.episodes} per task)",
    ]
    cells_per_mode = []
    for mode, row in rows.items():
        closed = row.get("closed")
        ratio = closed / flat["closed"] if closed and flat.get("closed") else None
        step = row.get("step")
        cells_per_mode.append(
            [
                mode,
                f"{row['replay']:.1f}",
                f"{closed:.1f}" if closed else "-",
                f"{ratio:.2f}x" if ratio else "-",
                f"{row['imagine']:.1f}" if row["imagine"] else "-",
                f"{row['refresh']:.2f}" if "refresh" in row else "-",
                f"{step['p50_ms']:.1f} / {step['p99_ms']:.1f}" if step else "-",
                row.get("success", "-"),
            ]
        )
    title = f"latency, {args.threads} torch thread(s) in replay, batch 1"
    show_table(console, title, header, cells_per_mode, readme=args.readme, figure="latency")


if __name__ == "__main__":
    main()
