"""Benchmarks write their own README tables, so that no figure there is copied by hand.

A table lives between two markers in the README, named after the command that makes it:

    <!-- figure: ablation -->
    | mode | reach | ... |
    <!-- /figure: ablation -->

`write_figure` replaces what lies between them (the markers must already be there).
"""

from pathlib import Path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_figure(readme: str | Path, name: str, markdown: str) -> None:
    """Put `markdown` between the `figure: name` markers of `readme`, atomically."""
    path = Path(readme)
    text = path.read_text()
    begin, end = f"<!-- figure: {name} -->", f"<!-- /figure: {name} -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{path} must hold the markers {begin} and {end} exactly once each")
    head, rest = text.split(begin)
    _, tail = rest.split(end)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{head}{begin}\n{markdown.strip()}\n{end}{tail}")
    tmp.replace(path)
