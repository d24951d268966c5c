"""Resumable training: `--ckpt_path last` means the newest checkpoint on disk, and the end of a
run is always saved.

Lightning's `ModelCheckpoint` writes each file atomically (a temporary file moved into place), but
it writes the periodic checkpoint and `last.ckpt` one after the other, and only on its period: a
run killed between the two writes has a newer step checkpoint than `last.ckpt` (or none at all),
and a run whose last step is not a multiple of the period ends with a stale `last.ckpt`. Here:

- `resolve_resume` turns `last` into the newest `*.ckpt` (by modification time) in the directories
  of the trainer's checkpoint callbacks, and says in one line what it resumes from, or that it
  starts fresh because there is none;
- `FinalCheckpoint` writes `last.ckpt` when training ends, whatever the step.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


def checkpoint_dirs(trainer: L.Trainer) -> list[Path]:
    """The directories the trainer's `ModelCheckpoint` callbacks name (`dirpath`). One without a
    `dirpath` writes under a new logger version on every run, so there is nothing to resume."""
    return [
        Path(callback.dirpath)
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint) and callback.dirpath
    ]


def newest_checkpoint(dirs: list[Path]) -> Path | None:
    """The most recently written `*.ckpt` in `dirs` (`last.ckpt` wins a tie), or None."""
    found = [p for d in dirs if d.is_dir() for p in d.glob("*.ckpt") if p.is_file()]
    if not found:
        return None
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"))


def resolve_resume(ckpt_path: str | None, trainer: L.Trainer) -> tuple[str | None, str | None]:
    """(the checkpoint to resume from, a one-line message) for `ckpt_path`; only `last` changes:
    the newest checkpoint in the trainer's checkpoint directories, or None (start fresh)."""
    if ckpt_path != "last":
        return ckpt_path, None
    dirs = checkpoint_dirs(trainer)
    if not dirs:
        return None, "no ModelCheckpoint(dirpath=...) to resume from: training starts from step 0"
    newest = newest_checkpoint(dirs)
    if newest is None:
        return None, f"no checkpoint in {', '.join(map(str, dirs))}: training starts from step 0"
    return str(newest), f"resuming from {newest} (the newest checkpoint)"


class FinalCheckpoint(Callback):
    """Writes `last.ckpt` in each `ModelCheckpoint(save_last=...)` directory when fit ends, so a
    run that ends between periodic checkpoints can still be resumed or extended from its end."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
                name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
                trainer.save_checkpoint(Path(callback.dirpath) / name, weights_only=False)
