"""Peers to measure EASGD against that Lightning does not provide in a CPU-comparable form."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
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


class BF16CompressedDDPStrategy(DDPStrategy):
    """DDP whose gradient all-reduce travels in bfloat16 (PyTorch's ``bf16_compress_hook``): half DDP's bytes, the
    synchronous peer of EASGD's ``exchange_dtype=bfloat16``.

    ``DDPStrategy(ddp_comm_hook=bf16_compress_hook)`` does this on GPUs only: Lightning registers communication hooks
    on CUDA alone, so on CPU that configuration still all-reduces float32 gradients. Here the hook is registered on
    the wrapped module on every device, so the bytes a benchmark counts are the bytes it claims.
    """

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("ddp_comm_hook") is not None:
            raise ValueError(f"ddp_comm_hook={kwargs['ddp_comm_hook']!r} is invalid here: BF16CompressedDDPStrategy "
                             "registers bf16_compress_hook itself; use DDPStrategy for another hook")
        super().__init__(**kwargs)

    @override
    def configure_ddp(self) -> None:
        super().configure_ddp()
        assert isinstance(self.model, DistributedDataParallel)
        self.model.register_comm_hook(state=None, hook=bf16_compress_hook)  # state None: the default group
