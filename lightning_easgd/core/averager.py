"""Synchronous Elastic Averaging SGD with a replicated (or group-sharded) center, in plain torch.distributed.

Paper Eq. 5-6, applied every τ optimizer steps (Zhang, Choromanska & LeCun 2015, arXiv:1412.6651)::

    x_i ← x_i − η·g_i(x_i) − α·(x_i − x̃)
    x̃   ← x̃ + α·Σ_i (x_i − x̃)

Both right-hand sides use the values from *before* the step, so the elastic difference d_i = x_i − x̃ is taken
before the local optimizer runs and applied after it. Every rank keeps its own copy of x̃ and updates it from
the same all-reduced Σ_i d_i, so the copies stay bit-identical and one SUM all-reduce per exchange is all the
communication there is. Because d_i is known before the forward/backward pass, that all-reduce can run while the
gradient is computed: :meth:`ElasticAverager.step` launches it on entry and waits on exit.

Worker groups: when one worker is a group of k ranks that keep identical weights (a data-parallel group, e.g. the
GPUs of one node), rank j of every group owns slice j of every flat bucket: it keeps only that slice of x̃ and of
d_i, all-reduces it with rank j of the other groups (its "column"), and the group then all-gathers the slices of
d_i so that every rank applies the same pull to the whole model. Each rank sends 1/k of the model per exchange and
holds 3/k of it in exchange buffers, plus one bucket for the gather.

The optimizer and its state (momentum buffers) are never touched: EAMSGD (the paper's Algorithm 2) is this
averager around a Nesterov-momentum SGD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from typing_extensions import override

from lightning_easgd.core.buckets import ShardLayout, broadcast_tensors, master_dtype
from lightning_easgd.core.center_momentum import make_center_momentum
from lightning_easgd.core.config import ExchangeConfig, config_from
from lightning_easgd.core.family import GradientAverage, subtract_center_step
from lightning_easgd.core.pinned import pinned_empty
from lightning_easgd.core.staging import copy_to_host
from lightning_easgd.core.worker import ElasticWorker, ExchangeError, ExchangeStats, NonFiniteWorkerError


def _all_gather(output: Tensor, input: Tensor, group: dist.ProcessGroup | None) -> dist.Work:
    """Start gathering every rank's equal-sized ``input`` into ``output``; recent torch renamed the collective
    (all_gather_into_tensor warns on every call there)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(output, input, group=group, async_op=True)
    assert work is not None
    return work


@dataclass
class _PendingExchange:
    works: list[dist.Work]
    stats: Tensor


class ElasticAverager(ElasticWorker):
    """The elastic exchange between one worker's tensors and the center, replicated on every rank or sharded over
    the ranks of a worker group.

    All ranks must construct it collectively, with the same tensors (same names, shapes, dtypes, order) holding
    the same values: the center starts as a copy of them (use :func:`~lightning_easgd.core.broadcast_tensors`
    first). Tensors are updated in place, so the same ``Parameter`` objects stay registered with the optimizer.

    Args:
        named_tensors: the tensors that take part in the exchange (parameters and floating-point buffers), with
            names used in statistics and state dicts.
        config: the exchange's options (:class:`~lightning_easgd.core.config.ExchangeConfig`: τ and the warm-up,
            α or β, overlap, bucket size, center device, exchange dtype, center momentum, the divergence guard,
            the timeout, per-tensor distances, the worker pull and the synchronous start), taken whole. Instead of a
            config, its options may be given as keyword arguments (``ElasticAverager(named, tau=4, alpha=0.25)``), which
            builds one.
        group: process group of the workers (default: the world). With worker groups: the "column" of this rank,
            i.e. the ranks with the same rank-in-worker in every worker (rank g of it is worker g).
        worker_group: the process group of this rank's worker (k ranks holding identical weights, e.g. under
            DistributedDataParallel), or None when every rank is its own worker. Its ranks split the center.
        follow_first_rank: names of tensors the ranks of a worker may hold differently (DistributedDataParallel's
            buffers, which every rank updates from its own batch and DDP overwrites with the worker's first rank's
            at each forward): before an exchange or evaluation they are broadcast from the worker's first rank.

    What the options mean here: the exchanges happen at the start of the steps the schedule names (t = τ, 2τ, ...
    without a warm-up). ``overlap`` launches the all-reduce before the step and waits after it. ``on_nonfinite``:
    non-finite differences never reach the center: a worker's flag is derived from ‖d_i‖ on the device, its
    contribution is masked to zero there, and the flag travels in the same exchange; ``"raise"`` makes every rank
    raise :class:`NonFiniteWorkerError` naming the workers and the step (the center keeps its last finite value),
    ``"reset"`` applies the other workers' differences as usual and resets the flagged workers to the new center
    (see :meth:`pop_resets`). ``timeout`` is honoured by gloo only: on NCCL a stuck collective is ended by the
    process group's own timeout and watchdog (``Work.wait(timeout)`` only polls on the host there, and the
    watchdog may abort the process first). ``center_device="cpu"`` keeps the center and d_i in (pinned, with CUDA)
    host memory and streams them through one bucket-sized device buffer at each exchange. ``exchange_dtype``
    bfloat16 halves the bytes on the wire; the center and the pull x −= α·d_i stay in full precision.
    ``worker_pull="reset"``: after the center's step every worker lands on the new center plus its own update of this
    step, x_i ← x_i − d_i + (x̃_new − x̃_old) (local SGD, SlowMo, DiLoCo; :mod:`~lightning_easgd.core.family`).
    ``sync_steps``: optimizer steps t < N average the gradients over all workers (the caller calls
    :meth:`average_gradients` between backward and the optimizer's update, while :attr:`synchronous`) and the
    center follows the identical workers; exchanges then fall on t > N with (t − N) % τ == 0. ``sync_epochs`` is
    turned into steps by the adapter, once an epoch's length is known (:meth:`set_sync_steps`).

    Memory on each rank besides the model, with k ranks per worker: the center slice, the d_i slice and (with more
    than one worker) the reduction slice, ⌈n/k⌉ elements each per bucket of n (float32 for 16-bit tensors), plus
    with k > 1 one bucket to gather a full bucket into, plus with ``center_device`` one slice-sized device buffer
    (the others then live in host memory). :attr:`buffer_bytes` and :attr:`device_buffer_bytes` report it.
    """

    def __init__(
        self,
        named_tensors: Sequence[tuple[str, Tensor]],
        config: ExchangeConfig | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        worker_group: dist.ProcessGroup | None = None,
        follow_first_rank: Sequence[str] = (),
        **options: Any,
    ) -> None:
        config = config_from(config, options, type(self).__name__)
        self.worker_pull = config.worker_pull
        self._host = config.center_device
        self._wire_dtype = config.exchange_dtype
        distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        self.worker_group = worker_group
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        """This worker's index among the ``world_size`` workers (its rank in ``group``)."""
        self.ranks_per_worker = dist.get_world_size(worker_group) if distributed and worker_group is not None else 1
        self.rank_in_worker = dist.get_rank(worker_group) if self.ranks_per_worker > 1 else 0
        self._first_rank = dist.get_global_rank(worker_group, 0) if self.ranks_per_worker > 1 else 0
        self._global_rank = dist.get_rank() if distributed else 0
        self._nccl = distributed and dist.get_backend(group) == "nccl"
        self._follow_names = tuple(follow_first_rank)
        super().__init__(named_tensors, config, num_workers=self.world_size)
        # The velocity has the center's shape: with worker groups, this rank's slice of it.
        self.center_momentum = make_center_momentum(self._center, config.center_momentum, config.center_nesterov)
        unknown = set(self._follow_names) - set(self.names)
        if unknown:
            raise ValueError(f"follow_first_rank names tensors that are not averaged: {sorted(unknown)}")
        self._follow = [t for name, t in zip(self.names, self.tensors) if name in self._follow_names]
        self._stats_host: Tensor | None = None
        self._pending: _PendingExchange | None = None
        self._average = GradientAverage(
            [t for t in self.tensors if not isinstance(t, torch.nn.Parameter)], self.group, self.world_size,
            self._wait_for, self.ranks_per_worker, self.rank_in_worker,
            lambda output, part: _all_gather(output, part, self.worker_group))
        self._sync: bool | None = None  # in a synchronous step: whether its gradients were averaged; else None

    def _init_center(self) -> None:
        devices = {b.device for b in self.layout.buckets}
        if len(devices) > 1:
            raise ValueError(
                f"the averaged tensors live on several devices ({', '.join(sorted(map(str, devices)))}): put every "
                "parameter and floating-point buffer on one device"
            )
        self._masters = [master_dtype(b.dtype) for b in self.layout.buckets]
        pin = self._host is not None and torch.cuda.is_available()
        self._shard = ShardLayout(self.layout, self.ranks_per_worker, self.rank_in_worker)
        self._x_seg = self._shard.tensor_views(self.tensors, self.names)
        # Device scratch space, reused bucket after bucket: the slice staged from host memory, and the gathered
        # full bucket of a worker group.
        wires = [self._wire_dtype or m for m in self._masters] if self.world_size > 1 else list(self._masters)
        itemsize = max(torch.empty((), dtype=d).element_size() for d in (*self._masters, *wires))
        largest = max(self._shard.slice_numels)
        device = self.layout.buckets[0].device
        self._stage = (torch.empty(largest * itemsize, dtype=torch.uint8, device=device)
                       if self._host is not None else None)
        self._gather = (torch.empty(largest * self.ranks_per_worker * itemsize, dtype=torch.uint8, device=device)
                        if self.ranks_per_worker > 1 else None)
        self._center = self._shard.allocate(self._masters, device=self._host, pin=pin)
        self._center_seg = self._shard.views(self._center)
        # d_i is idle between exchanges: it keeps this rank's slice of the local values while the center is swapped in.
        self._diff = self._shard.allocate(self._masters, device=self._host, pin=pin)
        # The all-reduce overwrites its buffer with Σ_i d_i while this worker still needs its own d_i.
        self._sum = self._shard.allocate(wires, device=self._host, pin=pin) if self.world_size > 1 else self._diff
        self._wires = wires
        self._diff_seg = self._shard.views(self._diff)
        self._seg_tensor = torch.tensor([s.tensor for s in self._shard.segments], dtype=torch.long,
                                        device=self._diff[0].device)
        with torch.no_grad():
            self._capture(self._center)

    # ------------------------------------------------------------------ sizes

    @property
    def bytes_per_exchange(self) -> int:
        """Bytes each rank sends into one exchange's column all-reduce (1/k of the model with k ranks per worker)."""
        return self._shard.nbytes(self._wires)

    @property
    def bytes_per_sync_step(self) -> int:
        """Bytes each rank sends into the workers' all-reduce of one step of the synchronous start: the gradients of
        the parameters and the floating-point buffers (1/k of them with k ranks per worker, padded to k slices)."""
        return self._average.nbytes([t for t in self.tensors if isinstance(t, torch.nn.Parameter)])

    def bytes_sent(self, clock: int | None = None) -> tuple[int, int]:
        """Bytes this rank sent in steps 0 to ``clock`` − 1 (default: the steps taken so far), as ``(synchronous
        start, exchanges)``; a function of the clock, so a resumed run counts what an uninterrupted one would."""
        clock = self.clock if clock is None else clock
        synchronous = min(clock, self.schedule.sync_steps) * self.bytes_per_sync_step
        exchanges = self.schedule.exchange_index(clock - 1) * self.bytes_per_exchange if clock > 0 else 0
        return synchronous, exchanges

    def set_sync_steps(self, sync_steps: int) -> None:
        """Set the synchronous start's length once it is known (``sync_epochs`` × the steps of an epoch), before
        training; the config and the schedule stay a function of the clock.

        Raises:
            RuntimeError: during an optimizer step.
            ValueError: for an invalid length (as :class:`~lightning_easgd.core.config.ExchangeConfig` checks it).
        """
        if self._pending is not None or self._sync is not None:
            raise RuntimeError("the synchronous start cannot change during an optimizer step")
        self.config = replace(self.config, sync_steps=sync_steps, sync_epochs=0)
        self.schedule = self.config.schedule

    @property
    def buffer_bytes(self) -> int:
        """Memory the exchange holds besides the model, wherever it lives (see also :attr:`device_buffer_bytes`)."""
        return self._slice_bytes() + self._scratch_bytes()

    @property
    def device_buffer_bytes(self) -> int:
        """The part of :attr:`buffer_bytes` on the tensors' device (all of it unless ``center_device="cpu"``)."""
        return self._scratch_bytes() + (self._slice_bytes() if self._host is None else 0)

    def _scratch_bytes(self) -> int:
        return sum(t.numel() for t in (self._stage, self._gather) if t is not None)  # uint8 buffers

    def _slice_bytes(self) -> int:
        """Bytes of the persistent slices (center, d_i, sum), in host memory with ``center_device="cpu"``."""
        velocity = self.center_momentum.velocity if self.center_momentum is not None else []
        unique = {id(t): t for t in (*self._center, *self._diff, *self._sum, *velocity)}
        return sum(t.numel() * t.element_size() for t in unique.values())

    # ------------------------------------------------------------------ the exchange

    @property
    def synchronous(self) -> bool:
        """Whether the next optimizer step belongs to the synchronous start (its gradients must be averaged)."""
        return self.schedule.synchronous(self.clock)

    def average_gradients(self, parameters: Sequence[Tensor]) -> None:
        """In a step of the synchronous start, between backward and the optimizer's update: average the gradients
        of ``parameters`` (the stepping optimizer's) and the floating-point buffers over all workers. A second call
        in the same step (e.g. clipping, then the update) does nothing; outside the synchronous start it raises."""
        if self._sync is None:
            raise RuntimeError(
                f"average_gradients() was called outside a step of the synchronous start (step {self.clock}, "
                f"sync_steps={self.schedule.sync_steps}); call it inside `with averager.step():` while "
                "`averager.synchronous` is True"
            )
        if not self._sync:
            self._sync_followers()
            self._average(parameters)
            self._sync = True

    @override
    def _abandon(self) -> None:
        super()._abandon()
        self._sync = None

    @override
    def _begin(self) -> None:
        self._check_can_step()
        if self._sync is not None:
            raise RuntimeError(f"{type(self).__name__}.step() was entered again before the previous step finished")
        if self.synchronous:
            self._sync = False
            return
        if not self.exchange_due:
            return
        with torch.no_grad():
            self._sync_followers()
            self._capture(self._diff)
            for diff, center in zip(self._diff, self._center):
                diff.sub_(center)
            mine = self._local_stats()
            works: list[dist.Work] = []
            if self.ranks_per_worker > 1:
                # The worker's ‖d‖² from its slices; a non-finite slice anywhere flags the whole worker.
                self._wait_for([dist.all_reduce(mine, group=self.worker_group, async_op=True)])
            stats = self._stats_vector(mine)
            if self.world_size > 1:
                # One async all-reduce per bucket. torch.distributed._coalescing_manager could fuse them, but it is
                # private, its gloo support has changed between releases, and with 256 MB buckets on CUDA there
                # are few calls to fuse; large buckets are the stable way to keep NCCL's per-call cost small.
                # Device-side mask: a diverged worker sends zeros, decided without reading anything on the host.
                diverged = mine[0].isfinite().logical_not()
                for index, (total, diff) in enumerate(zip(self._sum, self._diff)):
                    wire = total if self._host is None else self._staged(index, self._wires[index])
                    wire.copy_(diff)
                    wire.masked_fill_(diverged, 0)
                    work = dist.all_reduce(wire, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                    if self._host is None:
                        works.append(work)
                    else:  # one device buffer: finish this bucket before the next one uses it
                        self._wait_for([work])
                        total.copy_(wire)
                works.append(dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group, async_op=True))
        self._pending = _PendingExchange(works, stats)
        if not self.overlap:
            self._wait()

    def _wait(self) -> None:
        assert self._pending is not None
        try:
            self._wait_for(self._pending.works)
        except ExchangeError:
            self._pending = None
            raise
        self._pending.works.clear()

    def _wait_for(self, works: list[dist.Work], consequence: str = "the center was not updated") -> None:
        try:
            for work in works:
                # On NCCL a wait with a timeout only polls on the host, and the watchdog (process-group timeout,
                # TORCH_NCCL_ASYNC_ERROR_HANDLING) may abort the process first: there the process group's timeout
                # is the mechanism, and the plain wait only orders the current stream after the collective.
                if self.timeout is None or self._nccl:
                    work.wait()
                else:
                    work.wait(self.timeout)
        except Exception as error:
            raise ExchangeError(
                f"EASGD exchange at step {self.clock} failed on rank {self._global_rank}{self._worker_label()}: "
                f"{error}. A peer may have died or stalled"
                f"{'' if self.timeout is None else f' (timeout {self.timeout.total_seconds():g} s)'}; {consequence}."
            ) from error

    @override
    def _end(self) -> None:
        if self._sync is not None:
            averaged, self._sync = self._sync, None
            if not averaged:
                raise RuntimeError(
                    f"optimizer step {self.clock} belongs to the synchronous start (sync_steps="
                    f"{self.schedule.sync_steps}) but ended without average_gradients(): the workers would drift apart"
                )
            with torch.no_grad():
                self._capture(self._center)  # the workers are identical: the center follows them
        elif self._pending is not None:
            self._wait()
            stats = self._pending.stats
            with torch.no_grad():
                if self.world_size > 1:
                    # An overflowing sum (finite inputs, inf total) must not reach the center either. With worker
                    # groups each rank sums only its slice: the check is summed over the worker (on the device, no
                    # host wait) so that all its ranks take the same decision; one raising while the others wait in
                    # the gather of the pull would hang them.
                    check = self._squared_norm(self._sum).to(stats.device)
                    if self.ranks_per_worker > 1:
                        self._wait_for([dist.all_reduce(check, group=self.worker_group, async_op=True)])
                    stats[-1] = check
            values = self._read(stats)
            self._pending = None
            p = self.world_size
            # Each worker's distance slot is its own ‖d‖² plus the others' zeros, so a NaN or inf there is a flag.
            flagged = tuple(g for g in range(p) if not values[g].isfinite())
            if not values[-1].isfinite() and len(flagged) < p:
                raise ExchangeError(
                    f"EASGD exchange at step {self.clock}: the sum of the workers' elastic differences overflowed on "
                    f"rank {self._global_rank}{self._worker_label()} although every worker's difference was finite; "
                    "the center was not updated. Lower the learning rate or use exchange_dtype=None."
                )
            if flagged and self.on_nonfinite == "raise":
                raise NonFiniteWorkerError(
                    f"EASGD: worker(s) {', '.join(map(str, flagged))} of {p} have non-finite parameters or buffers at "
                    f"optimizer step {self.clock} (the elastic difference x_i - center is NaN or inf). The exchange "
                    "was abandoned and the center keeps its last finite value; lower the learning rate, or pass "
                    "on_nonfinite='reset' to reset diverged workers to the center."
                )
            with torch.no_grad():
                if len(flagged) < p and self.center_momentum is not None:
                    self.center_momentum.apply(self._center, self._sum, self.alpha)
                elif len(flagged) < p:  # flagged workers contributed zeros, so the sum holds the finite differences
                    for center, total in zip(self._center, self._sum):
                        center.add_(total, alpha=self.alpha)
                if self.rank in flagged:
                    self._expand(self._center, torch._foreach_copy_)
                elif self.worker_pull == "reset":  # x_i ← x_i' − (d_i − (x̃_new − x̃_old))
                    subtract_center_step(self._diff, self._sum, self.alpha, self.center_momentum)
                    self._expand(self._diff, torch._foreach_sub_)
                else:
                    alpha = self.alpha
                    self._expand(self._diff, lambda xs, ds: torch._foreach_add_(xs, ds, alpha=-alpha))
            if flagged:
                self._resets.append((self.clock, flagged))
            if self._track is not None:
                self._record_stats(values)
        self.clock += 1

    def _worker_label(self) -> str:
        return f" (worker {self.rank})" if self.ranks_per_worker > 1 else ""

    # ------------------------------------------------------------------ moving slices between buffers and tensors

    def _staged(self, bucket: int, dtype: torch.dtype) -> Tensor:
        """The device scratch buffer, viewed as ``bucket``'s slice in ``dtype``."""
        assert self._stage is not None
        n = self._shard.slice_numels[bucket]
        return self._stage[: n * torch.empty((), dtype=dtype).element_size()].view(dtype)

    def _capture(self, slices: list[Tensor]) -> None:
        """Copy this rank's slice of the tensors into ``slices`` (through the device buffer when they are on the
        host: one device-to-host copy per bucket instead of one per tensor)."""
        if self._host is None:
            torch._foreach_copy_(self._shard.views(slices), self._x_seg)
            return
        for index, flat in enumerate(slices):
            staged = self._staged(index, flat.dtype)
            staged.zero_()
            segments = self._shard.segments_in(index)
            if len(segments):
                torch._foreach_copy_(self._shard.slice_views(index, staged),
                                     [self._x_seg[i] for i in segments])
            flat.copy_(staged)

    def _expand(self, slices: list[Tensor], apply: Callable[[list[Tensor], list[Tensor]], object]) -> None:
        """For every bucket, bring the worker's full bucket of ``slices`` to the tensors' device (staged from the
        host, gathered from the worker's ranks) and call ``apply(tensors, values)`` on its tensors."""
        for index, flat in enumerate(self._full_buckets(slices)):
            bucket = self.layout.buckets[index]
            apply([self.tensors[i] for i in bucket.indices], self.layout.bucket_views(index, flat))

    def _full_buckets(self, slices: list[Tensor]) -> Iterator[Tensor]:
        """Each bucket's full (padded) flat values, assembled from the worker's slices, one bucket at a time; the
        buffer yielded is reused for the next bucket."""
        k = self.ranks_per_worker
        for index, flat in enumerate(slices):
            if self._host is not None:
                staged = self._staged(index, flat.dtype)
                staged.copy_(flat)
                flat = staged
            if k > 1:
                assert self._gather is not None
                n = flat.numel() * k
                full = self._gather[: n * flat.element_size()].view(flat.dtype)
                self._wait_for([_all_gather(full, flat, self.worker_group)],
                               "this worker's weights may now be partly updated")
                flat = full
            yield flat

    def _sync_followers(self) -> None:
        """Give the worker's ranks its first rank's copy of the tensors they update separately (DDP's buffers)."""
        if self.ranks_per_worker > 1 and self._follow:
            broadcast_tensors(self._follow, src=self._first_rank, group=self.worker_group)

    # ------------------------------------------------------------------ center and local weights

    def use_center(self) -> None:
        """Put the center into the tensors (for evaluation), keeping this rank's slice of the local values aside;
        collective within the worker group (which gathers the center's slices)."""
        if self._center_in_use:
            raise RuntimeError("the center weights are already swapped in")
        if self._pending is not None:
            raise RuntimeError("cannot swap in the center during an optimizer step")
        with torch.no_grad():
            self._sync_followers()
            self._capture(self._diff)
            self._expand(self._center, torch._foreach_copy_)
        self._center_in_use = True

    def restore_local(self) -> None:
        """Undo :meth:`use_center`: the tensors get back exactly the local values they had (collective within the
        worker group)."""
        if not self._center_in_use:
            raise RuntimeError("the center weights are not swapped in")
        with torch.no_grad():
            self._expand(self._diff, torch._foreach_copy_)
        self._center_in_use = False

    def adopt_center(self) -> None:
        """Make the center this worker's weights for good (end of training); collective within the worker group."""
        if self._center_in_use:
            self._center_in_use = False
            return
        with torch.no_grad():
            self._expand(self._center, torch._foreach_copy_)

    def center_values(self) -> list[Tensor]:
        """The full center, one tensor per averaged tensor, in the center's dtype and on its device.

        With one rank per worker these are views of the center (read-only by convention; clone to keep them). With
        worker groups the center is sharded and this is a collective within the worker group that returns a fresh
        full copy: every rank of the worker must call it (Lightning calls
        :meth:`~lightning_easgd.EASGDStrategy.lightning_module_state_dict` on every rank when it saves).
        """
        return self._full_values(self._center)

    def local_values(self) -> list[Tensor]:
        """This worker's own values, one per tensor, also while the center is swapped in (then a collective within
        the worker group with worker groups)."""
        if not self._center_in_use:
            return list(self.tensors)
        if self.ranks_per_worker == 1:
            return self.layout.views(self._diff)
        return self._gathered(self._diff)

    def load_local(self, values: Sequence[Tensor]) -> None:
        """Set this worker's own values (e.g. when resuming), also while the center is swapped in."""
        self._check_values(values, "local values")
        with torch.no_grad():
            if self._center_in_use:
                torch._foreach_copy_(self._diff_seg, self._shard.value_views(list(values)))
            else:
                torch._foreach_copy_(self.tensors, list(values))

    def _store_center(self, values: list[Tensor]) -> None:
        """Keep this rank's slice of the full center ``values``."""
        with torch.no_grad():
            self._store_values(self._center, values)

    def _full_values(self, flats: list[Tensor]) -> list[Tensor]:
        """Views of whole buffers with one rank per worker; with worker groups a fresh full copy gathered from the
        worker's slices (collective within the worker group)."""
        if self.ranks_per_worker == 1:
            return self.layout.views(flats)
        return self._gathered(flats)

    def _store_values(self, flats: list[Tensor], values: list[Tensor]) -> None:
        torch._foreach_copy_(self._shard.views(flats), self._shard.value_views(values))

    def _gathered(self, slices: list[Tensor]) -> list[Tensor]:
        """A fresh full copy of the worker's ``slices``, per tensor, on the slices' device (collective)."""
        out = [torch.empty(b.numel, dtype=s.dtype, device=s.device) for b, s in zip(self.layout.buckets, slices)]
        with torch.no_grad():
            for index, flat in enumerate(self._full_buckets(slices)):
                out[index].copy_(flat[: out[index].numel()])
        return self.layout.views(out)

    def checkpoint_center(self, writer: bool) -> list[Tensor] | None:
        """As :meth:`ElasticWorker.checkpoint_center`; with worker groups the center's slices are gathered to the
        writer only, bucket by bucket into host memory, and the other ranks get None (they allocate nothing)."""
        if self.ranks_per_worker == 1:
            return super().checkpoint_center(writer)
        return self._gathered_on_writer(self._center, writer)

    def checkpoint_velocity(self, writer: bool) -> dict[str, Tensor] | None:
        """As :meth:`ElasticWorker.checkpoint_velocity`, gathered to the writer only with worker groups."""
        if self.ranks_per_worker == 1 or self.center_momentum is None:
            return super().checkpoint_velocity(writer)
        values = self._gathered_on_writer(self.center_momentum.velocity, writer)
        return None if values is None else dict(zip(self.names, values))

    def checkpoint_local(self) -> list[Tensor] | None:
        """As :meth:`ElasticWorker.checkpoint_local`; while the center is swapped in with worker groups, the local
        values' slices are gathered to the worker's first rank only, into host memory (None on its other ranks)."""
        if self.ranks_per_worker == 1 or not self._center_in_use:
            return super().checkpoint_local()
        return self._gathered_on_writer(self._diff, self.rank_in_worker == 0, every_worker=True)

    def _gathered_on_writer(self, slices: list[Tensor], writer: bool, every_worker: bool = False
                            ) -> list[Tensor] | None:
        """The full values of the worker's ``slices`` in host memory on ``writer``, which must be its worker's first
        rank (and, unless ``every_worker``, in worker 0: global rank 0, the main file's writer); None on every other
        rank. Collective within the worker group (worker 0's only, unless ``every_worker``): its ranks send their
        slices bucket by bucket into the writer's one-bucket gather buffer, which is copied to the host before the
        next bucket, so no rank holds more than one bucket of it on the device."""
        if writer and (self.rank_in_worker != 0 or not (every_worker or self.rank == 0)):
            raise ValueError(
                f"the writer must be the first rank of {'its worker' if every_worker else 'worker 0'}, not rank "
                f"{self.rank_in_worker} of worker {self.rank}"
            )
        if not every_worker and self.rank != 0:  # another worker: nothing to send
            return None
        assert self._gather is not None
        k = self.ranks_per_worker
        out = [torch.empty(b.numel, dtype=s.dtype, device="cpu") for b, s in zip(self.layout.buckets, slices)
               ] if writer else None
        with torch.no_grad():
            for index, flat in enumerate(slices):
                if self._host is not None:  # host slices travel through the device, as in an exchange
                    staged = self._staged(index, flat.dtype)
                    staged.copy_(flat)
                    flat = staged
                full = self._gather[: flat.numel() * k * flat.element_size()].view(flat.dtype)
                parts = list(full.view(k, -1).unbind(0)) if writer else None
                work = dist.gather(flat, parts, group=self.worker_group, group_dst=0, async_op=True)
                assert work is not None
                self._wait_for([work], "the checkpoint was not written")
                if out is not None:
                    out[index].copy_(full[: out[index].numel()])
        return None if out is None else self.layout.views(out)

    # ------------------------------------------------------------------ statistics

    def _squared_norm(self, tensors: Sequence[Tensor]) -> Tensor:
        """Σ‖t‖² over ``tensors`` in float64 (0 for none), on their device."""
        if not tensors:
            return torch.zeros((), dtype=torch.float64, device=self._diff[0].device)
        return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float64)).square().sum()

    def _local_stats(self) -> Tensor:
        """This rank's ``[‖d‖², ‖d_t‖² per tensor (when tracked per tensor), ‖x̃‖² (when tracked)]``, float64 on the
        tensors' device. Sums over this rank's slice only; a worker group all-reduces them to the worker's."""
        n = len(self.tensors) if self.config.per_tensor_distances else 0  # the same size on every rank
        out = torch.zeros(2 + n, dtype=torch.float64, device=self._diff[0].device)
        if self._diff_seg:
            squares = torch.stack(torch._foreach_norm(self._diff_seg, 2, dtype=torch.float64)).square()
            out[0] = squares.sum()
            if n:
                out[1 : 1 + n].index_add_(0, self._seg_tensor, squares)
        if self._track is not None:
            out[-1] = self._squared_norm(self._center_seg)
        return out.to(self.layout.buckets[0].device)

    def _stats_vector(self, mine: Tensor) -> Tensor:
        """The exchange's statistics: ``[‖d_g‖² for every worker g, per-tensor ‖d_g,t‖² (p × n), ‖x̃‖², Σ-check]``;
        each worker fills its own slots (worker 0 the center's) and the column all-reduce sums them."""
        p, g = self.world_size, self.rank
        n = mine.numel() - 2
        stats = torch.zeros(p * (1 + n) + 2, dtype=torch.float64, device=mine.device)
        stats[g] = mine[0]
        if n:
            stats[p + g * n : p + (g + 1) * n] = mine[1 : 1 + n]
        if g == 0:
            stats[-2] = mine[-1]
        return stats

    def _read(self, stats: Tensor) -> Tensor:
        """The statistics on the host: the exchange's one host synchronisation, through a pinned buffer on CUDA
        (a sleeping wait on the statistics' device's stream, see :func:`~lightning_easgd.core.staging.copy_to_host`)."""
        if stats.device.type != "cuda":
            return stats
        if self._stats_host is None or self._stats_host.numel() != stats.numel():
            self._stats_host = pinned_empty(stats.numel(), stats.dtype)
        return copy_to_host(self._stats_host, stats)

    def _record_stats(self, values: Tensor) -> None:
        p = self.world_size
        n = (values.numel() - 2) // p - 1
        layers = values[p : p + p * n].view(p, n).sqrt() if self._track else None
        self._stats.append(ExchangeStats(self.clock, values[:p].sqrt(), float(values[-2].sqrt()), layers))
