"""Closed-loop success and planning cost against the flow steps of the two generative tiers: the
action expert's Euler steps and the world model's. Prints a table, asserts nothing; `--readme
README.md` regenerates the `flow_steps` table there.

    python benchmarks/flow_steps.py --policy outputs/film/policy --episodes 20 --readme README.md

Each setting is `action_steps/imagine_steps`, evaluated with `hybrid eval` (two workers, one
torch thread each, no video) on the five quickstart tasks from seed 1000; the amortised
milliseconds per chunk are the workers' planning time, comparable between rows of one run.
"""

import argparse
from pathlib import Path

from closed_loop import QUICKSTART, rollouts
from readme import check_figure, markdown_table, write_figure
from rich.console import Console

from hybrid.intervals import format_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--episodes", type=int, default=20, help="episodes per task")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["10/4", "10/1", "5/4", "3/1"],
        help="action_steps/imagine_steps pairs",
    )
    parser.add_argument("--readme", type=Path, help="regenerate the `flow_steps` table there")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, "flow_steps")
    console = Console()
    rows = []
    for setting in args.settings:
        action_steps, imagine_steps = (int(x) for x in setting.split("/"))
        planner = {"action_steps": action_steps, "imagine_steps": imagine_steps}
        summary = rollouts(args.policy, QUICKSTART, args.episodes, planner=planner)
        cells = [str(action_steps), str(imagine_steps)]
        cells += [
            format_rate(row["successes"], row["episodes"]) for row in summary["tasks"].values()
        ]
        cells += [
            f"**{format_rate(summary['successes'], summary['episodes_total'])}**",
            f"{summary['amortised_ms_per_chunk']:.1f}",
        ]
        rows.append(cells)
        console.print(" | ".join(cells))
    header = ["action steps", "imagine steps", *QUICKSTART, "mean", "ms per chunk"]
    table = markdown_table(header, rows)
    console.print(table)
    if args.readme:
        write_figure(args.readme, "flow_steps", table)
        console.print(f"updated the `flow_steps` table in {args.readme}")


if __name__ == "__main__":
    main()
