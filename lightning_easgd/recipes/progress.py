"""A TQDM progress bar that shows training metrics without a host synchronisation on every step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

__all__ = ["MetricsProgressBar"]


class MetricsProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar, plus chosen logged metrics that are read only when the bar refreshes.

    ``self.log(..., prog_bar=True)`` in ``training_step`` costs a host synchronisation on every step on a GPU:
    Lightning 2.6 converts every progress-bar value to a Python number at the end of each batch
    (``_LoggerConnector.on_batch_end`` -> ``_ResultCollection.metrics`` -> ``convert_tensors_to_scalars``), however
    rarely the bar is redrawn. Log the metric without ``prog_bar`` and name it here instead: the bar reads it from
    ``trainer.callback_metrics`` every ``refresh_rate`` batches.

    Args:
        metrics: Names in ``trainer.callback_metrics`` to show, e.g. ``"train/loss_step"`` for a metric logged as
            ``"train/loss"`` with ``on_step=True, on_epoch=True``; names not logged (yet) are left out.
        refresh_rate: Redraw (and read the metrics) every this many batches.
        process_position: As for ``TQDMProgressBar``.
        leave: As for ``TQDMProgressBar``.
    """

    def __init__(
        self, metrics: Sequence[str] = (), refresh_rate: int = 1, process_position: int = 0, leave: bool = False
    ) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if isinstance(metrics, str):
            raise TypeError(f"metrics must be a sequence of metric names, got the string {metrics!r}")
        self.metrics = tuple(metrics)

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        logged = trainer.callback_metrics if self.metrics else {}
        for name in self.metrics:
            if name in logged:
                items[name] = logged[name].item()  # the one host read, once per refresh
        return items
