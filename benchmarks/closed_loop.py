"""What the closed-loop benchmarks share: the quickstart's five tasks, and `hybrid eval`'s
rollouts run quietly, their files in a temporary directory, only the summary kept."""

import tempfile
from pathlib import Path

from rich.console import Console

from hybrid.evaluate import evaluate

QUICKSTART = ["reach-v3", "push-v3", "pick-place-v3", "drawer-open-v3", "button-press-topdown-v3"]


def rollouts(policy: str | Path, tasks: list[str], episodes: int, **options) -> dict:
    """`hybrid.evaluate.evaluate`'s summary of `episodes` per task; `options` are its own
    (seed, max_steps, workers, planner, ...)."""
    with tempfile.TemporaryDirectory() as out:
        return evaluate(
            str(policy), tasks, episodes, Path(out), console=Console(quiet=True), **options
        )
