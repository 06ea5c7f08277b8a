"""Shared DataLoader plumbing for the recipe DataModules."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset


class ClassificationDataModule(pl.LightningDataModule):
    """Holds train/val/test datasets built in ``setup`` and serves them with one DataLoader policy.

    No sampler is set here: under a distributed strategy Lightning injects a ``DistributedSampler`` that shards
    the training set across workers (and the evaluation sets across ranks, which is fine because under EASGD
    every rank evaluates the same center).

    Args:
        batch_size: Mini-batch size per worker for training (the paper uses 128).
        eval_batch_size: Mini-batch size for validation and test; defaults to ``batch_size``.
        num_workers: DataLoader worker processes per training process.
        pin_memory: Pin host memory (useful with GPUs).
    """

    def __init__(self, batch_size: int, eval_batch_size: int | None, num_workers: int, pin_memory: bool) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be None or >= 1, got {eval_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, dataset: Dataset | None, split: str, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"the {split} dataset is not set up; call setup() first (the Trainer does)")
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches of ``batch_size``."""
        return self._loader(self.train_set, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches of ``eval_batch_size``, in order."""
        return self._loader(self.val_set, "validation", train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches of ``eval_batch_size``, in order."""
        return self._loader(self.test_set, "test", train=False)
