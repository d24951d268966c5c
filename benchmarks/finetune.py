"""Adapting to a new robot with few demonstrations: LoRA fine-tune of a base policy vs the same
budget trained from scratch vs the base with no adaptation, on the panda-gym Franka Panda.
Prints numbers; asserts nothing.

    hybrid collect panda --tasks all --episodes-per-task 20 --out data/panda
    python benchmarks/finetune.py --base outputs/quickstart/policy --data data/panda --steps 600 \
        --readme README.md

(a) `hybrid finetune` (configs/finetune/panda.yaml) from the base, (b) `hybrid fit`
(configs/quickstart.yaml) on the panda data alone for the same steps and batch, (c) the base with
the panda's head rows added (initialised as the mean of the base's rows) and no training. Each is
evaluated closed-loop on every panda task from held-out seeds (--seed), beside doing nothing on
the same task configurations; successes carry 95% Wilson intervals, each condition's difference
from (a) on the same episodes its paired interval, and `--readme` rewrites the README's table
between its `--figure` markers (default `finetune`). Also reported: the share of
parameters the fine-tune trains, the adapter's size on disk, and wall times on this machine.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from ablation import zero_action
from closed_loop import outcomes
from readme import check_figure, report_successes
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file
from timed_cli import run_hybrid

from hybrid.adapters import EmbodimentAdapters, adapter_dir
from hybrid.data.datamodule import HybridDataModule
from hybrid.data.lerobot_dataset import LeRobotDataset
from hybrid.embodiment import EmbodimentSpec
from hybrid.policy import HybridPolicy
from hybrid.sim import panda


def _eval(policy: Path, out: Path, args) -> dict:
    run_hybrid(
        "eval", "--policy", policy, "--embodiment", "panda", "--tasks", "all",
        "--episodes", args.episodes, "--max-steps", args.max_steps, "--seed", args.seed,
        "--out", out,
    )  # fmt: skip
    return json.loads((out / "results.json").read_text())


@torch.no_grad()
def _val_losses(policy: HybridPolicy, data: HybridDataModule) -> dict[str, float]:
    """Every loss of the hierarchy, averaged over the validation episodes (the same held-out
    episodes for every condition: the split is seeded), with fixed flow noise."""
    torch.manual_seed(0)
    policy.eval()
    sums: dict[str, list[float]] = {}
    for batch in data.val_dataloader():
        for name, value in policy.losses(batch).items():
            sums.setdefault(name, []).append(value.item())
    return {name: float(np.mean(values)) for name, values in sums.items() if name != "vae"}


def _numel(path: Path) -> int:
    return sum(t.numel() for t in load_file(path).values())


def _config(source: str, out: Path, run: Path, data: Path, steps: int, **model) -> Path:
    """`source` with this run's data, steps and output folders; logs and checkpoints in `run`."""
    config = yaml.safe_load(Path(source).read_text())
    config["model"].update(model)
    config["data"]["root"] = str(data)
    config["data"]["scene_root"] = None  # the quickstart's second collection is the Sawyer's
    trainer = config["trainer"]
    trainer.update(max_steps=steps, default_root_dir=str(run), logger=False)
    trainer["val_check_interval"] = min(trainer["val_check_interval"], steps)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(run / "checkpoints")
    path = out / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("outputs/quickstart/policy"))
    parser.add_argument("--data", type=Path, default=Path("data/panda"))
    parser.add_argument("--steps", type=int, default=600, help="training steps of (a) and (b)")
    parser.add_argument("--episodes", type=int, default=20, help="eval episodes per task")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the eval configurations")
    parser.add_argument("--max-steps", type=int, default=100, help="eval time limit per episode")
    parser.add_argument("--out", type=Path, default=Path("outputs/finetune_benchmark"))
    parser.add_argument("--readme", help="write the success table into this README")
    parser.add_argument("--figure", default="finetune", help="the README table's marker name")
    parser.add_argument(
        "--reuse", action="store_true", help="evaluate the policies an earlier run left in --out"
    )
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, args.figure)
    console = Console()
    base = args.out / "base"
    demos = len(LeRobotDataset(args.data).episodes)
    if args.reuse:
        previous = json.loads((args.out / "finetune_results.json").read_text())
        wall_lora, wall_scratch = previous["wall_s"]["lora"], previous["wall_s"]["scratch"]
    else:
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        shutil.copytree(args.base, base, ignore=shutil.ignore_patterns("adapters"))
        # (a) LoRA fine-tune from the base
        config = _config(
            "configs/finetune/panda.yaml", args.out, args.out / "lora", args.data, args.steps,
            base_policy=str(base),
        )  # fmt: skip
        wall_lora = run_hybrid("finetune", "--config", config)
        # (b) the same budget from scratch
        config = _config(
            "configs/quickstart.yaml", args.out, args.out / "scratch_run", args.data, args.steps,
            export_dir=str(args.out / "scratch"),
        )  # fmt: skip
        wall_scratch = run_hybrid("fit", "--config", config)
    # (c) the base with the panda's rows, untrained
    data = HybridDataModule(str(args.data), chunk_size=16, future_offset=16)
    data.setup("fit")
    unadapted = HybridPolicy.from_pretrained(base)
    base_params = sum(p.numel() for p in unadapted.parameters())
    unadapted.add_embodiment(
        EmbodimentSpec.from_yaml("configs/embodiment/panda.yaml"), data.norm_stats()
    )
    unadapted.save_pretrained(args.out / "unadapted")

    adapted = EmbodimentAdapters(HybridPolicy.from_pretrained(base), base)
    adapted.activate("panda")
    losses = {
        "(a) LoRA fine-tune of the base": _val_losses(adapted.policy, data),
        "(b) same budget from scratch": _val_losses(
            HybridPolicy.from_pretrained(args.out / "scratch"), data
        ),
        "(c) base, no adaptation": _val_losses(unadapted, data),
    }
    results = {
        "(a) LoRA fine-tune of the base": _eval(base, args.out / "eval_lora", args),
        "(b) same budget from scratch": _eval(
            args.out / "scratch", args.out / "eval_scratch", args
        ),
        "(c) base, no adaptation": _eval(args.out / "unadapted", args.out / "eval_unadapted", args),
    }
    adapter = adapter_dir(base, "panda")
    lora_params = _numel(adapter / "adapter_model.safetensors")
    head_params = _numel(adapter / "embodiment_heads.safetensors")
    adapter_bytes = sum(f.stat().st_size for f in adapter.iterdir())

    tasks = list(next(iter(results.values()))["tasks"])
    counts = {
        name: [summary["tasks"][t]["successes"] for t in tasks] for name, summary in results.items()
    }
    solved = {name: outcomes(summary, tasks) for name, summary in results.items()}
    counts["zero action"], solved["zero action"] = zero_action(
        panda, tasks, args.episodes, args.seed, args.max_steps
    )
    table = report_successes(
        counts, "condition", tasks, args.episodes, args.seed, args.figure, args.readme, None, solved
    )
    console.print(
        f"panda: {demos} demonstrations, {args.steps} steps; success over {args.episodes} "
        f"episodes per task (seed {args.seed}), 95% Wilson; training wall time: LoRA "
        f"{wall_lora:.0f} s, scratch {wall_scratch:.0f} s"
    )
    console.print(table)
    names = list(next(iter(losses.values())))
    val = Table(title="validation losses on held-out panda episodes (lower is better)")
    for column in ("condition", *names):
        val.add_column(column, justify="left" if column == "condition" else "right")
    for name, row in losses.items():
        val.add_row(name, *[f"{row[k]:.3f}" for k in names])
    console.print(val)
    trainable = lora_params + head_params
    console.print(
        f"trainable: {trainable:,} of {base_params + lora_params:,} parameters "
        f"({trainable / (base_params + lora_params):.2%}; LoRA {lora_params:,}, head rows "
        f"{head_params:,}); adapter on disk {adapter_bytes / 2**20:.2f} MiB"
    )
    record = {
        "demonstrations": demos,
        "steps": args.steps,
        "episodes": args.episodes,
        "seed": args.seed,
        "tasks": tasks,
        "successes": counts,
        "val_losses": losses,
        "wall_s": {"lora": wall_lora, "scratch": wall_scratch},
        "trainable_params": trainable,
        "total_params": base_params + lora_params,
        "adapter_bytes": adapter_bytes,
    }
    (args.out / "finetune_results.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
