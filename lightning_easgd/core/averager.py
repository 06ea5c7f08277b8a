"""Synchronous Elastic Averaging SGD with a replicated center, in plain torch and torch.distributed.

Paper Eq. 5-6, applied every τ optimizer steps (Zhang, Choromanska & LeCun 2015, arXiv:1412.6651)::

    x_i ← x_i − η·g_i(x_i) − α·(x_i − x̃)
    x̃   ← x̃ + α·Σ_i (x_i − x̃)

Both right-hand sides use the values from *before* the step, so the elastic difference d_i = x_i − x̃ is taken
before the local optimizer runs and applied after it. Every rank keeps its own copy of x̃ and updates it from
the same all-reduced Σ_i d_i, so the copies stay bit-identical and one SUM all-reduce per exchange is all the
communication there is. Because d_i is known before the forward/backward pass, that all-reduce can run while the
gradient is computed: :meth:`ElasticAverager.step` launches it on entry and waits on exit.

The optimizer and its state (momentum buffers) are never touched: EAMSGD (the paper's Algorithm 2) is this
averager around a Nesterov-momentum SGD.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_easgd.core.center_momentum import make_center_momentum
from lightning_easgd.core.worker import (
    ElasticWorker,
    ExchangeError,
    ExchangeStats,
    NonFinitePolicy,
    NonFiniteWorkerError,
)


@dataclass
class _PendingExchange:
    works: list[dist.Work]
    stats: Tensor
    center_norm: float


class ElasticAverager(ElasticWorker):
    """The elastic exchange between one worker's tensors and a center replicated on every rank.

    All ranks must construct it collectively, with the same tensors (same names, shapes, dtypes, order) holding
    the same values: the center starts as a copy of them (use :func:`~lightning_easgd.core.broadcast_tensors`
    first). Tensors are updated in place, so the same ``Parameter`` objects stay registered with the optimizer.

    Args:
        named_tensors: the tensors that take part in the exchange (parameters and floating-point buffers), with
            names used in statistics and state dicts.
        tau: communication period in optimizer steps; exchanges happen at the start of steps t = τ, 2τ, ...
        alpha: moving rate α = ηρ in (0, 1).
        group: process group of the workers (default: the world).
        bucket_cap_mb: size of the flat buffers each all-reduce carries.
        overlap: launch the all-reduce before the step and wait after it (True), or wait before the step runs.
        on_nonfinite: what to do when some worker's d_i is not finite (NaN or inf, e.g. after a diverging step).
            Non-finite differences never reach the center: each rank zeroes its own before the all-reduce and
            raises a flag that travels in the same exchange. ``"raise"``: every rank raises
            :class:`NonFiniteWorkerError` naming the workers and the step, and the center keeps its last finite
            value. ``"reset"``: the other workers' differences are applied as usual and the flagged workers are
            reset to the new center (see :meth:`pop_resets`).
        timeout: how long to wait for an exchange's collectives before raising :class:`ExchangeError`
            (default: wait as long as the process group's own timeout allows).
        center_momentum, center_nesterov: momentum μ in [0, 1) on the center's updates, heavy ball or Nesterov
            (:class:`~lightning_easgd.core.center_momentum.CenterMomentum`); μ = 0 is the paper's rule.
        warmup_steps, warmup_tau: exchange every ``warmup_tau`` steps during the first ``warmup_steps`` steps
            (:class:`~lightning_easgd.core.schedule.ExchangeSchedule`).
    """

    def __init__(
        self,
        named_tensors: Sequence[tuple[str, Tensor]],
        *,
        tau: int,
        alpha: float,
        group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 25.0,
        overlap: bool = True,
        on_nonfinite: NonFinitePolicy = "raise",
        timeout: timedelta | None = None,
        center_momentum: float = 0.0,
        center_nesterov: bool = False,
        warmup_steps: int = 0,
        warmup_tau: int = 1,
    ) -> None:
        super().__init__(named_tensors, tau=tau, alpha=alpha, bucket_cap_mb=bucket_cap_mb, overlap=overlap,
                         on_nonfinite=on_nonfinite, timeout=timeout, warmup_steps=warmup_steps, warmup_tau=warmup_tau)
        self.center_momentum = make_center_momentum(self._center, center_momentum, center_nesterov)
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self._diff = self.layout.allocate()
        # The all-reduce overwrites its buffer with Σ_i d_i while this worker still needs its own d_i.
        self._sum = self.layout.allocate() if self.world_size > 1 else self._diff
        self._diff_views = self.layout.views(self._diff)
        self._local_views = self._diff_views  # d_i is idle between steps: it keeps the local values during swaps
        self._pending: _PendingExchange | None = None

    # ------------------------------------------------------------------ the exchange

    @property
    def bytes_per_exchange(self) -> int:
        """Bytes each rank contributes to one exchange's all-reduce (parameters and float buffers)."""
        return self.layout.nbytes

    @property
    def buffer_bytes(self) -> int:
        """Memory the exchange holds besides the model: the center, d_i, with p > 1 the all-reduce's sum, and with
        center momentum its velocity."""
        velocity = self.center_momentum.velocity if self.center_momentum is not None else []
        unique = {id(t): t for t in (*self._center, *self._diff, *self._sum, *velocity)}
        return sum(t.numel() * t.element_size() for t in unique.values())

    @contextmanager
    def step(self) -> Iterator[None]:
        """Wrap one local optimizer step: ``with averager.step(): optimizer.step(closure)``.

        If an exchange is due, d_i is measured now, before the step changes anything, and its all-reduce is
        started; after the step the elastic pull is applied to the worker and the center. The clock advances by
        one. If the step raises, the exchange is abandoned and the clock stays put.
        """
        self._begin()
        try:
            yield
        except BaseException:
            self._pending = None
            raise
        self._end()

    def _begin(self) -> None:
        self._check_can_step()
        if not self.exchange_due:
            return
        with torch.no_grad():
            torch._foreach_copy_(self._diff_views, self.tensors)
            for diff, center in zip(self._diff, self._center):
                diff.sub_(center)
            stats, center_norm = self._local_stats()
            finite = bool(stats[self.rank].isfinite())
            works: list[dist.Work] = []
            if self.world_size > 1:
                for total, diff in zip(self._sum, self._diff):
                    if finite:
                        total.copy_(diff)
                    else:
                        total.zero_()  # never let a diverged worker poison the center
                    works.append(dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
                works.append(dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
        self._pending = _PendingExchange(works, stats, center_norm)
        if not self.overlap:
            self._wait()

    def _wait(self) -> None:
        assert self._pending is not None
        try:
            for work in self._pending.works:
                if self.timeout is None:
                    work.wait()
                else:
                    work.wait(self.timeout)
        except Exception as error:
            self._pending = None
            raise ExchangeError(
                f"EASGD exchange at step {self.clock} failed on rank {self.rank}: {error}. A peer may have died or "
                f"stalled{'' if self.timeout is None else f' (timeout {self.timeout.total_seconds():g} s)'}; the "
                "center was not updated."
            ) from error
        self._pending.works.clear()

    def _end(self) -> None:
        if self._pending is not None:
            self._wait()
            stats = self._pending.stats.cpu()
            p = self.world_size
            # Each rank's distance slot is its own norm plus the others' zeros, so a NaN or inf there is a flag.
            flagged = tuple(r for r in range(p) if not stats[r].isfinite())
            if flagged and self.on_nonfinite == "raise":
                self._pending = None
                raise NonFiniteWorkerError(
                    f"EASGD: worker(s) {', '.join(map(str, flagged))} of {p} have non-finite parameters or buffers at "
                    f"optimizer step {self.clock} (the elastic difference x_i - center is NaN or inf). The exchange "
                    "was abandoned and the center keeps its last finite value; lower the learning rate, or pass "
                    "on_nonfinite='reset' to reset diverged workers to the center."
                )
            with torch.no_grad():
                if len(flagged) < p and self.center_momentum is not None:
                    self.center_momentum.apply(self._center, self._sum, self.alpha)
                elif len(flagged) < p:  # flagged ranks contributed zeros, so the sum holds the finite differences
                    for center, total in zip(self._center, self._sum):
                        center.add_(total, alpha=self.alpha)
                if self.rank in flagged:
                    torch._foreach_copy_(self.tensors, self._center_views)
                else:
                    torch._foreach_add_(self.tensors, self._diff_views, alpha=-self.alpha)
            if flagged:
                self._resets.append((self.clock, flagged))
            if self._track is not None:
                self._record_stats(stats, self._pending.center_norm)
            self._pending = None
        self.clock += 1

    # ------------------------------------------------------------------ statistics

    def _local_stats(self) -> tuple[Tensor, float]:
        """This rank's slots of the statistics vector: ‖d_i‖ (also the finiteness flag) and per-tensor norms."""
        per_tensor = torch.stack(torch._foreach_norm(self._diff_views, 2, dtype=torch.float64))
        n = len(self.tensors) if self._track else 0
        p = self.world_size
        stats = torch.zeros(p * (1 + n), dtype=torch.float64, device=self._diff[0].device)
        stats[self.rank] = per_tensor.square().sum().sqrt()
        if n:
            stats[p + self.rank * n : p + (self.rank + 1) * n] = per_tensor
        if self._track is None:
            return stats, 0.0
        center_sq = torch.stack(torch._foreach_norm(self._center, 2, dtype=torch.float64)).square().sum()
        return stats, float(center_sq.sqrt())

    def _record_stats(self, stats: Tensor, center_norm: float) -> None:
        """Record the all-reduced statistics vector (already on the CPU: `_end` read the divergence flags from it)."""
        p = self.world_size
        layers = stats[p:].view(p, -1) if self._track else None
        self._stats.append(ExchangeStats(self.clock, stats[:p].clone(), center_norm, layers))
