"""Loggers of the recipes: TensorBoard with one event file per process for ``fit`` followed by ``test``."""

from __future__ import annotations

import weakref

from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

__all__ = ["TensorBoardLogger"]


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's ``TensorBoardLogger`` that keeps its event file open from ``fit`` to ``test``.

    Lightning's logger closes its ``SummaryWriter`` when ``fit`` ends (``finalize``), and the first metric ``test``
    logs opens a new writer, which starts a second event file in the run's folder: one run, two files. Here
    ``finalize`` flushes everything logged so far (so nothing is lost if the process dies later) and keeps the writer
    open; it is closed when the logger is garbage-collected or the process exits.

    Where ``fit`` and ``test`` run in different processes (the fork and spawn launchers start fresh workers for
    each), each stage's rank 0 still writes its own file; TensorBoard reads all files of a folder as one run.
    """

    _closer: weakref.finalize | None = None

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self._experiment.flush()
            if status != "success":  # a failed or interrupted stage: nothing more will be logged
                self._experiment.close()
                self._experiment = None
            elif self._closer is None:
                self._closer = weakref.finalize(self, self._experiment.close)
        if status == "success":
            self.save()  # hparams.yaml, as Lightning's logger does
