"""Latency of the full hierarchy against the flat path of the same policy, on this machine.
Prints numbers; asserts nothing.

    python benchmarks/latency.py --policy outputs/quickstart/policy --dataset data/quickstart

Replays the camera frames and states of recorded episodes through `HybridPlanner.act` (no
simulator in the timing), once with every tier (K candidates, subgoal schedule) and once flat,
VLA-style (no language subgoal, no visual subgoal: instruction -> VLM features -> actions).
Candidate images are not decoded (only videos need them).
"""

import argparse
from collections import defaultdict

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from hybrid.data.lerobot_dataset import LeRobotDataset
from hybrid.types import Observation
from planners.hierarchical import HybridPlanner

MODES = {
    "full hierarchy": {},
    "flat (VLA path)": {"language_subgoal": False, "visual_subgoal": False},
}


def replay(planner: HybridPlanner, dataset: LeRobotDataset, episodes: list[int]) -> list[dict]:
    keys = planner.spec.cameras or dataset.camera_keys
    timings = []
    for index in episodes:
        columns = dataset.episode(index)
        frames = {key: dataset.camera_frames(index, key) for key in keys}
        planner.reset()
        for t, state in enumerate(columns["observation.state"]):
            planned = not planner.queue
            images = {key: frames[key][t] for key in keys}
            planner.act(Observation(images, state), columns["task"])
            if planned:
                timings.append(planner.last_plan.timings_ms)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--num-candidates", type=int, default=8)
    args = parser.parse_args()
    console = Console()
    dataset = LeRobotDataset(args.dataset)
    episodes = list(np.linspace(0, dataset.num_episodes - 1, args.episodes).astype(int))
    amortised = {}
    table = Table(title=f"latency per tier, ms ({torch.get_num_threads()} threads, batch 1)")
    for column in ("mode", "tier", "p50", "p95", "runs per chunk"):
        table.add_column(column, justify="left" if column in ("mode", "tier") else "right")
    for mode, switches in MODES.items():
        planner = HybridPlanner.from_pretrained(
            args.policy, num_candidates=args.num_candidates, decode_candidates=False, **switches
        )
        replay(planner, dataset, episodes[:1])  # warm-up
        timings = replay(planner, dataset, episodes)
        per_tier = defaultdict(list)
        for plan in timings:
            for tier, ms in plan.items():
                per_tier[tier].append(ms)
        for tier, values in per_tier.items():
            table.add_row(
                mode,
                tier,
                f"{np.percentile(values, 50):.1f}",
                f"{np.percentile(values, 95):.1f}",
                f"{len(values) / len(timings):.2f}",
            )
        amortised[mode] = float(np.mean([sum(plan.values()) for plan in timings]))
        table.add_row(mode, "[b]amortised per chunk[/]", f"{amortised[mode]:.1f}", "", "")
        table.add_section()
    console.print(table)
    full, flat = amortised.values()
    console.print(
        f"full / flat amortised per chunk: {full / flat:.2f}x ({full:.1f} / {flat:.1f} ms)"
    )


if __name__ == "__main__":
    main()
