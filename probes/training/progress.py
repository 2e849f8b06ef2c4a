"""The training progress bar, worded for this project.

Lightning's default bar shows ``Epoch 0/7`` (zero-based, and meaningless for a closed-form fit
that stops after one pass), the logger's run id, and every progress-bar metric under its full
logging key, so three tasks' ``train/<task>/loss_step`` and ``loss_epoch`` became six truncated
lines under the bar. This one says ``epoch 1/8`` (or ``one pass``), drops the run id, and shows one
short loss per task (the modules log it under the task's name, for the bar only). It is a tqdm
bar, like the generation and labelling bars, and needs nothing beyond tqdm.
"""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


def epoch_description(trainer: pl.Trainer, module: pl.LightningModule | None) -> str:
    """``epoch 3/8, train loss per task`` (one-based), or ``one pass ...`` for modules fitted in a single pass."""
    if getattr(module, "one_pass", False):
        return "one pass over the train split"
    total = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
    return f"epoch {trainer.current_epoch + 1}" + (f"/{total}" if total else "") + ", train loss per task"


class ProbeProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` with the wording of the module docstring (same arguments)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(epoch_description(trainer, trainer.lightning_module))

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)   # the logger's run id: noise next to the losses
        return items
