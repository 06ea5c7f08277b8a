"""Launching training in tests: in-process multi-worker fits with the fork launcher, and the seed they share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from helpers.instruments import Recorder
from lightning_easgd import EASGDStrategy

SEED = 7
"""The seed of every toy run; conftest sets PL_GLOBAL_SEED to it (the DistributedSampler's seed the replay mirrors)."""
REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO.parent / "shared" / "data"


def loaders(dataset: Any, batch_size: int) -> tuple[DataLoader, DataLoader]:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True), DataLoader(dataset, batch_size=batch_size)


def fit_fork(
    module: L.LightningModule,
    dataset: Any,
    out: Path,
    *,
    p: int,
    epochs: int,
    batch_size: int,
    strategy: EASGDStrategy | None = None,
    callbacks: list[L.Callback] | None = None,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[L.Trainer, list[dict[str, Any]]]:
    """Fit with ``p`` forked CPU workers; returns the trainer and every rank's Recorder record."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.pt"):
        old.unlink()
    trainer_kwargs.setdefault("logger", False)
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=p,
        strategy=strategy or EASGDStrategy(start_method="fork"),
        max_epochs=epochs,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
        callbacks=[Recorder(out), *(callbacks or [])],
        **trainer_kwargs,
    )
    train, val = loaders(dataset, batch_size)
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    records = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(p)]
    return trainer, records
