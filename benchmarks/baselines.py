"""Peers to measure EASGD against that Lightning does not provide in a CPU-comparable form."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.nn import Module
from torch.optim import Optimizer
from typing_extensions import override

from lightning_easgd.core import broadcast_tensors


class PeriodicAveragingStrategy(DDPStrategy):
    """Local SGD with periodic model averaging: every ``period`` steps all workers are reset to their mean.

    This is what ``DDPStrategy(model_averaging_period=τ, ddp_comm_state=PostLocalSGDState(...))`` does after its
    warm-up, without its defects on CPU: Lightning registers the post-local-SGD communication hook only on CUDA, so
    on CPU that configuration still all-reduces gradients at every step. Here the module is never wrapped (no
    gradient all-reduce) and PyTorch's :class:`PeriodicModelAverager` averages the parameters every ``period``
    optimizer steps (β = 1 in EASGD's terms; buffers are not averaged, as in PyTorch's averager).
    """

    def __init__(self, period: int, **kwargs: Any) -> None:
        if period < 1:
            raise ValueError(f"period={period} is invalid: it must be >= 1")
        super().__init__(**kwargs)
        self.period = period
        self._averager: PeriodicModelAverager | None = None

    @override
    def configure_ddp(self) -> None:
        assert self.model is not None
        broadcast_tensors([*self.model.parameters(), *self.model.buffers()])
        self._averager = PeriodicModelAverager(period=self.period, warmup_steps=0)

    @override
    def optimizer_step(
        self, optimizer: Optimizer, closure: Callable[[], Any], model: LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        assert self._averager is not None
        self._averager.average_parameters([p for group in optimizer.param_groups for p in group["params"]])
        return output

