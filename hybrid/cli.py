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
import logging
import os
import re
import sys
import warnings
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
        sim.add_argument(
            "--action-noise",
            type=float,
            default=0.0,
            help="std (action units) of the noise added to what the expert executes, never to "
            "what is stored: demonstrations that show how to come back to the path",
        )
        sim.add_argument(
            "--max-steps",
            type=int,
            default=None,
            help="end an attempt that has not succeeded after this many steps (a failure); "
            "default: the simulator's own episode limit",
        )
        if name == "metaworld":
            sim.add_argument(
                "--task-file",
                type=Path,
                nargs="+",
                default=None,
                help="YAML files of your own task entries, in the format of "
                "hybrid/sim/metaworld_tasks.yaml, read after it",
            )
            sim.add_argument(
                "--start-spread",
                type=float,
                default=0.0,
                help="start the hand up to this far (m) from the task's start pose, per episode",
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
    ev.add_argument(
        "--task-file",
        type=Path,
        nargs="+",
        default=None,
        help="Meta-World: YAML files of your own task entries (as for `hybrid collect`)",
    )
    ev.add_argument("--episodes", type=int, default=10, help="episodes per task")
    ev.add_argument("--seed", type=int, default=1000, help="seed of the task configurations")
    ev.add_argument("--out", type=Path, default=Path("outputs/eval"), help="results directory")
    ev.add_argument("--max-steps", type=int, default=300, help="time limit per episode")
    ev.add_argument("--workers", type=int, default=2, help="parallel simulator processes")
    ev.add_argument("--video", action="store_true", help="write an MP4 per episode")
    ev.add_argument("--num-candidates", type=int, default=8, help="K visual subgoals scored")
    ev.add_argument(
        "--choice",
        choices=["value", "medoid", "central"],
        default="value",
        help="how one of the K is chosen: the value head's best, the candidates' medoid, or the "
        "value head's best among the half nearest the others (planners/scoring.py)",
    )
    ev.add_argument("--execute-steps", type=int, default=4, help="actions run per chunk")
    ev.add_argument("--no-visual-subgoal", action="store_true", help="flat: no world model")
    ev.add_argument("--no-language-subgoal", action="store_true", help="instruction as subgoal")
    ev.add_argument(
        "--action-steps", type=int, help="flow steps of the action expert (the planner's default)"
    )
    ev.add_argument(
        "--imagine-steps", type=int, help="flow steps of the world model (the planner's default)"
    )
    ev.add_argument(
        "--visual-refresh",
        choices=["chunk", "subgoal"],
        default="subgoal",
        help="imagine the visual subgoal only with each new language subgoal (default), or again "
        "every chunk",
    )
    ev.add_argument(
        "--features-refresh",
        choices=["chunk", "subgoal"],
        default="subgoal",
        help="run the VLM's prefix pass only with each new language subgoal (default), or again "
        "every chunk",
    )
    ev.add_argument(
        "--reached-fraction",
        type=float,
        default=None,
        help="also end a language subgoal once the frame has closed all but this share of its "
        "distance to the subgoal's imagined target (0.5: half); encodes the frame every chunk. "
        "Default: the time-out alone",
    )
    ev.add_argument(
        "--privileged-scene",
        action="store_true",
        help="give the action expert the true object and goal positions (a policy trained with "
        "action_expert.scene_input): what perfect perception would give, a diagnosis",
    )
    ev.add_argument(
        "--async-delay",
        type=int,
        default=0,
        help="plan each chunk in the background, this many steps ahead (0: synchronous)",
    )
    ev.add_argument(
        "--compile",
        action="store_true",
        help="compile the policy's inference API with torch.compile: faster chunks after "
        "minutes of compiling in each worker",
    )


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
PACKAGES = tuple(
    Path(__file__).resolve().parents[1] / name for name in ("hybrid", "experts", "planners")
)


def _lightning_cli_class():
    from lightning.pytorch.cli import LightningCLI

    from hybrid.checkpoints import resolve_resume

    class HybridCLI(LightningCLI):
        """LightningCLI whose `--ckpt_path last` is the newest checkpoint on disk, or a fresh
        start when there is none, said in one line either way (`hybrid.checkpoints`)."""

        def before_fit(self) -> None:
            config = self.config_init[self.subcommand]
            path, message = resolve_resume(config.get("ckpt_path"), self.trainer)
            config["ckpt_path"] = path
            if message and self.trainer.is_global_zero:
                print(message, file=sys.stderr)

    return HybridCLI


class _DropLightningNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "litlogger" not in message and not re.match(r"[GTH]PU available: ", message)


def _quiet_lightning() -> None:
    """Messages of Lightning's that a user can neither act on nor avoid, each filtered by its own
    text and source, nothing else: the advertisement for its cloud logger and the accelerators it
    found (GPU, TPU, HPU available: ..., logged at INFO on every run; the accelerator a run uses
    is in its config, and Lightning's warning for an idle GPU stays), and a deprecation inside
    Lightning's own pytree helper (its fix is Lightning's)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningNoise())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def lightning_cli(argv: list[str]) -> None:
    """`hybrid fit | validate | test`: LightningCLI over HybridModule and HybridDataModule, with
    omegaconf interpolation in the YAML (`${data.chunk_size}`). `hybrid finetune` is `fit` with
    FinetuneModule (LoRA for a new robot on a base policy). argv: the arguments after `hybrid`."""
    from hybrid.checkpoints import FinalCheckpoint
    from hybrid.data.datamodule import HybridDataModule
    from hybrid.module import HybridModule
    from hybrid.plots import LossCurves

    module, args = HybridModule, list(argv)
    if args[0] == "finetune":
        from hybrid.finetune import FinetuneModule

        args[0], module = "fit", FinetuneModule
    if args == sys.argv[1:]:
        args = None  # Lightning reads the command line, as DDP's launcher does in each process
    else:
        # Lightning warns when `args` is given while sys.argv holds arguments too, against
        # mixing the two by mistake; here `args` is the whole command (`finetune` rewritten as
        # `fit`, or `--debug` taken out), so the warning says nothing to act on.
        warnings.filterwarnings(
            "ignore", message="LightningCLI's args parameter", module=r"lightning\.pytorch\.cli"
        )
    _quiet_lightning()
    _lightning_cli_class()(
        module,
        HybridDataModule,
        args=args,
        # a bad key or value raises (one line below) instead of printing the whole usage
        parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        trainer_defaults={"callbacks": [FinalCheckpoint(), LossCurves()]},
    )


def _raised_here(error: BaseException) -> bool:
    """Whether `error` was raised by this project's code (its innermost frame is in one of the
    packages), as opposed to a library's or Python's own."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(path.is_relative_to(package) for package in PACKAGES)


def _one_line(verb: str, error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    return f"hybrid {verb}: {message}"


def _run(args: argparse.Namespace, console: Console) -> None:
    if getattr(args, "task_file", None):
        from hybrid.sim.metaworld import use_task_files

        use_task_files(args.task_file)
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
            start_spread=getattr(args, "start_spread", 0.0),
            action_noise=args.action_noise,
            max_steps=args.max_steps,
        )
    elif args.verb == "eval":
        from hybrid.evaluate import evaluate
        from planners.schedule import RefreshSchedule

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
                "choice": args.choice,
                "execute_steps": args.execute_steps,
                # None: on where the policy has a world model (the flat VLA has none)
                "visual_subgoal": False if args.no_visual_subgoal else None,
                "language_subgoal": not args.no_language_subgoal,
                "async_delay": args.async_delay,
                "schedule": RefreshSchedule(
                    visual=args.visual_refresh,
                    features=args.features_refresh,
                    reached_fraction=args.reached_fraction,
                ),
                "compile": "inductor" if args.compile else None,
            }
            | {
                name: steps
                for name, steps in (
                    ("action_steps", args.action_steps),
                    ("imagine_steps", args.imagine_steps),
                )
                if steps is not None
            },
            console=console,
            privileged_scene=args.privileged_scene,
        )
    elif args.verb == "export":
        from hybrid.export import export

        export(args.policy, args.embodiment, args.out, merge=args.merge, console=console)


def main(argv: list[str] | None = None) -> int:
    """Run one verb. An error the project raises (a bad value, a missing or corrupt file) ends it
    with one line on stderr and exit status 2; `--debug` (or HYBRID_DEBUG=1) re-raises it with its
    traceback. Errors from elsewhere keep their traceback: they are bugs to report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("HYBRID_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    verb = argv[0] if argv else ""
    try:
        if verb in LIGHTNING_VERBS:
            lightning_cli(argv)
            return 0
        parser = argparse.ArgumentParser(
            prog="hybrid",
            description=__doc__.splitlines()[0],
            epilog="fit, validate, test, finetune: Lightning's CLI, see `hybrid fit --help`; "
            "--debug (any verb): show the traceback of an error",
        )
        subparsers = parser.add_subparsers(dest="verb", required=True)
        _collect_parser(subparsers)
        _eval_parser(subparsers)
        _export_parser(subparsers)
        _run(parser.parse_args(argv), Console())
    except argparse.ArgumentError as error:  # Lightning's CLI: a config key or value it refuses
        if debug:
            raise
        print(f"{_one_line(verb, error)} (see `hybrid {verb} --help`)", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError, FloatingPointError) as error:
        if debug or not _raised_here(error):
            raise
        print(_one_line(verb, error), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
