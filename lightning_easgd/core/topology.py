"""Worker groups: which global ranks form one EASGD worker, and the process groups the exchange runs on.

With k ranks per worker, worker g is the k consecutive global ranks g·k, ..., g·k + k − 1 (one node when k is the
number of devices per node, as launchers number ranks node by node), and rank j of every worker forms "column" j.
Inside a worker gradients are all-reduced every step (the worker group); between workers, the elastic exchange of
slice j runs on column j only, so inter-node traffic per rank is 1/k of the model.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class WorkerTopology:
    """Where this rank sits among the workers.

    Attributes:
        ranks_per_worker: k, the ranks of one worker.
        num_workers: p = world_size / k.
        worker_index: g = global_rank // k.
        rank_in_worker: j = global_rank % k.
        worker_group: the k ranks of worker g (None when k == 1: a worker is one rank).
        column_group: rank j of every worker (None when k == 1: the whole world).
    """

    ranks_per_worker: int
    num_workers: int
    worker_index: int
    rank_in_worker: int
    worker_group: dist.ProcessGroup | None
    column_group: dist.ProcessGroup | None


def validate_ranks_per_worker(ranks_per_worker: object) -> int | str:
    """An integer >= 1 or ``"node"`` (the number of ranks per node, resolved by the strategy)."""
    if ranks_per_worker == "node":
        return "node"
    if isinstance(ranks_per_worker, bool) or not isinstance(ranks_per_worker, numbers.Integral) or ranks_per_worker < 1:
        raise ValueError(
            f"ranks_per_worker={ranks_per_worker!r} is invalid: it must be an integer >= 1 or 'node' (the number of "
            "processes per node)"
        )
    return int(ranks_per_worker)


def worker_topology(
    ranks_per_worker: int, world_size: int, global_rank: int, timeout: timedelta | None = None
) -> WorkerTopology:
    """Build the worker and column process groups (collective: every rank calls it with the same arguments).

    ``timeout`` is the groups' own collective timeout (torch otherwise gives new groups its default, not the world
    group's): on NCCL it is what ends a stuck exchange or gradient all-reduce.

    Raises:
        ValueError: if ``world_size`` is not a multiple of ``ranks_per_worker``.
    """
    k = ranks_per_worker
    if world_size % k:
        raise ValueError(
            f"ranks_per_worker={k} does not divide the world size {world_size}: every worker must have the same "
            f"number of ranks; use a divisor of {world_size}"
        )
    p = world_size // k
    if k == 1:
        return WorkerTopology(1, p, global_rank, 0, None, None)
    # Every rank creates every group, in the same order, as torch.distributed requires.
    worker_group, _ = dist.new_subgroups_by_enumeration([list(range(g * k, (g + 1) * k)) for g in range(p)],
                                                         timeout=timeout)
    column_group, _ = dist.new_subgroups_by_enumeration([list(range(j, world_size, k)) for j in range(k)],
                                                         timeout=timeout)
    return WorkerTopology(k, p, global_rank // k, global_rank % k, worker_group, column_group)
