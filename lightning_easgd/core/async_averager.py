"""Asynchronous EASGD, the worker side: the paper's Algorithm 1 (and Algorithm 2 around a Nesterov optimizer).

Worker i, at the start of its local step t (its own clock), when t > 0 and τ divides t::

    x ← x_i
    x_i ← x_i − α·(x − x̃)         # x̃: the center as the master holds it right now
    x̃   ← x̃ + α·(x − x̃)           # done by the master, atomically with the read
    x_i ← x_i − η·g_i(x)            # the local optimizer step, gradient at the pre-elastic x

There is no barrier between workers: each calls the center when its own clock says so. The center is sharded over
the ranks (:class:`~lightning_easgd.core.center_service.CenterService`); an exchange sends each owner its slice of x
and gets back x − x̃ for that slice, read and updated under the slice's lock.

Overlap: the gradient is taken at x, which is x_i before the elastic pull, so the request can be sent before the
step's forward/backward and its reply applied after the optimizer step: x_i ← step(x) − α·(x − x̃) is exactly the
rule. Overlap therefore adds no staleness to Algorithm 1. What every asynchronous exchange has is the staleness of
the center: other workers' updates land between two exchanges of this worker, which :class:`ExchangeStats` reports
as the *version lag* (see :meth:`AsyncElasticAverager.pop_stats`). Slices are served independently, so one exchange
may see slice A before and slice B after another worker's update of them; each slice is updated atomically.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor
from torch.futures import Future
from typing_extensions import override

from lightning_easgd.core.center_service import CenterService, ExchangeReply, validate_transport
from lightning_easgd.core.config import ExchangeConfig, config_from
from lightning_easgd.core.staging import HostStaging
from lightning_easgd.core.worker import ElasticWorker, ExchangeStats, NonFiniteWorkerError

ORDERS = ("free", "round_robin")
DEFAULT_TIMEOUT = timedelta(minutes=30)
"""How long an exchange, snapshot or shutdown waits on other ranks when no timeout is given (torch's default)."""
_NO_ROUND = ("the reset rule needs every worker's difference in one round, and the asynchronous center takes them one "
             "at a time")
_NO_BARRIER = "a synchronous start averages gradients at a barrier every step, and the asynchronous exchange has none"
UNUSED_OPTIONS = {
    "center_device": (None, "the asynchronous center already lives in host memory, sharded over the ranks"),
    "exchange_dtype": (None, "the asynchronous exchange sends x itself, in the parameters' dtype"),
    "center_momentum": (0.0, ("the asynchronous center is updated by each worker's exchange separately, with no "
                              "per-round increment for a velocity to accumulate")),
    "worker_pull": ("elastic", _NO_ROUND),
    "sync_steps": (0, _NO_BARRIER),
    "sync_epochs": (0, _NO_BARRIER),
}
"""ExchangeConfig options that only the synchronous averager implements: their default, and why."""


def refuse_unused_options(config: ExchangeConfig, owner: str) -> None:
    """Refuse an :class:`ExchangeConfig` that sets an option asynchronous EASGD does not implement.

    Raises:
        ValueError: naming ``owner``, the option, its value and why.
    """
    for name, (default, why) in UNUSED_OPTIONS.items():
        value = getattr(config, name)
        if value != default:
            raise ValueError(f"{owner} does not support {name}={value!r}: {why}; use the synchronous averager")


def validate_order(order: object) -> Literal["free", "round_robin"]:
    """Return ``order`` or raise unless it is ``"free"`` or ``"round_robin"``."""
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is invalid: choose 'free' (asynchronous) or 'round_robin' (deterministic)")
    return order  # type: ignore[return-value]


def async_stability_bound(lr: float) -> float:
    """Largest α for which round-robin asynchronous EASGD is stable on a 1-D quadratic with curvature h = 1.

    Paper §4: stable iff 0 ≤ η ≤ 2 and 0 ≤ α ≤ (4 − 2η)/(4 − η). With curvature h the same holds for ηh, which is
    why a warning based on the raw learning rate is only a hint: it is exact for normalized curvature.
    """
    if not 0.0 <= lr <= 2.0:
        return 0.0
    return (4.0 - 2.0 * lr) / (4.0 - lr)


def async_stability_warning(alpha: float, lr: float) -> str | None:
    """A warning when (η, α) lie outside the paper's round-robin stability region for normalized curvature."""
    if 0.0 <= lr <= 2.0 and alpha <= async_stability_bound(lr):
        return None
    return (
        f"asynchronous EASGD with lr={lr:g} and alpha={alpha:g} lies outside the paper's round-robin stability "
        f"region 0 <= lr <= 2, 0 <= alpha <= (4 - 2*lr)/(4 - lr) = {async_stability_bound(lr):g} (a quadratic of "
        "curvature 1, paper section 4): the elastic exchange may diverge; lower alpha or the learning rate"
    )


class AsyncElasticAverager(ElasticWorker):
    """One worker's side of asynchronous EASGD, with the center sharded over all ranks.

    Offers the same interface as :class:`~lightning_easgd.core.ElasticAverager`, so that adapters can use either.
    Construction is collective (all ranks, same tensors holding the same values): the center starts as a copy of the
    tensors, each rank keeping its slice. Call :meth:`close` on every rank when done (collective unless aborting).

    Args:
        named_tensors: the tensors that take part (parameters and floating-point buffers), with names.
        config: the exchange's options (:class:`~lightning_easgd.core.config.ExchangeConfig`), or give them as
            keyword arguments. Used here: τ and the warm-up (on this worker's own clock: exchanges at the start of
            its steps τ, 2τ, ... without a warm-up), α or β, ``overlap`` (None means True), ``on_nonfinite``,
            ``timeout`` (default 30 minutes) and ``per_tensor_distances``; the others must keep their defaults
            (:data:`UNUSED_OPTIONS`).
        order: ``"free"``: every worker exchanges on its own clock (the paper's asynchronous rule). ``"round_robin"``:
            updates of the center happen in the fixed order worker 0, 1, ..., p−1, 0, ... (each worker's k-th
            exchange is the center's update number k·p + rank), which makes a run reproducible and equal to a
            single-process replay of Algorithm 1; workers then wait for their turn, so it is for testing. It needs
            every worker to take the same number of exchanges.
        group: process group of the workers (default: the world).
        rpc_transport: ``"tcp"`` (default) or ``"fast"``: which TensorPipe transports carry the slices (see
            :class:`~lightning_easgd.core.center_service.CenterService`).

    The options, as used here:

    overlap: send the exchange before the step and apply its reply after (True), or wait for the reply before
        the step runs (False). Same arithmetic; overlap hides the round trip behind the forward/backward.
    on_nonfinite: what to do when this worker's x turns NaN or inf (checked before sending, so a diverged
        worker never reaches the center). ``"raise"``: raise :class:`~lightning_easgd.core.NonFiniteWorkerError`
        naming the worker and the step. ``"reset"``: skip the exchange and, after the step, reset the worker to
        the current center (see :meth:`pop_resets`).
    timeout: how long any wait on other ranks (an exchange, a snapshot barrier, the shutdown) may last before
        raising :class:`~lightning_easgd.core.ExchangeError` (default 30 minutes).
    warmup_steps, warmup_tau: exchange every ``warmup_tau`` of this worker's steps during its first
        ``warmup_steps`` steps (:class:`~lightning_easgd.core.schedule.ExchangeSchedule`).

    On CUDA the slices go to the host and the replies back on a side stream through pinned buffers: an exchange
    waits on the host only for the copy of x (and the work queued before it), never for the device as a whole.
    Memory besides the model: two model-sized device buffers (x at the exchange, the replies) and the center's
    snapshot on the device; on the host, one model's worth of send buffers (pinned on CUDA), as much for the
    replies on CUDA, and this rank's 1/p slice of the center. The center, its snapshot and the replies are kept in
    float32 for 16-bit tensors (``*-true`` precisions), as in the synchronous averager: a 16-bit center would round
    away every update α·(x − x̃) smaller than half its spacing and stop moving. Those buffers then take twice the
    16-bit model's size.

    Statistics (:meth:`track_distances`, nothing extra is communicated): at its exchange a worker knows its own
    ‖x_i − x̃‖ exactly, and the owners tell it every other worker's distance at that worker's most recent exchange
    (0 before the first one: every worker starts at the center). So ``distances[rank]`` is this worker's distance at
    this exchange and the other entries are the latest known to the owners; ``center_norm`` is ‖x̃‖ of the center
    this exchange read; ``extra`` holds ``version_lag`` (mean over slices of the center updates by other workers since
    this worker's previous exchange: p − 1 in round-robin order, 0 with one worker), ``version_lag_max`` (over
    slices) and ``exchange_wait_ms`` (time this worker was blocked waiting for the replies). :meth:`pop_resets`
    only knows this worker's own resets.

    The center seen by :meth:`use_center`/:meth:`adopt_center` is a consistent snapshot read between two barriers
    (collective); :meth:`center_values` outside evaluation reads the current center slice by slice, each slice
    atomically, without a barrier.
    """

    def __init__(
        self,
        named_tensors: Sequence[tuple[str, Tensor]],
        config: ExchangeConfig | None = None,
        *,
        order: Literal["free", "round_robin"] = "free",
        group: dist.ProcessGroup | None = None,
        rpc_transport: str = "tcp",
        **options: Any,
    ) -> None:
        config = config_from(config, options, type(self).__name__)
        refuse_unused_options(config, type(self).__name__)
        self.order = validate_order(order)
        validate_transport(rpc_transport)
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(named_tensors, config, num_workers=dist.get_world_size(group) if distributed else 1)
        timeout = config.timeout
        segments = []
        for bucket in self.layout.buckets:
            offsets, start = [], 0
            for i, n in zip(bucket.indices, bucket.numels):
                offsets.append((i, start, start + n))
                start += n
            segments.append(offsets)
        self._snap = self.layout.allocate()  # x at the exchange; the local values while the center is swapped in
        # x − x̃ assembled from the replies, in the center's dtype (float32 for 16-bit tensors), like the sync pull.
        self._diff = self.layout.allocate(self.layout.master_dtypes)
        self._snap_views = self.layout.views(self._snap)
        self._diff_views = self.layout.views(self._diff)
        self._local_views = self._snap_views
        self.service = CenterService(self._center, segments, num_tensors=len(self.tensors), alpha=self.alpha,
                                     timeout=(timeout or DEFAULT_TIMEOUT).total_seconds(), group=group,
                                     transport=rpc_transport)
        self.world_size = self.service.world_size
        self.rank = self.service.rank
        self._staging = HostStaging([b.device for b in self.layout.buckets])
        # Host buffers per owner and group: what each owner is sent (contiguous, so RPC sends only them) and, on
        # CUDA, pinned copies of its replies for the asynchronous upload. One model's worth each, on the host (the
        # replies in the center's dtype: twice the tensors' bytes for 16-bit tensors).
        self._send = [[self._staging.empty(hi - lo, b.dtype) for b, (lo, hi) in
                       zip(self.layout.buckets, self.service.owner_bounds(r))] for r in range(self.world_size)]
        self._recv = [[self._staging.empty(hi - lo, d.dtype) for d, (lo, hi) in
                       zip(self._diff, self.service.owner_bounds(r))] for r in range(self.world_size)
                      ] if self._staging.pinned else None
        self._finite = self._staging.empty(len(self.layout.buckets), torch.bool)
        self._seen = [0] * self.world_size  # per owner: the slice version right after our last update of it
        self._exchanges = 0
        self._pending: list[Future[ExchangeReply]] | None = None
        self._replies: list[ExchangeReply] = []
        self._wait_s = 0.0
        self._reset_due = False

    # ------------------------------------------------------------------ the exchange

    @property
    def bytes_per_exchange(self) -> int:
        """Bytes this worker sends over the network per exchange (the slices other ranks own, in the tensors' dtype).
        The replies come back in the center's dtype: as many bytes, twice as many for 16-bit tensors."""
        own = self.service.owner_bounds(self.rank)
        size = {b.dtype: torch.empty((), dtype=b.dtype).element_size() for b in self.layout.buckets}
        return sum((b.numel - (hi - lo)) * size[b.dtype] for b, (lo, hi) in zip(self.layout.buckets, own))

    @override
    def _bucket_cap_mb(self) -> float:
        """One flat vector per (device, dtype) group: the "flattened parameters" whose slices the ranks own
        (``config.bucket_cap_mb`` sizes only the adapter's initial broadcast)."""
        return sum(t.numel() * t.element_size() for t in self.tensors) / 2**20 + 1.0

    @override
    def _abandon(self) -> None:
        # The center has still moved: an exchange cannot be taken back; only this worker's side of it is dropped.
        self._pending = None
        self._reset_due = False

    @override
    def _begin(self) -> None:
        self._check_can_step()
        if self.service.closed:
            raise RuntimeError("the center service is closed")
        if not self.exchange_due:
            return
        turn = self._exchanges * self.world_size + self.rank if self.order == "round_robin" else None
        self._exchanges += 1
        with torch.no_grad():
            torch._foreach_copy_(self._snap_views, self.tensors)
            # max |x| per bucket: NaN and inf propagate, finite values never overflow, and no model-sized
            # temporary is made; the flags travel to the host with the slices, in the same wait.
            flags = [norm.isfinite().view(1) for norm in torch._foreach_norm(self._snap, float("inf"))]
            pairs = [(self._finite[i : i + 1], flag) for i, flag in enumerate(flags)]
            for owner in range(self.world_size):
                for buf, flat, (lo, hi) in zip(self._send[owner], self._snap, self.service.owner_bounds(owner)):
                    pairs.append((buf, flat[lo:hi]))
            self._staging.download(pairs)
        if not bool(self._finite.all()):
            if self.on_nonfinite == "raise":
                raise NonFiniteWorkerError(
                    f"EASGD: worker {self.rank} of {self.world_size} has non-finite parameters or buffers at "
                    f"optimizer step {self.clock}. Its exchange was not sent, so the center keeps only finite "
                    "updates; lower the learning rate, or pass on_nonfinite='reset' to reset diverged workers to "
                    "the center."
                )
            self._reset_due = True  # after the step, so that the step's own non-finite update is discarded
            return
        self._pending = [self.service.exchange(owner, self.rank, self._send[owner], turn)
                         for owner in range(self.world_size)]
        self._wait_s = 0.0
        if not self.overlap:
            self._collect()

    def _collect(self) -> list[ExchangeReply]:
        assert self._pending is not None
        start = time.perf_counter()
        try:
            replies = [self.service.wait(f, f"the exchange of worker {self.rank} at step {self.clock} with owner "
                                            f"{owner}") for owner, f in enumerate(self._pending)]
        except BaseException:
            self._pending = None  # the exchange is lost; a later step must not wait for it again
            raise
        self._wait_s += time.perf_counter() - start
        self._replies = replies
        return replies

    @override
    def _end(self) -> None:
        if self._pending is not None:
            replies = self._replies if not self.overlap else self._collect()
            self._staging.release()  # the previous exchange's upload has read the reply buffers
            pairs = []
            for owner, reply in enumerate(replies):
                bounds = self.service.owner_bounds(owner)
                for g, (flat, diff, (lo, hi)) in enumerate(zip(self._diff, reply.diffs, bounds)):
                    if self._recv is not None:  # into pinned memory, from which the upload is asynchronous
                        diff = self._recv[owner][g].copy_(diff)
                    pairs.append((flat[lo:hi], diff))
            with torch.no_grad():
                self._staging.upload(pairs)
                torch._foreach_add_(self.tensors, self._diff_views, alpha=-self.alpha)
            lags = [reply.version - self._seen[owner] for owner, reply in enumerate(replies)]
            self._seen = [reply.version + 1 for reply in replies]
            if self._track is not None:
                self._record_stats(replies, lags)
            self._pending = None
            self._replies = []
        elif self._reset_due:
            self._reset_due = False
            self._refresh_center(consistent=False)
            with torch.no_grad():
                torch._foreach_copy_(self.tensors, self._center_views)
            self._resets.append((self.clock, (self.rank,)))
        self.clock += 1

    # ------------------------------------------------------------------ statistics

    def _record_stats(self, replies: list[ExchangeReply], lags: list[int]) -> None:
        # Every owner's table already holds this worker's fresh row for its slice: summed, the exact ‖x − x̃‖².
        table = torch.stack([r.worker_sq for r in replies]).sum(0)
        extra = {
            "version_lag": sum(lags) / len(lags),
            "version_lag_max": float(max(lags)),
            "exchange_wait_ms": 1000.0 * self._wait_s,
        }
        center_norm = sum(r.center_sq for r in replies) ** 0.5
        layers = table.sqrt() if self._track else None
        self._stats.append(ExchangeStats(self.clock, table.sum(1).sqrt(), center_norm, layers, extra))

    # ------------------------------------------------------------------ center and local weights

    def _refresh_center(self, consistent: bool) -> None:
        """Read every slice into the snapshot; ``consistent`` brackets the reads with barriers (collective), so that
        no exchange can land in between and every rank gets the same center."""
        if self._pending is not None:
            raise RuntimeError("cannot read the center during an optimizer step")
        if consistent:
            self.service.barrier()
        futures = [self.service.read(owner) for owner in range(self.world_size)]
        with torch.no_grad():
            for owner, future in enumerate(futures):
                values, _ = self.service.wait(future, f"reading the center slice of owner {owner}")
                for flat, value, (lo, hi) in zip(self._center, values, self.service.owner_bounds(owner)):
                    flat[lo:hi].copy_(value)
        if consistent:
            self.service.barrier()

    def _store_center(self, values: list[Tensor]) -> None:
        """Overwrite the snapshot with ``values``, and this rank's own slice of the center with its part of them."""
        super()._store_center(values)
        own = self.service.owner_bounds(self.rank)
        self.service.shard.load([flat[lo:hi] for flat, (lo, hi) in zip(self._center, own)])

    # ------------------------------------------------------------------ shutdown

    def close(self, graceful: bool = True) -> None:
        """Stop the center service (see :meth:`CenterService.close`); the last center snapshot stays readable."""
        self._pending = None
        self.service.close(graceful=graceful)
