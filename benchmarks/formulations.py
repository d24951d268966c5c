"""The world-action-model formulations on equal footing: every config under
`configs/formulation/` trained by `hybrid fit` on the same data, for the same steps, from the
same seed, then evaluated closed loop on the same task configurations. Prints numbers; asserts
nothing.

    python benchmarks/formulations.py --data data/quickstart --scene-data data/quickstart_scene \
        --steps 1000 --episodes 20 --readme README.md

One row per formulation, with its two axes named (what the model predicts, how actions enter):
success per task and pooled, each with its 95% Wilson interval; planning time per chunk,
amortised, from the same closed-loop evaluation (`--workers` workers, one torch thread each,
so it compares only within the table); training time per step (the fit's wall time over its
steps, start-up, validation and export included, one process on this machine); parameters of
the exported policy. Each fit stacks the formulation's file on `--base-configs` (the quickstart's,
as the README's commands do; add configs/experiment/mt10.yaml and `--tasks mt10` for the
benchmark tier), then this run's data, steps and folders; runs, policies and `formulations.json`
go to `--out`, and `--readme` rewrites the README's `formulations` table. Rows of formulations
not named in `--formulations` stay as an earlier run of the same comparison (same steps, episodes,
seed and tasks) left them in `--out`'s `formulations.json`, so a new formulation adds its row:

    python benchmarks/formulations.py --formulations joint --data data/quickstart \
        --scene-data data/quickstart_scene --steps 1000 --episodes 20 --readme README.md

`--reuse-fits` evaluates the policies an earlier run of the same comparison left in `--out`
again, keeping their training time, and fits only those it lacks: for a change to planning.
"""

import argparse
import json
import shutil
from pathlib import Path

import yaml
from closed_loop import QUICKSTART, rollouts
from readme import check_figure, show_table
from rich.console import Console
from timed_cli import run_hybrid

from hybrid.intervals import format_rate
from hybrid.policy import HybridPolicy
from hybrid.sim import metaworld

ROOT = Path(__file__).parents[1]
FORMULATIONS = ROOT / "configs" / "formulation"
# (what the model predicts, how actions enter) per formulation file; the README's table says why
AXES = {
    "hierarchical": (
        "language subgoal, K futures scored, actions",
        "tokens conditioned on the chosen future",
    ),
    "flat_vla": ("actions only", "tokens beside the VLM's prefix"),
    "inverse_dynamics": (
        "K futures scored, then the actions that lead there",
        "tokens conditioned on the frames and the chosen future only",
    ),
    "representation": (
        "the future in training only",
        "tokens conditioned on the world model's features",
    ),
    "joint": (
        "K (future, actions) pairs denoised together, scored",
        "tokens beside noisy future tokens in one transformer",
    ),
    "latent_plan": (
        "a latent plan of the window, never decoded",
        "tokens conditioned on plan tokens from a prior",
    ),
    "latent_frame_actions": (
        "K (future, actions) pairs denoised together, scored",
        "latent frames of the world model, one step per patch",
    ),
}


def run_config(run: Path, data: Path, scene_data: Path | None, steps: int) -> Path:
    """The settings this benchmark gives every fit alike, as a third config file: data, steps,
    and the run's own folders (no loggers; checkpoints under `run`)."""
    config = {
        "model": {"export_dir": str(run / "policy")},
        "data": {"root": str(data), "scene_root": str(scene_data) if scene_data else None},
        "trainer": {
            "max_steps": steps,
            "val_check_interval": min(250, steps),
            "default_root_dir": str(run),
            "logger": False,
            "callbacks": [
                {"class_path": "hybrid.progress.StepProgressBar"},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True},
                },
            ],
        },
    }
    path = run / "benchmark.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    known = sorted(p.stem for p in FORMULATIONS.glob("*.yaml"))
    parser.add_argument("--formulations", nargs="+", choices=known, default=known)
    parser.add_argument(
        "--base-configs", nargs="+", type=Path, default=[ROOT / "configs" / "quickstart.yaml"]
    )
    parser.add_argument("--data", type=Path, default=Path("data/quickstart"))
    parser.add_argument(
        "--scene-data", type=Path, help="frames for the scene estimator alone (data.scene_root)"
    )
    parser.add_argument("--steps", type=int, default=1000, help="training steps of every fit")
    parser.add_argument("--tasks", nargs="+", default=QUICKSTART)
    parser.add_argument("--episodes", type=int, default=20, help="eval episodes per task")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the eval configurations")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("outputs/formulations"))
    parser.add_argument("--readme", help="rewrite this README's `formulations` table")
    parser.add_argument(
        "--reuse-fits", action="store_true", help="evaluate the policies in --out again, no fit"
    )
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, "formulations")
    for path in args.base_configs:
        if not path.is_file():
            parser.error(f"--base-configs: {path} is not a file")
    for path in (args.data, args.scene_data):
        if path is not None and not (path / "meta" / "info.json").is_file():
            parser.error(f"{path} is not a dataset (no meta/info.json); collect it first")
    tasks = metaworld.resolve_tasks(args.tasks)
    console = Console()
    record = {"steps": args.steps, "episodes": args.episodes, "seed": args.seed, "tasks": tasks}
    saved = args.out / "formulations.json"
    results, earlier = {}, {}
    if saved.is_file():  # the rows of an earlier run of the same comparison stay
        runs = json.loads(saved.read_text())
        if {key: runs.get(key) for key in record} == record:
            earlier = runs["runs"]
            results = {k: v for k, v in earlier.items() if k not in args.formulations}
    for name in args.formulations:
        run = args.out / name
        policy = run / "policy"
        if args.reuse_fits and name in earlier and policy.is_dir():
            wall = earlier[name]["s_per_step"] * args.steps
        else:
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            configs = [*args.base_configs, FORMULATIONS / f"{name}.yaml"]
            # the scene data trains an action expert's scene estimator: none without one
            experts = yaml.safe_load(configs[-1].read_text())["model"].get("experts", {})
            scene = None if experts.get("action_expert") is False else args.scene_data
            configs.append(run_config(run, args.data, scene, args.steps))
            wall = run_hybrid("fit", *(a for path in configs for a in ("--config", path)))
        summary = rollouts(
            policy, tasks, args.episodes, seed=args.seed, max_steps=args.max_steps,
            workers=args.workers,
        )  # fmt: skip
        results[name] = {
            "successes": {t: summary["tasks"][t]["successes"] for t in tasks},
            "ms_per_chunk": summary["amortised_ms_per_chunk"],
            "s_per_step": wall / args.steps,
            "parameters": sum(p.numel() for p in HybridPolicy.from_pretrained(policy).parameters()),
        }
        console.print(f"{name}: {results[name]}")
        saved.write_text(json.dumps(record | {"runs": results}))
    header = ["formulation", "predicts", "actions enter as"]
    header += [t.removesuffix("-v3") for t in tasks]
    header += ["mean", "ms per chunk", "s per training step", "parameters"]
    rows = []
    for name, result in results.items():
        counts = list(result["successes"].values())
        rows.append(
            [f"`{name}`", *AXES.get(name, ("-", "-"))]
            + [format_rate(c, args.episodes) for c in counts]
            + [f"**{format_rate(sum(counts), args.episodes * len(tasks))}**"]
            + [f"{result['ms_per_chunk']:.1f}", f"{result['s_per_step']:.2f}"]
            + [f"{result['parameters'] / 1e6:.2f} M"]
        )
    title = f"formulations, {args.steps} steps each, {args.episodes} episodes per task"
    show_table(console, title, header, rows, left=3, readme=args.readme, figure="formulations")


if __name__ == "__main__":
    main()
