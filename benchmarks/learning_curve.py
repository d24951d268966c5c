"""Closed-loop success against training steps: every chosen checkpoint of a `hybrid fit` run,
exported as that run exports its policy (the weights' moving average), evaluated like `hybrid
eval`, with 95% Wilson intervals. Prints numbers; asserts nothing.

    python benchmarks/learning_curve.py --run outputs/quickstart --steps 300 600 900 1200 \
        --episodes 20 --readme README.md --out outputs/quickstart/learning_curve.json

`--run` is the fit's output directory: its exported `policy/` (which supplies the tokenizer, the
FAST tokenizer and the normalisation, all fixed by the data) and `checkpoints/step=N.ckpt`
(Lightning names them `epoch=E-step=N.ckpt`). `--readme` rewrites the README's table between its
`--figure` markers (default `learning_curve`); the MT10 run's is `mt10_curve`:

    python benchmarks/learning_curve.py --run outputs/mt10 --steps 1000 2000 --tasks mt10 \
        --episodes 20 --readme README.md --figure mt10_curve
"""

import argparse
import tempfile
from pathlib import Path

import torch
from closed_loop import QUICKSTART, rollouts
from readme import check_figure, report_successes
from rich.console import Console

from hybrid.intervals import format_rate
from hybrid.policy import HybridPolicy


def checkpoint_for(run: Path, step: int) -> Path:
    found = sorted(run.glob(f"checkpoints/*step={step}.ckpt"))
    if not found:
        raise FileNotFoundError(f"no checkpoint of step {step} under {run / 'checkpoints'}")
    return found[-1]


def export_checkpoint(policy_dir: Path, checkpoint: Path, out: Path) -> None:
    """The policy as `hybrid fit` would have exported it at that checkpoint."""
    policy = HybridPolicy.from_pretrained(policy_dir)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    weights = {k.removeprefix("policy."): v for k, v in state["state_dict"].items()}
    weights |= state.get("ema") or {}
    policy.load_state_dict(weights, strict=True)
    policy.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--steps", type=int, nargs="+", required=True)
    parser.add_argument("--tasks", nargs="+", default=QUICKSTART)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--readme", help="rewrite this README's table named by --figure")
    parser.add_argument("--figure", default="learning_curve", help="the README table's marker name")
    parser.add_argument("--out", help="write every count to this JSON file")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, args.figure)
    console = Console()
    counts: dict[int, list[int]] = {}
    tasks = args.tasks
    for step in args.steps:
        checkpoint = checkpoint_for(args.run, step)
        with tempfile.TemporaryDirectory() as tmp:
            export_checkpoint(args.run / "policy", checkpoint, Path(tmp) / "policy")
            summary = rollouts(
                Path(tmp) / "policy", tasks, args.episodes, seed=args.seed, workers=args.workers
            )
        tasks = list(summary["tasks"])
        counts[step] = [row["successes"] for row in summary["tasks"].values()]
        rate = format_rate(sum(counts[step]), args.episodes * len(tasks))
        console.print(f"step {step} ({checkpoint.name}): mean success {rate}")
    table = report_successes(
        counts,
        "training steps",
        tasks,
        args.episodes,
        args.seed,
        args.figure,
        args.readme,
        args.out,
    )
    console.print(table)


if __name__ == "__main__":
    main()
