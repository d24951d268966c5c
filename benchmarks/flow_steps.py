"""Closed-loop success and planning cost against the flow steps of the two generative tiers: the
action expert's Euler steps and the world model's. Prints a table, asserts nothing; `--readme
README.md` regenerates the `flow_steps` table there.

    python benchmarks/flow_steps.py --policy outputs/quickstart/policy \
        --dataset data/quickstart --episodes 20 --readme README.md

Each setting is `action_steps/imagine_steps` on the full hierarchy. Success: `hybrid eval` (two
workers, one torch thread each, no video) on the five quickstart tasks from seed 1000. Cost: the
milliseconds of planning per chunk, and of the action tier alone, replaying `--replay-episodes`
recorded episodes of `--dataset` through `HybridPlanner.act` in this one process, one torch
thread, the settings taking turns episode by episode (as `benchmarks/latency.py`), so that the
settings' times compare; the closed loop's own times do not, its two workers sharing the two
cores with their simulators.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from closed_loop import QUICKSTART, rollouts
from latency import replay
from readme import check_figure, markdown_table, write_figure
from rich.console import Console

from hybrid.data.lerobot_dataset import LeRobotDataset
from hybrid.intervals import format_rate
from planners.hierarchical import HybridPlanner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--dataset", required=True, help="recorded episodes to replay for timing")
    parser.add_argument("--episodes", type=int, default=20, help="closed-loop episodes per task")
    parser.add_argument("--replay-episodes", type=int, default=10)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["5/1", "3/1", "2/1", "1/1"],
        help="action_steps/imagine_steps pairs",
    )
    parser.add_argument("--readme", type=Path, help="regenerate the `flow_steps` table there")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, "flow_steps")
    console = Console()
    settings = {}
    for setting in args.settings:
        action_steps, imagine_steps = (int(x) for x in setting.split("/"))
        settings[setting] = {"action_steps": action_steps, "imagine_steps": imagine_steps}
    torch.set_num_threads(1)
    dataset = LeRobotDataset(args.dataset)
    picks = np.linspace(0, dataset.num_episodes - 1, args.replay_episodes).astype(int).tolist()
    planners = {
        setting: HybridPlanner.from_pretrained(args.policy, decode="none", **planner)
        for setting, planner in settings.items()
    }
    replay(planners, dataset, picks[:1])  # warm-up, unmeasured
    replayed = replay(planners, dataset, picks)
    rows = []
    for setting, planner in settings.items():
        summary = rollouts(args.policy, QUICKSTART, args.episodes, planner=planner)
        plans = replayed[setting]
        cells = [str(planner["action_steps"]), str(planner["imagine_steps"])]
        cells += [
            format_rate(row["successes"], row["episodes"]) for row in summary["tasks"].values()
        ]
        cells += [
            f"**{format_rate(summary['successes'], summary['episodes_total'])}**",
            f"{np.mean([sum(plan.values()) for plan in plans]):.1f}",
            f"{np.mean([plan['action'] for plan in plans]):.1f}",
        ]
        rows.append(cells)
        console.print(" | ".join(cells))
    header = ["action steps", "imagine steps", *QUICKSTART, "mean"]
    header += ["replay ms/chunk", "action ms/chunk"]
    table = markdown_table(header, rows)
    console.print(table)
    if args.readme:
        write_figure(args.readme, "flow_steps", table)
        console.print(f"updated the `flow_steps` table in {args.readme}")


if __name__ == "__main__":
    main()
