"""Wall-clock time logging, so the center's error can be plotted against time as in the paper's figures."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["WallClockLogger"]


class WallClockLogger(Callback):
    """Log training wall-clock time next to every validation result.

    At the end of each validation run (sanity checks excluded) it logs ``time/train_s``, the seconds spent
    training since ``fit`` started *excluding* validation, and ``time/elapsed_s``, the seconds including it.
    They land in the same logger row as ``val/acc``, which is what ``python -m lightning_easgd.recipes.plot`` reads.
    The slowest rank's time is logged (one scalar all-reduce per validation). Both clocks are saved in
    checkpoints and continue when a run is resumed.
    """

    def __init__(self) -> None:
        self.train_s = 0.0
        self.elapsed_s = 0.0
        self._segment_start: float | None = None
        self._last_mark: float | None = None

    def _tick(self) -> float:
        now = time.perf_counter()
        if self._last_mark is not None:
            self.elapsed_s += now - self._last_mark
        self._last_mark = now
        return now

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start both clocks."""
        self._last_mark = None
        self._segment_start = self._tick()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Pause the training clock."""
        if self._segment_start is not None and not trainer.sanity_checking:
            self.train_s += self._tick() - self._segment_start
            self._segment_start = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the clocks with the validation metrics."""
        if trainer.sanity_checking or self._last_mark is None:
            return
        self._tick()
        pl_module.log("time/train_s", self.train_s, sync_dist=True, reduce_fx="max")
        pl_module.log("time/elapsed_s", self.elapsed_s, sync_dist=True, reduce_fx="max")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resume the training clock."""
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and not trainer.sanity_checking and self._segment_start is None and self._last_mark is not None:
            self._segment_start = self._tick()

    def state_dict(self) -> dict[str, Any]:
        """Clocks so far (plain floats, loadable with ``weights_only=True``)."""
        return {"train_s": self.train_s, "elapsed_s": self.elapsed_s}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue counting from a checkpoint's clocks."""
        self.train_s = float(state_dict["train_s"])
        self.elapsed_s = float(state_dict["elapsed_s"])
