"""Image classification LightningModule used by the recipes (and reusable with any ``nn.Module`` backbone)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["ImageClassifier", "LRSchedulerSpec"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], Optimizer]
SchedulerFactory = Callable[[Optimizer], LRScheduler | ReduceLROnPlateau]


@dataclass(frozen=True)
class LRSchedulerSpec:
    """A learning-rate scheduler factory plus how Lightning should step it.

    Kept together because they belong together: a plateau scheduler is meaningless without the metric it
    watches, and an epoch-based schedule stepped per batch silently runs far too fast.

    Args:
        scheduler: Factory taking the optimizer (Hydra ``_partial_: true``).
        interval: Step it every ``"epoch"`` or every ``"step"``.
        frequency: Step it every ``frequency`` intervals.
        monitor: Logged metric passed to a ``ReduceLROnPlateau`` scheduler (e.g. ``"train/loss_epoch"``);
            required for those and rejected for the others, checked when the optimizer is built.
    """

    scheduler: SchedulerFactory
    interval: Literal["epoch", "step"] = "epoch"
    frequency: int = 1
    monitor: str | None = None

    def __post_init__(self) -> None:
        if self.interval not in ("epoch", "step"):
            raise ValueError(f"interval must be 'epoch' or 'step', got {self.interval!r}")
        if self.frequency < 1:
            raise ValueError(f"frequency must be >= 1, got {self.frequency}")

    def build(self, optimizer: Optimizer) -> dict[str, Any]:
        """Create the scheduler and return Lightning's lr-scheduler config dict for it."""
        scheduler = self.scheduler(optimizer)
        is_plateau = isinstance(scheduler, ReduceLROnPlateau)
        if is_plateau != (self.monitor is not None):
            raise ValueError(
                f"monitor={self.monitor!r} does not fit {type(scheduler).__name__}: plateau schedulers need the "
                "name of a logged metric (e.g. 'train/loss_epoch'), other schedulers must have monitor=None"
            )
        config: dict[str, Any] = {"scheduler": scheduler, "interval": self.interval, "frequency": self.frequency}
        if self.monitor is not None:
            config["monitor"] = self.monitor
        return config


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier with top-1/top-5 accuracy, built from Hydra ``_partial_`` factories.

    The optimizer is the *local* optimizer of each EASGD worker: plain SGD gives EASGD, SGD with Nesterov
    momentum 0.99 gives EAMSGD. Weight decay (L2, as in the paper) is the optimizer's ``weight_decay``.
    Validation and test run on whatever weights the strategy installs; with ``EASGDStrategy`` that is the
    center variable, so ``val/*`` and ``test/*`` are the center's metrics, while ``train/*`` are the workers'.

    Training metrics are accumulated in torchmetrics objects that synchronise across processes only when an
    epoch ends: the per-step values (``train/loss_step``) are the local worker's, the epoch values
    (``train/loss_epoch``) are averaged over all workers. A per-step all-reduce would put a barrier on every
    step and undo the communication savings EASGD is for; the epoch average is identical on every rank, so a
    scheduler monitoring it takes the same decision on every worker.

    No training step waits for the device: the metrics accumulate on it; the loss means skip torchmetrics' NaN
    check (``nan_strategy="disable"``), whose ``if nans.any()`` is a host synchronisation on every update, so a
    NaN loss shows as a NaN ``train/loss`` instead of being dropped with a warning; and ``train/loss`` is not
    logged with ``prog_bar=True``, which Lightning turns into a Python number after every batch. Values reach
    the host only when Lightning writes the logs (every ``log_every_n_steps``) and when a
    :class:`~lightning_easgd.recipes.progress.MetricsProgressBar` redraws (the recipes show ``train/loss`` there).

    Args:
        net: The network mapping images to logits.
        optimizer: ``functools.partial``-style factory taking the parameters (Hydra ``_partial_: true``).
        num_classes: Number of classes, for the accuracy metrics.
        lr_scheduler: Optional scheduler factory and stepping policy; ``None`` keeps the learning rate constant
            (the paper's CIFAR-10 runs).
        top_k: The second accuracy reported besides top-1 (``5`` logs ``*/acc_top5``); ``None`` to skip it.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        num_classes: int,
        lr_scheduler: LRSchedulerSpec | None = None,
        top_k: int | None = 5,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if top_k is not None and not 1 < top_k <= num_classes:
            raise ValueError(f"top_k must be None or in [2, num_classes={num_classes}], got {top_k}")
        # Only plain values go into the checkpoint: the factories are not loadable with torch.load's
        # weights_only=True, and the full Hydra config is saved next to the run anyway.
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.net = net
        self.optimizer_factory = optimizer
        self.lr_scheduler_spec = lr_scheduler
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.eval_acc = nn.ModuleDict(
            {stage: MulticlassAccuracy(num_classes, average="micro") for stage in ("val", "test")}
        )
        self.eval_topk = nn.ModuleDict(
            {}
            if top_k is None
            else {stage: MulticlassAccuracy(num_classes, top_k=top_k, average="micro") for stage in ("val", "test")}
        )
        self.eval_loss = nn.ModuleDict({stage: MeanMetric(nan_strategy="disable") for stage in ("val", "test")})

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits of ``net``."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch; logs the worker-local loss and accuracy."""
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_loss(loss.detach())
        self.train_acc(logits.detach(), y)
        # Not prog_bar=True: Lightning would read it on the host after every batch (see MetricsProgressBar).
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True)
        return loss

    def _eval_step(self, stage: str, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.eval_loss[stage](loss, weight=torch.full_like(loss, y.numel()))  # made on the device, not copied there
        self.eval_acc[stage](logits, y)
        self.log(f"{stage}/loss", self.eval_loss[stage], on_epoch=True)
        self.log(f"{stage}/acc", self.eval_acc[stage], on_epoch=True, prog_bar=True)
        if stage in self.eval_topk:
            self.eval_topk[stage](logits, y)
            self.log(f"{stage}/acc_top{self.hparams['top_k']}", self.eval_topk[stage], on_epoch=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Evaluate one batch (of the center, under EASGD)."""
        self._eval_step("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Evaluate one batch (of the center, under EASGD)."""
        self._eval_step("test", batch)

    def configure_optimizers(self) -> Optimizer | dict[str, Any]:
        """Build the local optimizer and, when configured, its scheduler."""
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_spec is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_spec.build(optimizer)}
