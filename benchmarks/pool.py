"""Pool paired evaluations: the per-episode outcomes that `ablation.py --out` wrote for several
runs, concatenated mode by mode, each mode's success with its 95% Wilson
interval and its paired difference from a reference mode over all the episodes. Prints numbers;
asserts nothing.

    python benchmarks/pool.py seed1000.json seed2000.json other_policy.json \
        --reference "full (K=8, scored)" --readme README.md --figure pooled

Two runs pool where they are paired within themselves (every mode of a run on the same episodes
and noise) and name their modes alike. A mode that a run names otherwise (an older default under
another name) is renamed for that run alone: `--rename old.json "slow tiers per subgoal" "full
(K=8, scored)"` (renames apply at once, so two modes of one run can swap names). Modes missing
from any run are left out.
"""

import argparse
import json
import sys
from pathlib import Path

from readme import check_figure, show_table
from rich.console import Console

from hybrid.intervals import format_paired_difference, format_rate


def load(path: Path, renames: dict[str, str]) -> dict[str, list[bool]]:
    """A run's outcomes per mode, its modes renamed by `renames` (old -> new)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        sys.exit(f"{path}: cannot read a benchmark's --out JSON ({error})")
    outcomes = record.get("outcomes") if isinstance(record, dict) else None
    if not isinstance(outcomes, dict) or not outcomes:
        sys.exit(f"{path}: no per-episode `outcomes` (written by ablation.py --out since 8d821f3)")
    unknown = sorted(set(renames) - set(outcomes))
    if unknown:
        sys.exit(f"--rename {path}: no mode {unknown[0]!r} there; it has {sorted(outcomes)}")
    renamed = {renames.get(mode, mode): list(map(bool, rows)) for mode, rows in outcomes.items()}
    if len(renamed) != len(outcomes):
        sys.exit(f"--rename {path}: two modes would share a name")
    lengths = {len(rows) for rows in renamed.values()}
    if len(lengths) != 1:
        sys.exit(f"{path}: its modes ran different numbers of episodes {sorted(lengths)}")
    return renamed


def pool(runs: list[dict[str, list[bool]]], reference: str) -> dict[str, list[bool]]:
    """Each mode present in every run, its outcomes concatenated in run order (first run's mode
    order); the reference must be in every run."""
    for i, run in enumerate(runs):
        if reference not in run:
            sys.exit(f"--reference {reference!r}: run {i + 1} has no such mode ({sorted(run)})")
    return {
        mode: [outcome for run in runs for outcome in run[mode]]
        for mode in runs[0]
        if all(mode in run for run in runs)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="--out JSON files of paired runs")
    parser.add_argument("--reference", default="full (K=8, scored)")
    parser.add_argument(
        "--rename",
        nargs=3,
        action="append",
        default=[],
        metavar=("RUN", "OLD", "NEW"),
        help="call mode OLD of the run in file RUN by the name NEW",
    )
    parser.add_argument("--readme", help="rewrite this README's table named by --figure")
    parser.add_argument("--figure", default="pooled", help="the README table's marker name")
    args = parser.parse_args()
    if args.readme:
        check_figure(args.readme, args.figure)
    renames: dict[Path, dict[str, str]] = {}
    for run, old, new in args.rename:
        if Path(run) not in args.runs:
            sys.exit(f"--rename {run}: not one of the runs {[str(r) for r in args.runs]}")
        renames.setdefault(Path(run), {})[old] = new
    pooled = pool([load(run, renames.get(run, {})) for run in args.runs], args.reference)
    first = pooled[args.reference]
    rows = [
        [
            mode,
            str(len(outcomes)),
            format_rate(sum(outcomes), len(outcomes)),
            "-" if mode == args.reference else format_paired_difference(outcomes, first),
        ]
        for mode, outcomes in pooled.items()
    ]
    columns = [
        "mode",
        "episodes",
        "success [95% CI]",
        f"vs {args.reference}: points, paired 95% CI (won / lost)",
    ]
    title = f"{len(args.runs)} runs pooled, episode by episode"
    show_table(Console(), title, columns, rows, readme=args.readme, figure=args.figure)


if __name__ == "__main__":
    main()
