"""Worker groups: which global ranks form one EASGD worker, and the process groups the exchange runs on.

With k ranks per worker, worker g is the k consecutive global ranks g·k, ..., g·k + k − 1 (one node when k is the
number of devices per node, as launchers number ranks node by node), and rank j of every worker forms "column" j.
Inside a worker gradients are all-reduced every step (the worker group); between workers, the elastic exchange of
slice j runs on column j only, so inter-node traffic per rank is 1/k of the model.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from datetime import timedelta

import torch.distributed as dist


@dataclass(frozen=True)
class WorkerTopology:
    """Where this rank sits among the workers: resolved once (:meth:`resolve`), then read by every consumer.

    Attributes:
        ranks_per_worker: k, the ranks of one worker.
        num_workers: p = world_size / k.
        worker_index: g = global_rank // k.
        rank_in_worker: j = global_rank % k.
        worker_group: the k ranks of worker g (None when k == 1: a worker is one rank, or before
            :meth:`with_groups`).
        column_group: rank j of every worker (None when k == 1: the whole world, or before :meth:`with_groups`).
    """

    ranks_per_worker: int
    num_workers: int
    worker_index: int
    rank_in_worker: int
    worker_group: dist.ProcessGroup | None = None
    column_group: dist.ProcessGroup | None = None

    @classmethod
    def resolve(cls, ranks_per_worker: int | str, world_size: int, global_rank: int, processes_per_node: int
                ) -> WorkerTopology:
        """The layout of ``world_size`` ranks in workers of ``ranks_per_worker`` (a validated int, or ``"node"``
        for ``processes_per_node``), without process groups.

        Raises:
            ValueError: if ``world_size`` is not a multiple of the ranks per worker.
        """
        k = processes_per_node if ranks_per_worker == "node" else int(ranks_per_worker)
        if world_size % k:
            raise ValueError(
                f"ranks_per_worker={k} does not divide the world size {world_size}: every worker must have the same "
                f"number of ranks; use a divisor of {world_size}"
            )
        return cls(k, world_size // k, global_rank // k, global_rank % k)

    def with_groups(self, timeout: timedelta | None = None) -> WorkerTopology:
        """This layout with its worker and column process groups (collective: every rank calls it in the same
        order, as torch.distributed requires). With one rank per worker there are none to build.

        ``timeout`` is the groups' own collective timeout (torch otherwise gives new groups its default, not the world
        group's): on NCCL it is what ends a stuck exchange or gradient all-reduce. Call :meth:`destroy_groups` when
        done: on NCCL each group holds a communicator.
        """
        k, p = self.ranks_per_worker, self.num_workers
        if k == 1:
            return self
        world_size = k * p
        worker_group, _ = dist.new_subgroups_by_enumeration([list(range(g * k, (g + 1) * k)) for g in range(p)],
                                                             timeout=timeout)
        column_group, _ = dist.new_subgroups_by_enumeration([list(range(j, world_size, k)) for j in range(k)],
                                                             timeout=timeout)
        return replace(self, worker_group=worker_group, column_group=column_group)

    def destroy_groups(self) -> None:
        """Destroy the process groups :meth:`with_groups` built (this rank's worker and column)."""
        for group in (self.worker_group, self.column_group):
            if group is not None:
                dist.destroy_process_group(group)


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
    """:meth:`WorkerTopology.resolve` then :meth:`~WorkerTopology.with_groups` (collective: every rank calls it with
    the same arguments).

    Raises:
        ValueError: if ``world_size`` is not a multiple of ``ranks_per_worker``.
    """
    return WorkerTopology.resolve(ranks_per_worker, world_size, global_rank, ranks_per_worker).with_groups(timeout)
