"""The training progress bar: one bar over the whole run, `steps done / max_steps`, with the losses
and the time left. Lightning's own counts batches per epoch and reads `Epoch 5/-2` when training
is bounded by steps, as every config here is. In the YAML: `hybrid.progress.StepProgressBar`.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """RichProgressBar counting optimiser steps against `max_steps` (epochs when no step bound is
    set), without the logger's version number among the metrics."""

    def _by_steps(self, trainer: L.Trainer) -> bool:
        return trainer.max_steps > 0 and self.progress is not None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._by_steps(trainer) and self.train_progress_bar_id is not None:
            self.progress.update(
                self.train_progress_bar_id,
                total=trainer.max_steps,
                completed=trainer.global_step,
                description="training steps",
            )
            self.refresh()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._by_steps(trainer):
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
            self.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
