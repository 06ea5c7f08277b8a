"""What every EASGD exchange algorithm shares: one worker's tensors, its copy of the center, and evaluation on it.

The synchronous averager keeps a complete replica of the center on every rank; the asynchronous one keeps the
last snapshot it read from the ranks that own the center's slices. Either way the Lightning adapter swaps that
copy in for evaluation, reads it for checkpoints and resets diverged workers to it through this one interface.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_easgd.core.buckets import FlatLayout
from lightning_easgd.core.center_momentum import CenterMomentum
from lightning_easgd.core.config import ExchangeConfig, NonFinitePolicy


class NonFiniteWorkerError(RuntimeError):
    """A worker's weights (so its elastic difference) turned non-finite; the exchange was abandoned."""


class ExchangeError(RuntimeError):
    """The exchange's collective failed or timed out, typically because a peer died or stalled."""


@dataclass(frozen=True)
class ExchangeStats:
    """How far the workers were from the center at one exchange, measured on d_i before the pull.

    Attributes:
        step: the worker's clock t at the exchange (optimizer steps taken before it).
        distances: ``[p]`` float64 tensor, ‖x_i − x̃‖₂ of every worker i (with worker groups of k ranks, one entry
            per group of k ranks, not per rank).
        center_norm: ‖x̃‖₂ of the center the differences were taken against.
        layer_distances: ``[p, n_tensors]`` float64 tensor of per-tensor distances, when requested.
        extra: further scalars an exchange algorithm reports (e.g. the center's version lag in asynchronous
            EASGD); monitors log them under their own names.
    """

    step: int
    distances: Tensor
    center_norm: float
    layer_distances: Tensor | None = None
    extra: Mapping[str, float] = field(default_factory=dict)

    @property
    def relative_distances(self) -> Tensor:
        """‖x_i − x̃‖₂ / ‖x̃‖₂ for every worker (infinite if the center is exactly zero)."""
        return self.distances / self.center_norm


class ElasticWorker:
    """One worker's side of EASGD: the step template, its copy of the center, and evaluation on it.

    :meth:`step` is the one template every exchange algorithm runs: :meth:`_begin` (before the local step: measure,
    start the exchange), :meth:`_end` (after it: apply the exchange, advance the clock), :meth:`_abandon` (the step
    raised). Subclasses implement those hooks, set ``self._local_views`` (where the local values
    wait while the center is swapped in) and, if their copy of the center can go stale, override
    :meth:`_refresh_center`. A subclass that keeps only part of the center (the synchronous averager with worker
    groups) overrides :meth:`_init_center` and the methods that move the center and the local values.

    Args:
        named_tensors: the tensors that take part in the exchange (parameters and floating-point buffers).
        config: the exchange's options, already validated (:class:`~lightning_easgd.core.config.ExchangeConfig`).
        num_workers: p, the number of workers (resolves α = β/p when ``config.alpha`` is None).
    """

    def __init__(
        self,
        named_tensors: Sequence[tuple[str, Tensor]],
        config: ExchangeConfig,
        *,
        num_workers: int,
    ) -> None:
        if not named_tensors:
            raise ValueError("named_tensors is empty: EASGD needs at least one tensor to average")
        self.names: tuple[str, ...] = tuple(name for name, _ in named_tensors)
        if len(set(self.names)) != len(self.names):
            raise ValueError("named_tensors has duplicate names")
        for name, t in named_tensors:
            if not t.is_floating_point():
                raise ValueError(f"tensor {name!r} has dtype {t.dtype}: only floating-point tensors can be averaged")
        self.tensors: list[Tensor] = [t for _, t in named_tensors]
        self.config = config
        """The exchange's options (validated once, when the config was built)."""
        self.schedule = config.schedule
        """Which optimizer steps start with an exchange: a function of :attr:`clock` alone."""
        self.tau = config.tau
        self.alpha = config.moving_rate(num_workers)
        self.overlap: bool = bool(config.overlap)
        self.on_nonfinite: NonFinitePolicy = config.on_nonfinite
        self.timeout = config.timeout
        self.clock = 0
        """Optimizer steps this worker has taken; the exchange happens when :attr:`schedule` says so."""

        self.layout = FlatLayout(self.tensors, self._bucket_cap_mb())
        self._local_views: list[Tensor] = []
        self._init_center()
        self._pending: object | None = None  # the exchange in flight during a step
        self._center_in_use = False
        self._track: bool | None = None  # None: no statistics; else whether per tensor too (config's choice)
        self._stats: list[ExchangeStats] = []
        self._resets: list[tuple[int, tuple[int, ...]]] = []
        self.center_momentum: CenterMomentum | None = None
        """Momentum on the center's updates, where the exchange algorithm supports it (None: the paper's rule)."""

    # ------------------------------------------------------------------ the step template

    @contextmanager
    def step(self) -> Iterator[None]:
        """Wrap one local optimizer step: ``with averager.step(): optimizer.step(closure)``.

        If an exchange is due, it starts now, before the step changes anything (:meth:`_begin`), and is applied
        after the step (:meth:`_end`, which advances the clock by one). If the step raises, the exchange is
        abandoned (:meth:`_abandon`) and the clock stays put.
        """
        self._begin()
        try:
            yield
        except BaseException:
            self._abandon()
            raise
        self._end()

    def _begin(self) -> None:
        """Before the local step: refuse a nested step (:meth:`_check_can_step`) and start the exchange if one is
        due (:attr:`exchange_due`). Callers that frame the step themselves call :meth:`_begin` and :meth:`_end`."""
        raise NotImplementedError

    def _end(self) -> None:
        """After the local step: complete the exchange started by :meth:`_begin`, if any, and advance the clock."""
        raise NotImplementedError

    def _abandon(self) -> None:
        """The local step raised: forget the exchange in flight (the clock stays put)."""
        self._pending = None

    def _bucket_cap_mb(self) -> float | None:
        """The size of the flat buffers the tensors are grouped into: ``config.bucket_cap_mb`` (None: a default for
        the tensors' device, see :func:`~lightning_easgd.core.buckets.resolve_bucket_cap_mb`)."""
        return self.config.bucket_cap_mb

    def _init_center(self) -> None:
        """Allocate this worker's copy of the center and start it at the tensors' values (all ranks agree on them).
        The default is a complete copy in the layout's buckets, in float32 for 16-bit tensors (as the synchronous
        averager keeps it: a 16-bit center drops updates α·d smaller than half its spacing, and stops moving); an
        exchange that keeps only a slice overrides it."""
        self._center = self.layout.allocate(self.layout.master_dtypes)
        self._center_views = self.layout.views(self._center)
        with torch.no_grad():
            torch._foreach_copy_(self._center_views, self.tensors)

    @property
    def exchange_due(self) -> bool:
        """Whether the next optimizer step starts with an exchange (as :attr:`schedule` says for the clock)."""
        return self.schedule.due(self.clock)

    def _check_can_step(self) -> None:
        """Refuse a step nested in another one, or taken while the center's values are swapped into the tensors."""
        if self._pending is not None:
            raise RuntimeError(f"{type(self).__name__}.step() was entered again before the previous step finished")
        if self._center_in_use:
            raise RuntimeError("cannot take an optimizer step while the center weights are swapped in")

    def _refresh_center(self, consistent: bool) -> None:
        """Bring this worker's copy of the center up to date before it is read; ``consistent`` asks for a copy all
        ranks agree on (collective where the center lives elsewhere). The replicated center is always current."""

    # ------------------------------------------------------------------ statistics and resets

    def track_distances(self, per_tensor: bool | None = None) -> None:
        """Record :class:`ExchangeStats` at every exchange from now on, per tensor too when the config's
        ``per_tensor_distances`` says so.

        Args:
            per_tensor: if given, must match ``config.per_tensor_distances``: the per-tensor distances ride in the
                exchange's collective, whose size every rank must agree on, so one rank cannot turn them on alone.

        Raises:
            ValueError: if ``per_tensor`` differs from the config's ``per_tensor_distances``.
        """
        if per_tensor is not None and per_tensor != self.config.per_tensor_distances:
            raise ValueError(
                f"track_distances(per_tensor={per_tensor!r}) differs from this exchange's "
                f"per_tensor_distances={self.config.per_tensor_distances!r}: per-tensor distances change the size of "
                "the exchange's all-reduce, so they are chosen once for every rank; build the exchange with "
                f"per_tensor_distances={per_tensor!r} (EASGDStrategy(per_tensor_distances=...))"
            )
        self._track = self.config.per_tensor_distances

    def pop_stats(self) -> list[ExchangeStats]:
        """Statistics of the exchanges since the last call, oldest first."""
        stats, self._stats = self._stats, []
        return stats

    def pop_resets(self) -> list[tuple[int, tuple[int, ...]]]:
        """``(step, workers)`` of the exchanges since the last call that reset diverged workers to the center
        (``on_nonfinite="reset"``); a reset worker's optimizer state is the caller's to clear."""
        resets, self._resets = self._resets, []
        return resets

    # ------------------------------------------------------------------ center and local weights

    @property
    def center_in_use(self) -> bool:
        """Whether the tensors currently hold the center (between :meth:`use_center` and :meth:`restore_local`)."""
        return self._center_in_use

    def use_center(self) -> None:
        """Put the center into the tensors (for evaluation), keeping the local values aside; every rank gets the
        same center (collective where the center lives elsewhere)."""
        if self._center_in_use:
            raise RuntimeError("the center weights are already swapped in")
        if self._pending is not None:
            raise RuntimeError("cannot swap in the center during an optimizer step")
        self._refresh_center(consistent=True)
        with torch.no_grad():
            torch._foreach_copy_(self._local_views, self.tensors)
            torch._foreach_copy_(self.tensors, self._center_views)
        self._center_in_use = True

    def restore_local(self) -> None:
        """Undo :meth:`use_center`: the tensors get back exactly the local values they had."""
        if not self._center_in_use:
            raise RuntimeError("the center weights are not swapped in")
        with torch.no_grad():
            torch._foreach_copy_(self.tensors, self._local_views)
        self._center_in_use = False

    @contextmanager
    def center_weights(self) -> Iterator[None]:
        """Run a block with the center's values in the tensors; local values come back afterwards."""
        self.use_center()
        try:
            yield
        finally:
            self.restore_local()

    def adopt_center(self) -> None:
        """Make the center this worker's weights for good (end of training): the local values are dropped."""
        if self._center_in_use:
            self._center_in_use = False
            return
        self._refresh_center(consistent=True)
        with torch.no_grad():
            torch._foreach_copy_(self.tensors, self._center_views)

    def center_values(self) -> list[Tensor]:
        """The center, one view per tensor (read-only by convention; clone before keeping them)."""
        if not self._center_in_use:
            self._refresh_center(consistent=False)
        return list(self._center_views)

    def local_values(self) -> list[Tensor]:
        """This worker's own values, one per tensor, also while the center is swapped in."""
        return list(self._local_views) if self._center_in_use else list(self.tensors)

    def load_local(self, values: Sequence[Tensor]) -> None:
        """Set this worker's own values (e.g. when resuming), also while the center is swapped in."""
        self._check_values(values, "local values")
        with torch.no_grad():
            torch._foreach_copy_(self.local_values(), list(values))

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, object]:
        """The center (by name, cloned), its velocity with center momentum, and the clock: what a resumed run needs
        besides the workers' own state."""
        state: dict[str, object] = {
            "clock": self.clock,
            "center": {name: value.detach().clone() for name, value in zip(self.names, self.center_values())},
        }
        velocity = self.center_velocity()
        if velocity is not None:
            state["center_velocity"] = {name: value.detach().clone() for name, value in velocity.items()}
        return state

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore :meth:`state_dict`'s output; every rank must load the same state to keep the center whole."""
        center = state["center"]
        if not isinstance(center, Mapping) or set(center) != set(self.names):
            got = sorted(center) if isinstance(center, Mapping) else type(center).__name__
            raise ValueError(f"center state has tensors {got}, expected {sorted(self.names)}")
        values = [center[name] for name in self.names]
        self._check_values(values, "center state")
        clock = state["clock"]
        if isinstance(clock, bool) or not isinstance(clock, int) or clock < 0:
            raise ValueError(f"clock={clock!r} is invalid: it must be an integer >= 0")
        self._store_center(values)
        self.clock = clock
        self.load_center_velocity(state.get("center_velocity"))  # type: ignore[arg-type]

    def center_velocity(self) -> dict[str, Tensor] | None:
        """The center momentum's velocity v by tensor name (views: clone to keep), or None without center momentum."""
        if self.center_momentum is None:
            return None
        return dict(zip(self.names, self._full_values(self.center_momentum.velocity)))

    def checkpoint_center(self, writer: bool) -> list[Tensor] | None:
        """The center for a checkpoint file, one tensor per averaged tensor: host copies on the rank that writes the
        file (``writer``), views that cost nothing on the other ranks (an exchange that would have to allocate a
        copy there returns None instead). Every rank calls it (collective where the center is sharded)."""
        values = self.center_values()
        return [v.detach().to("cpu", copy=True) for v in values] if writer else values

    def checkpoint_local(self) -> list[Tensor] | None:
        """This worker's own values for its worker file, also while the center is swapped in: on the rank that
        writes the file (its worker's first rank) tensors the caller copies to the host; None where providing them
        would cost a copy on a rank that does not write. Every rank of the worker calls it (collective where the
        values are sharded)."""
        return self.local_values()

    def checkpoint_velocity(self, writer: bool) -> dict[str, Tensor] | None:
        """The center momentum's velocity for a checkpoint file, by name, as :meth:`checkpoint_center` gives the
        center; None without center momentum (and where it would cost a copy on a rank that does not write)."""
        velocity = self.center_velocity()
        if velocity is None or not writer:
            return velocity
        return {name: v.detach().to("cpu", copy=True) for name, v in velocity.items()}

    def load_center_velocity(self, velocity: Mapping[str, Tensor] | None) -> None:
        """Restore :meth:`center_velocity`'s output on every rank; None (a state saved without center momentum)
        starts v at zero."""
        if self.center_momentum is None:
            if velocity is not None:
                raise ValueError("the state holds a center velocity, but this averager has no center momentum")
            return
        if velocity is None:
            self.center_momentum.reset()
            return
        if not isinstance(velocity, Mapping) or set(velocity) != set(self.names):
            got = sorted(velocity) if isinstance(velocity, Mapping) else type(velocity).__name__
            raise ValueError(f"center velocity state has tensors {got}, expected {sorted(self.names)}")
        values = [velocity[name] for name in self.names]
        self._check_values(values, "center velocity state")
        with torch.no_grad():
            self._store_values(self.center_momentum.velocity, values)

    def _full_values(self, flats: list[Tensor]) -> list[Tensor]:
        """Per-tensor values of center-shaped flat buffers (the center, its velocity); views where they are whole."""
        return self.layout.views(flats)

    def _store_values(self, flats: list[Tensor], values: list[Tensor]) -> None:
        """Copy full per-tensor ``values`` into center-shaped flat buffers (this rank's part of them)."""
        torch._foreach_copy_(self.layout.views(flats), values)

    def _store_center(self, values: list[Tensor]) -> None:
        """Overwrite the center with ``values`` (already checked)."""
        with torch.no_grad():
            torch._foreach_copy_(self._center_views, values)

    def _check_values(self, values: Sequence[Tensor], what: str) -> None:
        if len(values) != len(self.tensors):
            raise ValueError(f"{what}: got {len(values)} tensors, expected {len(self.tensors)}")
        for name, value, shape in zip(self.names, values, self.layout.shapes):
            if value.shape != shape:
                raise ValueError(f"{what}: tensor {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
