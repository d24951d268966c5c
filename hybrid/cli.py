"""The `hybrid` command: one entry point for every verb of the framework.

hybrid collect metaworld --tasks mt10 --episodes-per-task 5 --out data/mt10
hybrid collect panda --tasks all --episodes-per-task 20 --out data/panda
hybrid fit --config configs/quickstart.yaml     (also validate and test: Lightning's CLI)
hybrid finetune --config configs/finetune/panda.yaml   (LoRA for a new robot; Lightning's CLI)
hybrid export --policy outputs/quickstart/policy --embodiment panda --merge --out outputs/panda
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
    for name, robot, presets in (
        ("metaworld", "Meta-World (MuJoCo) Sawyer", "`mt10`"),
        ("panda", "panda-gym (PyBullet) Franka Panda", "`all`"),
    ):
        sim = sims.add_parser(
            name,
            help=f"{robot} scripted experts -> LeRobot v3 dataset",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sim.add_argument("--tasks", nargs="+", required=True, help=f"task names or {presets}")
        sim.add_argument("--episodes-per-task", type=int, default=10, help="attempts per task")
        sim.add_argument("--out", type=Path, required=True, help="dataset directory")
        sim.add_argument("--image-size", type=int, default=96, help="square camera image side")
        sim.add_argument(
            "--camera", nargs="+", default=None, help="camera names (default: the simulator's)"
        )
        sim.add_argument("--seed", type=int, default=0, help="seed of task configurations")
        sim.add_argument("--workers", type=int, default=2, help="parallel simulator processes")
        sim.add_argument(
            "--keep-failures", action="store_true", help="also store episodes the expert failed"
        )


def _eval_parser(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval",
        help="closed-loop rollouts of a policy in the simulator of its robot",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("--policy", required=True, help="policy directory (exported by `hybrid fit`)")
    ev.add_argument(
        "--embodiment",
        default=None,
        help="the robot (and its adapter) to run; picks the simulator; default the policy's first",
    )
    ev.add_argument("--tasks", nargs="+", required=True, help="task names or a preset")
    ev.add_argument("--episodes", type=int, default=10, help="episodes per task")
    ev.add_argument("--seed", type=int, default=1000, help="seed of the task configurations")
    ev.add_argument("--out", type=Path, default=Path("outputs/eval"), help="results directory")
    ev.add_argument("--max-steps", type=int, default=300, help="time limit per episode")
    ev.add_argument("--workers", type=int, default=2, help="parallel simulator processes")
    ev.add_argument("--video", action="store_true", help="write an MP4 per episode")
    ev.add_argument("--num-candidates", type=int, default=8, help="K visual subgoals scored")
    ev.add_argument("--execute-steps", type=int, default=4, help="actions run per chunk")
    ev.add_argument("--no-visual-subgoal", action="store_true", help="flat: no world model")
    ev.add_argument("--no-language-subgoal", action="store_true", help="instruction as subgoal")


def _export_parser(subparsers) -> None:
    ex = subparsers.add_parser(
        "export",
        help="write a standalone policy for one robot of a policy and its adapters",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ex.add_argument("--policy", required=True, help="base policy directory (with adapters/)")
    ex.add_argument("--embodiment", required=True, help="the robot to export")
    ex.add_argument("--out", type=Path, required=True, help="directory of the exported policy")
    ex.add_argument(
        "--merge",
        action="store_true",
        help="fold the robot's LoRA adapter into the weights (one policy, no peft at run time); "
        "without it the base is copied with only this robot's adapter",
    )


LIGHTNING_VERBS = ("fit", "validate", "test", "finetune")


def lightning_cli(argv: list[str] | None) -> None:
    """`hybrid fit | validate | test`: LightningCLI over HybridModule and HybridDataModule, with
    omegaconf interpolation in the YAML (`${data.chunk_size}`). `hybrid finetune` is `fit` with
    FinetuneModule (LoRA for a new robot on a base policy). argv None reads sys.argv."""
    from lightning.pytorch.cli import LightningCLI

    from hybrid.data.datamodule import HybridDataModule
    from hybrid.module import HybridModule

    argv = list(sys.argv[1:] if argv is None else argv)
    module = HybridModule
    if argv[0] == "finetune":
        from hybrid.finetune import FinetuneModule

        argv[0], module = "fit", FinetuneModule
    LightningCLI(
        module,
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
        epilog="fit, validate, test, finetune: Lightning's CLI, see `hybrid fit --help`",
    )
    subparsers = parser.add_subparsers(dest="verb", required=True)
    _collect_parser(subparsers)
    _eval_parser(subparsers)
    _export_parser(subparsers)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    console = Console()
    try:
        if args.verb == "collect":
            from hybrid.collect import collect

            collect(
                args.simulator,
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
                embodiment=args.embodiment,
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
        elif args.verb == "export":
            from hybrid.export import export

            export(args.policy, args.embodiment, args.out, merge=args.merge, console=console)
    except ValueError as error:
        console.print(f"[red]error:[/] {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
