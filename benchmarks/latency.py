"""Latency of the full hierarchy against the flat path of the same policy, on this machine, in
replay and in closed loop. Prints a table, asserts nothing; `--readme README.md` regenerates it
there.

    python benchmarks/latency.py --policy outputs/film/policy --dataset data/qs_fresh \
        --episodes 20 --readme README.md

Modes, each a planner setting on the same trained policy:
    full          the planner's defaults: K = 8 imagined and scored futures, the VLM and the
                  world model (and the encoder it imagines from) run with each new language
                  subgoal, the action expert every chunk; the same as `slow tiers per subgoal`,
                  which before 2026-12-07 was not the default
    reached rule  the same, the subgoal also ending once its visual target is reached
                  (`hybrid eval --reached-fraction 0.5`, the default until 2026-12-07): the
                  encoder then runs every chunk
    K=1           one imagined future, nothing to choose between
    flat          the VLA path: instruction -> VLM features -> action chunk, every chunk;
                  nothing imagined
    full, async   the full hierarchy planning each chunk in the background, 2 steps ahead
    every tier every chunk  the full hierarchy as in training: a new visual subgoal and the
                  VLM's features from the current frame every chunk (`hybrid eval
                  --visual-refresh chunk --features-refresh chunk`; `full` before 2026-12-07)
    K=1, every chunk  the same with one imagined future
    visual per subgoal  imagining only with each new language subgoal, the VLM every chunk
    VLM per subgoal  the VLM only with each new language subgoal, imagining every chunk
    slow tiers per subgoal  both at the subgoal's rate (the default)
    full, compiled / flat, compiled / slow tiers per subgoal, compiled
                  the same with the policy's inference API compiled by `torch.compile`
                  (`hybrid eval --compile`); its first calls compile, in the replay's warm-up
                  episodes and again in the closed loop's first chunks of a task
Replay: the frames and states of recorded episodes through `HybridPlanner.act` (no simulator;
one torch thread by default, as an evaluation worker), the modes taking turns episode by
episode, so that a drift in the machine's speed reaches every mode alike. Closed loop: `hybrid
eval` with one worker, no video, on the five quickstart tasks (`--tasks`); amortised
milliseconds of planning per chunk, the time of each call to `act` (what the control loop waits
for), and success with its 95% interval; the modes take turns task by task. Everything runs in
this one process. `--episodes 0` measures the replay alone, tier by tier, after
`--warmup-episodes` replayed unmeasured (evenly spread over the dataset's tasks; the compiled
modes compile there, and the table gives the seconds they took).
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

SLOW_TIERS = RefreshSchedule(visual="subgoal", features="subgoal")
EVERY_CHUNK = RefreshSchedule(visual="chunk", features="chunk")
MODES = {
    "full": {},
    "reached rule": {"schedule": RefreshSchedule(reached_fraction=0.5)},
    "K=1": {"num_candidates": 1},
    "flat": {"language_subgoal": False, "visual_subgoal": False},
    "full, async": {"async_delay": 2},
    "every tier every chunk": {"schedule": EVERY_CHUNK},
    "K=1, every chunk": {"num_candidates": 1, "schedule": EVERY_CHUNK},
    "visual per subgoal": {"schedule": RefreshSchedule(visual="subgoal", features="chunk")},
    "VLM per subgoal": {"schedule": RefreshSchedule(visual="chunk", features="subgoal")},
    "slow tiers per subgoal": {"schedule": SLOW_TIERS},
    "full, compiled": {"compile": "inductor"},
    "flat, compiled": {"language_subgoal": False, "visual_subgoal": False, "compile": "inductor"},
    "slow tiers per subgoal, compiled": {"schedule": SLOW_TIERS, "compile": "inductor"},
}


def replay(
    planners: dict[str, HybridPlanner], dataset: LeRobotDataset, episodes: list[int]
) -> dict[str, list[dict]]:
    """The tier timings of every chunk each planner planned while replaying `episodes`; the
    planners take turns on each episode."""
    timings = {name: [] for name in planners}
    spec = next(iter(planners.values())).spec  # one policy: every planner reads the same cameras
    keys = spec.cameras or dataset.camera_keys
    for index in episodes:
        columns = dataset.episode(index)
        frames = {key: dataset.camera_frames(index, key) for key in keys}  # decoded once
        for name, planner in planners.items():
            planner.reset()
            for t, state in enumerate(columns["observation.state"]):
                plans = planner.plans
                images = {key: frames[key][t] for key in keys}
                planner.act(Observation(images, state), columns["task"])
                if planner.plans > plans:
                    timings[name].append(planner.executing.timings_ms)
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
    parser.add_argument(
        "--warmup-episodes",
        type=int,
        default=1,
        help="episodes replayed before any is measured (the compiled modes compile in them)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the replay")
    parser.add_argument("--tasks", nargs="+", default=QUICKSTART, help="closed-loop tasks")
    parser.add_argument("--max-steps", type=int, default=300, help="per closed-loop episode")
    parser.add_argument("--readme", type=Path, help="regenerate the --figure table there")
    parser.add_argument("--figure", default="latency", help="the README table's marker name")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, args.figure)
    console = Console()
    torch.set_num_threads(args.threads)
    dataset = LeRobotDataset(args.dataset)
    picks = np.linspace(0, dataset.num_episodes - 1, args.replay_episodes).astype(int).tolist()
    planners = {
        mode: HybridPlanner.from_pretrained(args.policy, decode="none", **MODES[mode])
        for mode in args.modes
    }
    warmups = np.linspace(0, dataset.num_episodes - 1, args.warmup_episodes).astype(int)
    warmed = replay(planners, dataset, warmups.tolist())  # compiles, where a mode compiles
    replayed = replay(planners, dataset, picks)
    closed = closed_loop(args, args.modes)
    rows = {}
    for mode in args.modes:
        imagine = [plan["imagine"] for plan in replayed[mode] if "imagine" in plan]
        rows[mode] = {
            "replay": float(np.mean([sum(plan.values()) for plan in replayed[mode]])),
            "imagine": float(np.median(imagine)) if imagine else None,
            "warmup": sum(sum(plan.values()) for plan in warmed[mode]) / 1e3,
            **closed.get(mode, {}),
        }
        console.print(f"{mode}: {rows[mode]}")
    flat = rows.get("flat", {})
    if args.episodes:
        header, cells_per_mode = closed_loop_table(rows, flat, args.episodes)
    else:
        header, cells_per_mode = replay_table(rows, flat, replayed)
    title = f"latency, {args.threads} torch thread(s) in replay, batch 1"
    show_table(console, title, header, cells_per_mode, readme=args.readme, figure=args.figure)


def closed_loop(args: argparse.Namespace, modes: list[str]) -> dict[str, dict]:
    """Each mode's closed-loop figures over `args.tasks`, the modes taking turns task by task:
    planning ms per chunk and refreshes per chunk over all chunks, the worst task's control step
    p50 and p99, and success with its interval."""
    runs = defaultdict(list)
    for task in args.tasks if args.episodes else []:
        for mode in modes:
            options = {"workers": 1, "max_steps": args.max_steps, "planner": MODES[mode]}
            runs[mode].append(rollouts(args.policy, [task], args.episodes, **options))
    figures = {}
    for mode, summaries in runs.items():
        chunks = sum(s["chunks"] for s in summaries)
        steps = [s["control_step_ms"] for s in summaries if s["control_step_ms"]]
        successes = sum(s["successes"] for s in summaries)
        figures[mode] = {
            "closed": sum(s["amortised_ms_per_chunk"] * s["chunks"] for s in summaries) / chunks,
            "refresh": sum(s["subgoal_refreshes_per_chunk"] * s["chunks"] for s in summaries)
            / chunks,
            "step": {q: max(step[q] for step in steps) for q in ("p50_ms", "p99_ms")}
            if steps
            else None,
            "success": format_rate(successes, sum(s["episodes_total"] for s in summaries)),
        }
    return figures


def closed_loop_table(rows: dict, flat: dict, episodes: int) -> tuple[list[str], list[list[str]]]:
    header = [
        "mode",
        "replay ms/chunk",
        "closed loop ms/chunk",
        "x flat (closed loop)",
        "imagine and score ms (p50)",
        "subgoal refreshes per chunk",
        "control step p50 / p99 ms (worst task)",
        f"success ({episodes} per task)",
    ]
    cells_per_mode = []
    for mode, row in rows.items():
        closed = row["closed"]
        ratio = closed / flat["closed"] if flat.get("closed") else None
        step = row["step"]
        cells_per_mode.append(
            [
                mode,
                f"{row['replay']:.1f}",
                f"{closed:.1f}",
                f"{ratio:.2f}x" if ratio else "-",
                f"{row['imagine']:.1f}" if row["imagine"] else "-",
                f"{row['refresh']:.2f}",
                f"{step['p50_ms']:.1f} / {step['p99_ms']:.1f}" if step else "-",
                row["success"],
            ]
        )
    return header, cells_per_mode


TIERS = ["encode", "subgoal", "features", "imagine", "action"]


def replay_table(
    rows: dict, flat: dict, replayed: dict[str, list[dict]]
) -> tuple[list[str], list[list[str]]]:
    """Replay alone: the seconds each mode planned in the warm-up episodes (where a compiled mode
    compiles), each tier's milliseconds averaged over every planned chunk after them (a tier that
    runs on a quarter of the chunks counts a quarter of its time), and the share of chunks it
    ran on."""
    header = ["mode", "warm-up s", "replay ms/chunk", "x flat (replay)"]
    header += [f"{t} ms/chunk" for t in TIERS]
    cells_per_mode = []
    for mode, row in rows.items():
        plans = replayed[mode]
        ratio = row["replay"] / flat["replay"] if flat else None
        tiers = []
        for tier in TIERS:
            runs = [plan[tier] for plan in plans if tier in plan]
            share = len(runs) / len(plans)
            tiers.append(f"{sum(runs) / len(plans):.1f} ({share:.0%})" if runs else "-")
        ratio_cell = f"{ratio:.2f}x" if ratio else "-"
        cells = [mode, f"{row['warmup']:.0f}", f"{row['replay']:.1f}", ratio_cell, *tiers]
        cells_per_mode.append(cells)
    return header, cells_per_mode


if __name__ == "__main__":
    main()
