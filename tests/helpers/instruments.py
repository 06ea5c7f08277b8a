"""Instruments: a callback that records what the tests compare, and counters of torch.distributed collectives."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor


class Recorder(L.Callback):
    """Saves, on every rank, what the tests compare: local weights, the center, and what evaluation saw."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.val_seen: list[dict[str, Tensor]] = []
        self.collectives: list[tuple[int, dict[str, int]]] = []
        self.traffic: list[tuple[int, list[tuple[str, tuple[int, ...], int]]]] = []  # per batch, see TRAFFIC
        self._traffic_at = 0
        self.start_state: dict[str, Tensor] = {}
        self._before: dict[str, int] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.start_optim = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not trainer.sanity_checking and args[-1] == 0:  # first batch of a real validation run
            self.val_seen.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    # Collectives are counted over the whole training loop iteration of each batch: from the end of the previous
    # batch (or the start of the epoch, or the end of a validation run) to the end of this one, so that whatever
    # the loop does before `on_train_batch_start` counts too.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before = dict(COUNTS)
        self._traffic_at = len(TRAFFIC)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before = dict(COUNTS)
        self._traffic_at = len(TRAFFIC)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        diff = {k: COUNTS.get(k, 0) - self._before.get(k, 0) for k in COUNTS}
        self.collectives.append((trainer.global_step, {k: v for k, v in diff.items() if v}))
        self.traffic.append((trainer.global_step, TRAFFIC[self._traffic_at :]))
        self._before = dict(COUNTS)
        self._traffic_at = len(TRAFFIC)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        averager = strategy.averager
        torch.save(
            {
                "local": {k: v.clone() for k, v in pl_module.state_dict().items()},
                "center": {n: v.clone() for n, v in zip(averager.names, averager.center_values())},
                "val_seen": self.val_seen,
                "collectives": self.collectives,
                "traffic": self.traffic,
                "bytes_per_exchange": averager.bytes_per_exchange,
                "start_state": self.start_state,
                "start_optim": self.start_optim,
                "optim": [o.state_dict() for o in trainer.optimizers],
                "alpha": averager.alpha,
                "buckets": len(averager.layout.buckets),
                "wrapped": type(strategy.model).__name__,
                "topology": (strategy.num_workers, strategy.ranks_per_worker, strategy.worker_index,
                             strategy.rank_in_worker),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


COUNTS: dict[str, int] = {}
COLLECTIVES = (
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "reduce", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv", "all_to_all", "all_to_all_single",
    "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "monitored_barrier",
    "all_gather_single",
)
TRAFFIC: list[tuple[str, tuple[int, ...], int]] = []
"""(collective, ranks of its group, bytes of its tensor) of every reduction and gather, in call order."""


def count_collectives(monkeypatch: Any) -> None:
    """Wrap every torch.distributed collective so that calls are counted (forked workers inherit the patch)."""
    import torch.distributed as dist

    COUNTS.clear()
    TRAFFIC.clear()
    for name in COLLECTIVES:
        if not hasattr(dist, name):  # all_gather_single is newer than the oldest supported torch
            continue
        original = getattr(dist, name)

        def wrapper(*args: Any, __name: str = name, __original: Any = original, **kwargs: Any) -> Any:
            COUNTS[__name] = COUNTS.get(__name, 0) + 1
            if __name in ("all_reduce", "all_gather_single", "all_gather_into_tensor"):
                tensor = args[1] if __name != "all_reduce" else args[0]  # the input
                group = kwargs.get("group")
                ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(
                    range(dist.get_world_size()))
                TRAFFIC.append((__name, ranks, tensor.numel() * tensor.element_size()))
            return __original(*args, **kwargs)

        monkeypatch.setattr(dist, name, wrapper)
