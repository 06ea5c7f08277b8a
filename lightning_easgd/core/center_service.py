"""The center variable of asynchronous EASGD, sharded across ranks and served over ``torch.distributed.rpc``.

The paper's Algorithm 1 (Zhang, Choromanska & LeCun 2015, arXiv:1412.6651) has a master that holds x̃ and, when a
worker calls in with its parameters x, applies x̃ ← x̃ + α·(x − x̃) and hands back what the worker needs for
x_i ← x_i − α·(x − x̃). One master process would carry the whole model's traffic for all p workers; like the
authors' MPI code (``mpiT``) we split the flattened parameter vector into p contiguous slices and let every rank own
one: each exchange then moves 1/p of the model to each owner, and no rank is a bottleneck.

Transport: TensorPipe RPC, torch's point-to-point transport that works across nodes. By default only its TCP
transport; ``transport="fast"`` adds InfiniBand and shared memory where present (see :class:`CenterService`). The
handler runs on the owner's RPC thread pool, not in its training loop, so a busy or sleeping worker still serves its
slice at once. Each slice has a lock; reading x̃ and adding α·(x − x̃) happen under it, so the update is atomic per
slice, and a version counter counts the updates applied.

Where the center lives: in host memory (CPU) on its owner, also for GPU training. CUDA tensors over RPC need
per-pair device maps and CUDA-stream synchronisation with the training loop that the RPC threads do not see; the
center is touched only every τ steps, 1/p of it per rank, so host memory costs little and keeps the accelerator's
memory and streams for training. Workers copy their slices to the host before sending and the replies back after.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import rpc
from torch.futures import Future

from lightning_easgd.core.buckets import master_dtype
from lightning_easgd.core.worker import ExchangeError

RENDEZVOUS_SCHEME = "easgd-center"
"""URL scheme of the rendezvous handler that hands RPC the store this module creates (see :class:`CenterService`)."""

TRANSPORTS: dict[str, tuple[list[str], list[str]]] = {
    "tcp": (["uv"], ["basic"]),
    "fast": (["ibv", "shm", "uv"], ["cma", "basic"]),
}
"""TensorPipe transports and channels, best first, for each ``transport`` choice (see :class:`CenterService`)."""

_OWNED: dict[str, CenterShard] = {}  # the shard this process owns, by service name (what RPC handlers look up)
_RENDEZVOUS: dict[str, tuple[dist.Store, int, int]] = {}
_REGISTER_LOCK = threading.Lock()


def validate_transport(transport: object) -> str:
    """Return ``transport`` or raise unless it names an entry of :data:`TRANSPORTS`."""
    if transport not in TRANSPORTS:
        raise ValueError(f"rpc_transport={transport!r} is invalid: choose 'tcp' (works everywhere) or 'fast' "
                         "(InfiniBand or shared memory where present, busy-polling a CPU core; TCP otherwise)")
    return transport  # type: ignore[return-value]


def shard_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(numel)`` into ``parts`` contiguous slices whose sizes differ by at most one."""
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for r in range(parts):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class ExchangeReply:
    """What one owner returns for one worker's exchange with its slice.

    Attributes:
        diffs: x − x̃ for this slice, one 1-D tensor per group (x̃ as it was just before this update).
        version: how many updates the slice had received before this one.
        center_sq: ‖x̃‖² of the slice before the update.
        worker_sq: ``[p, n_tensors]`` float64: for every worker, the squared distance ‖x_j − x̃‖² restricted to this
            slice, per tensor, measured at that worker's most recent exchange with this slice (zero before it).
    """

    diffs: list[Tensor]
    version: int
    center_sq: float
    worker_sq: Tensor


class CenterShard:
    """One rank's slice of the center: one 1-D host tensor per (device, dtype) group of the flattened parameters.

    The slice is kept in float32 for 16-bit groups (:func:`~lightning_easgd.core.buckets.master_dtype`): workers
    send x in their own dtype, and x − x̃ and the update x̃ += α·(x − x̃) are computed in the slice's dtype, so that
    updates smaller than a 16-bit spacing still move the center. Replies carry x − x̃ in that dtype too.

    Args:
        values: this rank's slice of each group's flat center (copied, into float32 for 16-bit values).
        segments: per group, ``(tensor index, start, stop)`` of every tensor piece inside this slice, so that the
            shard can report per-tensor distances.
        num_tensors: number of tensors in the model's layout.
        num_workers: p.
        alpha: moving rate α.
    """

    def __init__(
        self,
        values: Sequence[Tensor],
        segments: Sequence[Sequence[tuple[int, int, int]]],
        *,
        num_tensors: int,
        num_workers: int,
        alpha: float,
    ) -> None:
        self.values = [v.detach().to("cpu", dtype=master_dtype(v.dtype), copy=True).contiguous() for v in values]
        self._segments = [list(s) for s in segments]
        self._alpha = alpha
        self._lock = threading.Lock()
        self.version = 0
        self._pending: dict[int, tuple[int, list[Tensor], Future[ExchangeReply]]] = {}
        self._worker_sq = torch.zeros(num_workers, num_tensors, dtype=torch.float64)
        self._piece_index = torch.tensor([i for segs in self._segments for i, _, _ in segs], dtype=torch.long)

    def exchange(self, worker: int, x: list[Tensor], turn: int | None) -> Future[ExchangeReply]:
        """Apply x̃ += α·(x − x̃) for ``worker`` atomically and reply with x − x̃.

        With ``turn`` None the update is applied now. Otherwise it is applied as the update number ``turn`` (0-based)
        of this slice: requests that arrive early wait, without blocking a thread, until every earlier turn is done.
        """
        future: Future[ExchangeReply] = Future()
        done: list[tuple[Future[ExchangeReply], ExchangeReply]] = []
        with self._lock:
            if turn is None or turn == self.version:
                done.append((future, self._apply(worker, x)))
                while self.version in self._pending:
                    w, xs, fut = self._pending.pop(self.version)
                    done.append((fut, self._apply(w, xs)))
            elif turn < self.version or turn in self._pending:
                raise RuntimeError(f"EASGD center: turn {turn} of worker {worker} was already taken (version "
                                   f"{self.version}); workers must take their exchanges in round-robin order")
            else:
                self._pending[turn] = (worker, x, future)
        for fut, reply in done:  # completing a future may send an RPC response: do it outside the lock
            fut.set_result(reply)
        return future

    def _apply(self, worker: int, x: list[Tensor]) -> ExchangeReply:
        # Whole-slice and foreach passes, each on torch's intra-op threads (RPC threads share the process's count).
        diffs = torch._foreach_sub([xi.to(v.dtype) for xi, v in zip(x, self.values)], self.values)
        center_sq = float(torch.stack(torch._foreach_norm(self.values, 2, dtype=torch.float64)).square().sum())
        row = self._worker_sq[worker].zero_()
        if self._piece_index.numel():
            pieces = [d[lo:hi] for d, segs in zip(diffs, self._segments) for _, lo, hi in segs]
            norms = torch.stack(torch._foreach_norm(pieces, 2, dtype=torch.float64))
            row.index_add_(0, self._piece_index, norms.square())
        torch._foreach_add_(self.values, diffs, alpha=self._alpha)
        reply = ExchangeReply(diffs, self.version, center_sq, self._worker_sq.clone())
        self.version += 1
        return reply

    def read(self) -> tuple[list[Tensor], int]:
        """A copy of the slice and its version, taken under the lock."""
        with self._lock:
            return [v.clone() for v in self.values], self.version

    def load(self, values: Sequence[Tensor]) -> None:
        """Overwrite the slice (resuming from a checkpoint)."""
        with self._lock:
            for dst, src in zip(self.values, values):
                dst.copy_(src)


# RPC entry points: module-level functions, so that RPC can name them; they find the shard by service name.


@rpc.functions.async_execution
def _serve_exchange(service: str, worker: int, x: list[Tensor], turn: int | None) -> Future[ExchangeReply]:
    return _OWNED[service].exchange(worker, x, turn)


def _serve_read(service: str) -> tuple[list[Tensor], int]:
    return _OWNED[service].read()


def _rendezvous_handler(url: str, **kwargs: Any) -> Iterator[tuple[dist.Store, int, int]]:
    # RPC's init_rpc performs a rendezvous by URL; ours returns the store CenterService made, so that RPC needs no
    # port of its own besides the one that store listens on.
    name = url.split("://", 1)[1].split("?", 1)[0]
    yield _RENDEZVOUS.pop(name)


def _register_rendezvous_handler() -> None:
    with _REGISTER_LOCK:
        try:
            dist.register_rendezvous_handler(RENDEZVOUS_SCHEME, _rendezvous_handler)
        except RuntimeError:
            pass  # registered earlier in this process


class CenterService:
    """This rank's shard of the center, and the RPC client for everyone else's.

    Construction is collective over the process group (all ranks, same arguments): it creates a gloo group for
    the few collectives the service needs (barriers for consistent snapshots, the rendezvous port), a TCP store on
    rank 0 with a free port, and the RPC agent. With one worker, or without an initialised process group, no RPC is
    started and the only shard is local.

    Args:
        flats: the full initial center, one flat tensor per (device, dtype) group (equal on every rank).
        segments: per group, ``(tensor index, start, stop)`` of every tensor inside the flat vector.
        num_tensors: number of tensors in the layout.
        alpha: moving rate α.
        timeout: seconds any wait may last (an RPC reply, a barrier, the shutdown) before it raises.
        group: process group of the workers (default: the world).
        transport: which TensorPipe transports carry the slices. ``"tcp"`` (default): TCP only, on every link.
            ``"fast"``: InfiniBand verbs between hosts and shared memory (plus cross-memory attach) between the
            processes of one host, wherever TensorPipe finds them usable, TCP for the rest. Both faster
            transports busy-poll one CPU core per process: on a machine without an idle core that steals time
            from training (measured on 2 shared cores: 0.32-1.07 of the no-communication throughput over shared
            memory, 0.97 over TCP), and traffic that avoids TCP is not seen by tools that shape or count it.
    """

    _counter = 0

    def __init__(
        self,
        flats: Sequence[Tensor],
        segments: Sequence[Sequence[tuple[int, int, int]]],
        *,
        num_tensors: int,
        alpha: float,
        timeout: float,
        group: dist.ProcessGroup | None = None,
        transport: str = "tcp",
    ) -> None:
        self.transport = validate_transport(transport)
        distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size(group) if distributed else 1
        self.rank = dist.get_rank(group) if distributed else 0
        self.timeout = float(timeout)
        CenterService._counter += 1  # every rank creates its services in the same order, so names agree
        self.name = f"easgd-center-{CenterService._counter}"
        self.bounds = [shard_bounds(flat.numel(), self.world_size) for flat in flats]
        own = [flat[b[self.rank][0] : b[self.rank][1]] for flat, b in zip(flats, self.bounds)]
        own_segments = [_clip(segs, b[self.rank]) for segs, b in zip(segments, self.bounds)]
        self.shard = CenterShard(own, own_segments, num_tensors=num_tensors, num_workers=self.world_size,
                                 alpha=alpha)
        self._group: dist.ProcessGroup | None = None
        self._rpc = False
        _OWNED[self.name] = self.shard
        if self.world_size > 1:
            try:
                self._start_rpc(group)
            except BaseException:
                self.close(graceful=False)
                raise

    def _start_rpc(self, group: dist.ProcessGroup | None) -> None:
        ranks = None if group is None else dist.get_process_group_ranks(group)
        # A gloo group: barriers and the port broadcast run on host tensors also when the default group is NCCL.
        self._group = dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=self.timeout))
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = torch.zeros(1, dtype=torch.int64)
        store: dist.Store | None = None
        if self.rank == 0:
            # Port 0: the OS picks a free port, so we never collide with the process group's own store.
            tcp = dist.TCPStore(host, 0, self.world_size, True, timedelta(seconds=self.timeout),
                                wait_for_workers=False)
            port[0] = tcp.port
            store = tcp
        dist.broadcast(port, group_src=0, group=self._group)
        if store is None:
            store = dist.TCPStore(host, int(port[0]), self.world_size, False, timedelta(seconds=self.timeout))
        self._store = store
        _register_rendezvous_handler()
        _RENDEZVOUS[self.name] = (store, self.rank, self.world_size)
        options = rpc.TensorPipeRpcBackendOptions(
            init_method=f"{RENDEZVOUS_SCHEME}://{self.name}",
            rpc_timeout=self.timeout,
            # Handlers never block (round-robin waits are futures), so a small pool is enough.
            num_worker_threads=max(8, 2 * self.world_size),
            # Only the transports `transport` names (TensorPipe's own default includes shared memory, which
            # busy-polls): unusable ones (no InfiniBand device, say) are skipped, TCP is always there.
            _transports=TRANSPORTS[self.transport][0],
            _channels=TRANSPORTS[self.transport][1],
        )
        try:
            with warnings.catch_warnings():
                # torch's TensorPipe setup passes an internal gloo backend where a ProcessGroup is expected and
                # warns about its own usage on every rank; nothing a user can act on.
                warnings.filterwarnings("ignore", message=r".*as a ProcessGroup", category=UserWarning)
                rpc.init_rpc(self._worker_name(self.rank), rank=self.rank, world_size=self.world_size,
                             rpc_backend_options=options)
        except RuntimeError as err:
            if "already" in str(err).lower():
                raise RuntimeError(
                    "asynchronous EASGD starts torch.distributed.rpc itself and cannot share it: RPC is already "
                    "initialised in this process"
                ) from err
            raise
        finally:
            _RENDEZVOUS.pop(self.name, None)
        self._rpc = True

    def _worker_name(self, rank: int) -> str:
        return f"{self.name}-worker{rank}"

    def owner_bounds(self, rank: int) -> list[tuple[int, int]]:
        """The slice ``[start, stop)`` that ``rank`` owns in each group's flat vector."""
        return [b[rank] for b in self.bounds]

    # ------------------------------------------------------------------ requests

    def exchange(self, owner: int, worker: int, x: list[Tensor], turn: int | None) -> Future[ExchangeReply]:
        """Send ``worker``'s slice values ``x`` to ``owner`` (which applies the update) and return the reply."""
        if owner == self.rank:
            return self.shard.exchange(worker, x, turn)
        return rpc.rpc_async(self._worker_name(owner), _serve_exchange, args=(self.name, worker, x, turn),
                             timeout=self.timeout)

    def read(self, owner: int) -> Future[tuple[list[Tensor], int]]:
        """Request a copy of ``owner``'s slice and its version."""
        if owner == self.rank:
            future: Future[tuple[list[Tensor], int]] = Future()
            future.set_result(self.shard.read())
            return future
        return rpc.rpc_async(self._worker_name(owner), _serve_read, args=(self.name,), timeout=self.timeout)

    def wait(self, future: Future[Any], what: str) -> Any:
        """Wait for ``future`` at most ``timeout`` seconds (local round-robin turns have no RPC deadline).

        Raises:
            ExchangeError: when the request failed (e.g. its owner died) or took longer than ``timeout``.
        """
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(self.timeout):
            raise ExchangeError(f"EASGD center: {what} did not complete within timeout={self.timeout:g} s on rank "
                                f"{self.rank}; a peer may have died or stalled")
        try:
            return future.value()
        except Exception as error:
            raise ExchangeError(f"EASGD center: {what} failed on rank {self.rank}: {error}. A peer may have died "
                                "or stalled.") from error

    def barrier(self) -> None:
        """Block until every rank has arrived (bounded by ``timeout``); no-op with one worker.

        Raises:
            ExchangeError: when a peer died or did not arrive within ``timeout``.
        """
        if self._group is None:
            return
        try:
            dist.barrier(group=self._group)
        except Exception as error:
            raise ExchangeError(f"EASGD center: a snapshot barrier failed on rank {self.rank}: {error}. A peer may "
                                f"have died or stalled (timeout {self.timeout:g} s).") from error

    # ------------------------------------------------------------------ shutdown

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run: the shard is no longer served and no RPC agent is left."""
        return self.name not in _OWNED

    def close(self, graceful: bool = True) -> None:
        """Stop serving: ``graceful`` waits (at most ``timeout``) until every rank stops, so that no peer loses a
        reply; otherwise only this process's agent stops at once (after an error, when peers may be gone).
        Idempotent."""
        try:
            if self._rpc:
                self._rpc = False
                if graceful:
                    try:
                        rpc.shutdown(graceful=True, timeout=self.timeout)
                    except BaseException:
                        rpc.shutdown(graceful=False)
                        raise
                else:
                    rpc.shutdown(graceful=False)
        finally:
            _OWNED.pop(self.name, None)
            if self._group is not None:
                group, self._group = self._group, None
                dist.destroy_process_group(group)


def _clip(segments: Sequence[tuple[int, int, int]], bounds: tuple[int, int]) -> list[tuple[int, int, int]]:
    """The parts of ``segments`` inside ``bounds``, re-based to the start of the slice."""
    lo, hi = bounds
    return [(i, max(s, lo) - lo, min(e, hi) - lo) for i, s, e in segments if min(e, hi) > max(s, lo)]


__all__ = ["TRANSPORTS", "CenterService", "CenterShard", "ExchangeReply", "shard_bounds", "validate_transport"]
