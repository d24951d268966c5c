"""The `hybrid` command: one entry point for every verb of the framework.

hybrid collect metaworld --tasks mt10 --episodes-per-task 5 --out data/mt10
hybrid fit --config configs/quickstart.yaml     (also validate and test: Lightning's CLI)
hybrid eval --policy outputs/quickstart/policy --tasks reach-v3 --episodes 10 --video
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


def _eval_parser(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="closed-loop rollouts of a policy in Meta-World",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("--policy", required=True, help="policy directory (exported by `hybrid fit`)")
    ev.add_argument("--tasks", nargs="+", required=True, help="Meta-World v3 task names or `mt10`")
    ev.add_argument("--episodes", type=int, default=10, help="episodes per task")
    ev.add_argument("--seed", type=int, default=1000, help="seed of the task configurations")
    ev.add_argument("--out", type=Path, default=Path("outputs/eval"), help="results directory")
    ev.add_argument("--max-steps", type=int, default=300, help="time limit per episode")
    ev.add_argument("--workers", type=int, default=2, help="parallel simulator processes")
    ev.add_argument("--video", action="store_true", help="write an MP4 per episode")
    ev.add_argument("--num-candidates", type=int, default=8, help="K visual subgoals scored")
    ev.add_argument("--execute-steps", type=int, default=8, help="actions run per chunk")
    ev.add_argument("--no-visual-subgoal", action="store_true", help="flat: no world model")
    ev.add_argument("--no-language-subgoal", action="store_true", help="instruction as subgoal")


LIGHTNING_VERBS = ("fit", "validate", "test")


def lightning_cli(argv: list[str] | None) -> None:
    """`hybrid fit | validate | test`: LightningCLI over HybridModule and HybridDataModule, with
    omegaconf interpolation in the YAML (`${data.chunk_size}`). argv None reads sys.argv."""
    from lightning.pytorch.cli import LightningCLI

    from hybrid.data.datamodule import HybridDataModule
    from hybrid.module import HybridModule

    LightningCLI(
        HybridModule,
        HybridDataModule,
        args=argv,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] in [[verb] for verb in LIGHTNING_VERBS]:
        lightning_cli(argv)
        return 0
    parser = argparse.ArgumentParser(
        prog="hybrid",
        description=__doc__.splitlines()[0],
        epilog="fit, validate, test: Lightning's CLI, see `hybrid fit --help`",
    )
    subparsers = parser.add_subparsers(dest="verb", required=True)
    _collect_parser(subparsers)
    _eval_parser(subparsers)
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
        elif args.verb == "eval":
            from hybrid.evaluate import evaluate

            evaluate(
                policy=args.policy,
                tasks=args.tasks,
                episodes=args.episodes,
                out=args.out,
                seed=args.seed,
                max_steps=args.max_steps,
                workers=args.workers,
                video=args.video,
                planner={
                    "num_candidates": args.num_candidates,
                    "execute_steps": args.execute_steps,
                    "visual_subgoal": not args.no_visual_subgoal,
                    "language_subgoal": not args.no_language_subgoal,
                },
                console=console,
            )
    except ValueError as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
