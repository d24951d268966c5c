"""What the closed-loop benchmarks share: the quickstart's five tasks, `hybrid eval`'s rollouts
run quietly, their files in a temporary directory, only the summary kept, and each episode's
outcome in an order that pairs two summaries episode by episode."""

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


def outcomes(summary: dict, tasks: list[str]) -> list[bool]:
    """Each episode's success in `summary`, task by task in the order of `tasks` and episode by
    episode: two summaries of the same tasks, episodes and seed list the same placements in the
    same order, so their outcomes pair up."""
    order = {task: i for i, task in enumerate(tasks)}
    rows = sorted(summary["episodes"], key=lambda row: (order[row["task"]], row["episode"]))
    return [bool(row["success"]) for row in rows]
