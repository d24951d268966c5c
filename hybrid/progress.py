"""The training progress bar: one bar over the whole run, `steps done / max_steps`, with the losses
and the time left. Lightning's own counts batches per epoch and reads `Epoch 5/-2` when training
is bounded by steps, as every config here is. In the YAML: `hybrid.progress.StepProgressBar`.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """RichProgressBar counting optimiser steps against `max_steps`, on one bar that is never
    reset between epochs (so its elapsed time, speed and time left are the run's), without the
    logger's version number among the metrics. Without a step bound it is Lightning's own."""

    def _by_steps(self, trainer: L.Trainer) -> bool:
        return trainer.max_steps > 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._by_steps(trainer):
            super().on_train_epoch_start(trainer, pl_module)
        elif self.train_progress_bar_id is None and self.progress is not None:
            self.train_progress_bar_id = self._add_task(trainer.max_steps, "training steps")
            self.progress.update(self.train_progress_bar_id, completed=trainer.global_step)
            self.refresh()

    def _update(self, progress_bar_id, current: int, visible: bool = True, hard: bool = False):
        # Lightning passes the batch index within the epoch; the bar counts the run's steps
        if progress_bar_id == self.train_progress_bar_id and self._by_steps(self.trainer):
            current = self.trainer.global_step
        super()._update(progress_bar_id, current, visible, hard)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
