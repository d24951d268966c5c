"""The `hybrid` command: one entry point for every verb of the framework.

hybrid collect metaworld --tasks mt10 --episodes-per-task 5 --out data/mt10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console


def _collect_parser(subparsers) -> None:
    collect = subparsers.add_parser("collect", help="generate demonstrations in a simulator")
    sims = collect.add_subparsers(dest="simulator", required=True)
    mw = sims.add_parser(
        "metaworld",
        help="Meta-World scripted experts -> LeRobot v3 dataset",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    mw.add_argument("--tasks", nargs="+", required=True, help="Meta-World v3 task names or `mt10`")
    mw.add_argument("--episodes-per-task", type=int, default=10, help="attempts per task")
    mw.add_argument("--out", type=Path, required=True, help="dataset directory")
    mw.add_argument("--image-size", type=int, default=96, help="square camera image side")
    mw.add_argument("--camera", default="corner", help="Meta-World camera name")
    mw.add_argument("--seed", type=int, default=0, help="seed of task configurations and episodes")
    mw.add_argument("--workers", type=int, default=2, help="parallel simulator processes")
    mw.add_argument(
        "--keep-failures", action="store_true", help="also store episodes the expert failed"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hybrid", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="verb", required=True)
    _collect_parser(subparsers)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    console = Console()
    try:
        if args.verb == "collect":
            from hybrid.collect import collect_metaworld

            collect_metaworld(
                tasks=args.tasks,
                episodes_per_task=args.episodes_per_task,
                out=args.out,
                image_size=args.image_size,
                camera=args.camera,
                seed=args.seed,
                workers=args.workers,
                keep_failures=args.keep_failures,
                console=console,
            )
    except ValueError as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
