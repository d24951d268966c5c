"""Saved policies, adapters and records on disk: written atomically (a temporary file or folder
renamed into place), so an interrupted save never leaves a torn JSON file or a half-written
directory; read with errors that name the file that cannot be read (`SavedFileError`), rather
than a library's message that names none. (Each expert's own config is its `__init__` signature,
saved and loaded by diffusers' `ConfigMixin`.)"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SavedFileError(ValueError):
    """A saved policy's or adapter's file that is missing, corrupt or foreign; names the file."""


def check_files(path: str | Path, fix: str) -> None:
    """Read every JSON file and every safetensors header at `path` (a file, or a folder and all
    below it; headers only: a truncated or random weights file fails here) and raise
    SavedFileError naming the first that cannot be read, with `fix`, what to do about it."""
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    for file in sorted(root.rglob("*")) if root.is_dir() else [root]:
        try:
            if file.suffix == ".json":
                json.loads(file.read_text())
            elif file.suffix == ".safetensors":
                with safe_open(file, "pt"):
                    pass
        except (ValueError, OSError, SafetensorError) as error:  # JSONDecodeError is a ValueError
            raise SavedFileError(f"cannot read {file} ({error}); {fix}") from error


def write_json(directory: str | Path, name: str, record: dict) -> None:
    """`record` as `directory`/`name`, written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, directory / name)


def read_json(
    directory: str | Path,
    name: str,
    what: str,
    fix: str = "re-export the policy (`hybrid fit` or `hybrid export`)",
) -> dict:
    """The JSON file `name` in `directory`; SavedFileError naming the path, `what` it is for and
    `fix`, what to do about it."""
    path = Path(directory) / name
    if not path.is_file():
        raise SavedFileError(f"no {what} config at {path}; {fix}")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as error:
        raise SavedFileError(f"cannot read {path} (the {what} config: {error}); {fix}") from error


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a sibling temporary folder to fill. When the block ends normally it replaces
    `directory` (the old one is removed after the swap); on an error it is removed and `directory`
    stays as it was. The result gets the permissions the umask gives new files and folders (a
    temporary folder, and safetensors' own temporary files, would be private to the user)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask(root: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for folder, subfolders, files in os.walk(root):
        for name in subfolders:
            os.chmod(os.path.join(folder, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)
