"""Callbacks for recovery tests, added with Hydra `+callbacks` overrides: kill a worker once, say where fit starts."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L


class KillOnce(L.Callback):
    """SIGKILL global rank ``rank`` before optimizer step ``step``, in the first attempt of a torchrun job only."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class ReportStart(L.Callback):
    """Print, on global rank 0, where fit starts: the epoch and optimizer step a resumed run continues from."""

    def on_train_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.is_global_zero:
            print(f"fit starts at epoch {trainer.current_epoch}, step {trainer.global_step}", flush=True)
