"""The accelerator path end to end: `hybrid fit` of the quickstart base, `hybrid finetune` of the
panda adapter, `hybrid export --merge`, then the planner on the device for both robots. Prints wall
times and plan latencies; asserts nothing, but stops with a non-zero exit if a stage fails or if
switching robots or merging changes the actions.

    python benchmarks/gpu_path.py --out outputs/gpu_path           (on a machine with a GPU)
    python benchmarks/gpu_path.py --accelerator cpu --precision 32-true --fit-steps 2 \\
        --finetune-steps 2 --out /tmp/gpu_path                     (a dry run on the CPU)

Needs data/quickstart and data/panda (`make quickstart`, `make finetune` collect them).
Wall times include process start and one validation each.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from timed_cli import run_hybrid

from hybrid.types import Observation
from planners.hierarchical import HybridPlanner

ROBOTS = {  # name -> (cameras, state dim, instruction)
    "panda": (["front"], 7, "push the cube to the red target"),
    "sawyer": (["front", "side"], 4, "push the puck to the goal"),
}


def observation(robot: str) -> Observation:
    cameras, state_dim, _ = ROBOTS[robot]
    rng = np.random.default_rng(0)
    images = {
        f"observation.images.{c}": rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        for c in cameras
    }
    return Observation(images, rng.normal(size=state_dim))


def plan(planner: HybridPlanner, robot: str) -> tuple[np.ndarray, float]:
    """(actions, milliseconds) of one plan from a freshly seeded planner."""
    planner.reset()
    sync = torch.cuda.synchronize if planner.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    actions = planner.plan(observation(robot), ROBOTS[robot][2]).actions
    sync()
    return actions, (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu_path"))
    parser.add_argument("--base-data", default="data/quickstart")
    parser.add_argument("--base-scene-data", default="data/quickstart_scene")
    parser.add_argument("--panda-data", default="data/panda")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--finetune-steps", type=int, default=600)
    args = parser.parse_args()
    base = args.out / "fit" / "policy"

    def train(verb: str, config: str, data: str, steps: int, *model: str) -> float:
        return run_hybrid(
            verb, "--config", config, "--data.root", data, *model,
            "--trainer.accelerator", args.accelerator, "--trainer.precision", args.precision,
            "--trainer.logger", "false", "--trainer.callbacks", "null",
            "--trainer.enable_progress_bar=false", "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(steps),
            "--trainer.default_root_dir", str(args.out / verb),
        )  # fmt: skip

    wall = {
        "fit": train(
            "fit", "configs/quickstart.yaml", args.base_data, args.fit_steps,
            "--model.export_dir", str(base), "--data.scene_root", args.base_scene_data,
        ),
        "finetune": train(
            "finetune", "configs/finetune/panda.yaml", args.panda_data, args.finetune_steps,
            "--model.base_policy", str(base),
        ),
        "export --merge": run_hybrid(
            "export", "--policy", str(base), "--embodiment", "panda", "--merge",
            "--out", str(args.out / "merged"),
        ),
    }  # fmt: skip

    device = "cuda" if args.accelerator == "gpu" else "cpu"
    planner = HybridPlanner.from_pretrained(base, embodiment="panda", device=device)
    plan(planner, "panda")  # warm-up: kernels, allocator
    rows, first = [], {}
    for robot in ("panda", "sawyer", "panda"):
        planner.set_embodiment(robot)
        actions, ms = plan(planner, robot)
        diff = float(np.abs(actions - first[robot]).max()) if robot in first else None
        first.setdefault(robot, actions)
        rows.append((f"plan {robot}", ms, diff))
    merged = HybridPlanner.from_pretrained(args.out / "merged", device=device)
    plan(merged, "panda")
    actions, ms = plan(merged, "panda")
    rows.append(("plan panda, merged export", ms, float(np.abs(actions - first["panda"]).max())))

    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    table = Table(title=f"{args.accelerator} {args.precision}: {name}")
    for column in ("stage", "wall", "max |Δ action| vs first plan of that robot"):
        table.add_column(column)
    for stage, seconds in wall.items():
        table.add_row(stage, f"{seconds:.0f} s", "")
    for stage, ms, diff in rows:
        table.add_row(stage, f"{ms:.1f} ms", "" if diff is None else f"{diff:.1e}")
    Console().print(table)
    worst = max(d for *_, d in rows if d is not None)
    if worst > 1e-4:
        sys.exit(f"switching robots or merging changed the actions by {worst:.1e}")


if __name__ == "__main__":
    main()
