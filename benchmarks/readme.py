"""Benchmarks write their own README tables, so that no figure there is copied by hand.

A table lives between two markers in the README, named after the command that makes it:

    <!-- figure: ablation -->
    | mode | reach | ... |
    <!-- /figure: ablation -->

`write_figure` replaces what lies between them (the markers must already be there).
"""

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hybrid.intervals import format_paired_difference, format_rate


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def show_table(
    console: Console,
    title: str,
    header: list[str],
    rows: list[list[str]],
    left: int = 1,
    readme: str | Path | None = None,
    figure: str | None = None,
) -> None:
    """Print `rows` under `header` (the first `left` columns aligned left, the figures right)
    and, given `readme`, write them there as its `figure` table."""
    table = Table(title=title)
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if readme:
        write_figure(readme, figure, markdown_table(header, rows))
        console.print(f"updated the `{figure}` table in {readme}")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- figure: {name} -->", f"<!-- /figure: {name} -->"


def _markers_error(text: str, readme: str | Path, name: str) -> str | None:
    """What is wrong with `readme`'s markers of `name`, given its `text`; None if nothing."""
    begin, end = _markers(name)
    if text.count(begin) != 1 or text.count(end) != 1:
        return f"{readme} must hold the markers {begin} and {end} exactly once each"
    return None


def check_figure(readme: str | Path, name: str) -> None:
    """Stop the script now, in one line, before a long benchmark runs, where `readme` lacks the
    `figure: name` markers."""
    if not Path(readme).is_file():
        sys.exit(f"--readme {readme} is not a file")
    error = _markers_error(Path(readme).read_text(), readme, name)
    if error:
        sys.exit(f"{error}: add them where the table goes, or drop --readme")


def write_figure(readme: str | Path, name: str, markdown: str) -> None:
    """Put `markdown` between the `figure: name` markers of `readme`, atomically."""
    path = Path(readme)
    text = path.read_text()
    error = _markers_error(text, path, name)
    if error:
        raise ValueError(error)
    begin, end = _markers(name)
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{head}{begin}\n{markdown.strip()}\n{end}{tail}")
    tmp.replace(path)


def report_successes(
    counts: dict,
    first_column: str,
    tasks: list[str],
    episodes: int,
    seed: int,
    figure: str,
    readme: str | None = None,
    out: str | None = None,
    outcomes: dict | None = None,
) -> str:
    """The success table (one row per key of `counts`: successes per task, then the pooled mean,
    each with its 95% Wilson interval) as markdown; written to `readme` as `figure` and to `out`
    as JSON when those are given. With `outcomes` (each row's per-episode successes, on the same
    episodes in the same order), a last column gives each row's difference from the first row,
    in points, with its paired 95% interval and the episodes only it and only the first solved."""
    header = [first_column, *(t.removesuffix("-v3") for t in tasks), "mean"]
    rows = [
        [str(label), *(format_rate(c, episodes) for c in per_task)]
        + [f"**{format_rate(sum(per_task), episodes * len(tasks))}**"]
        for label, per_task in counts.items()
    ]
    if outcomes:
        first = outcomes[next(iter(counts))]
        header.append("vs first row: points, paired 95% CI (won / lost)")
        for row, label in zip(rows[1:], list(counts)[1:], strict=True):
            row.append(format_paired_difference(outcomes[label], first))
        rows[0].append("-")
    table = markdown_table(header, rows)
    if out:  # first: the counts outlive a README that refuses the table
        record = {"episodes": episodes, "seed": seed, "tasks": tasks, "successes": counts}
        if outcomes:
            record["outcomes"] = {str(k): [int(x) for x in v] for k, v in outcomes.items()}
        Path(out).write_text(json.dumps(record, indent=2))
    if readme:
        write_figure(readme, figure, table)
    return table
