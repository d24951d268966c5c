"""Reading and writing an expert's JSON config beside its weights; writes are atomic (a temporary
file renamed into place), so an interrupted save never leaves a torn config."""

from __future__ import annotations

import json
import os
from pathlib import Path


def save_config(directory: str | Path, name: str, config: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    tmp.write_text(json.dumps(config, indent=2))
    os.replace(tmp, directory / name)


def load_config(directory: str | Path, name: str, what: str) -> dict:
    """The config `name` in `directory`; FileNotFoundError naming the path and `what` it is for."""
    path = Path(directory) / name
    if not path.is_file():
        raise FileNotFoundError(f"no {what} config at {path}")
    return json.loads(path.read_text())
