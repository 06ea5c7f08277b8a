"""The benchmarks' common workload: the paper's CIFAR-10 net (REFERENCE.md §2) trained on synthetic 28×28 images
by one of the methods compared, with a callback that times a window of optimizer steps and counts the bytes
this process's network interface sent meanwhile.

Methods: ``none`` (one process, no communication), ``ddp`` (Lightning's DDPStrategy: gradient all-reduce every step),
``ddp_bf16`` (the same with PyTorch's ``bf16_compress_hook``: gradients all-reduced in bfloat16;
``benchmarks/baselines.py``), ``average:τ`` (local SGD with periodic model averaging), ``easgd:τ`` (EASGDStrategy, one
worker per process), ``easgd_bf16:τ`` (the same with ``exchange_dtype=torch.bfloat16``: d_i travels in bfloat16),
``easgd_node:τ`` (EASGDStrategy with ``ranks_per_worker="node"``: one worker per node, gradients all-reduced inside it),
``easgd_async:τ``, and the reset rule's ``localsgd:τ``, ``slowmo:τ`` and ``diloco:τ`` (EASGDStrategy with
``worker_pull="reset"`` and the outer step of the Hydra presets of those names; docs/family.md).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.netlab import interface_tx_bytes

RESET = {  # the reset rule's outer step, as in conf/strategy/{local_sgd,slowmo,diloco}.yaml
    "localsgd": {"beta": 1.0},
    "slowmo": {"beta": 1.0, "center_momentum": 0.2},
    "diloco": {"beta": 0.7, "center_momentum": 0.9, "center_nesterov": True},
}
PERIODIC = ("easgd", "easgd_bf16", "easgd_node", "average", "easgd_async", *RESET)
"""The methods that take a communication period."""


def parse_method(method: str) -> tuple[str, int | None]:
    """``"easgd:16"`` -> ``("easgd", 16)``; raises for unknown names or a bad period."""
    name, _, period = method.partition(":")
    if name in ("none", "ddp", "ddp_bf16") and not period:
        return name, None
    if name in PERIODIC and period.isdigit() and int(period) >= 1:
        return name, int(period)
    raise ValueError(
        f"method={method!r} is invalid: use none, ddp, ddp_bf16, or {', '.join(f'{m}:TAU' for m in PERIODIC)} "
        "with TAU >= 1"
    )


def make_strategy(method: str, start_method: str) -> Any:
    """The Lightning strategy (or "auto") that runs ``method``."""
    name, period = parse_method(method)
    if name == "none":
        return "auto"
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method=start_method)
    if name == "ddp_bf16":
        from benchmarks.baselines import BF16CompressedDDPStrategy

        return BF16CompressedDDPStrategy(start_method=start_method)
    if name == "average":
        from benchmarks.baselines import PeriodicAveragingStrategy

        return PeriodicAveragingStrategy(period=period, start_method=start_method)
    if name == "easgd_async":
        from lightning_easgd.trainer.async_strategy import AsyncEASGDStrategy

        return AsyncEASGDStrategy(tau=period, start_method=start_method)
    from lightning_easgd import EASGDStrategy

    if name == "easgd_node":
        return EASGDStrategy(tau=period, ranks_per_worker="node", start_method=start_method)
    if name in RESET:
        return EASGDStrategy(tau=period, worker_pull="reset", start_method=start_method, **RESET[name])
    if name == "easgd_bf16":
        return EASGDStrategy(tau=period, exchange_dtype="bfloat16", start_method=start_method)
    return EASGDStrategy(tau=period, start_method=start_method)


class Window(L.Callback):
    """Times optimizer steps ``warmup`` .. ``warmup + steps`` and counts ``interface``'s bytes sent meanwhile."""

    def __init__(self, method: str, warmup: int, steps: int, interface: str, result: Path, all_ranks: bool) -> None:
        self.method, self.warmup, self.steps, self.interface = method, warmup, steps, interface
        self.result, self.all_ranks = result, all_ranks
        self.step_times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._t = time.perf_counter()
        if trainer.global_step == self.warmup:
            self.start, self.bytes_start = self._t, interface_tx_bytes(self.interface)

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.global_step > self.warmup:
            self.step_times.append(time.perf_counter() - self._t)
        if trainer.global_step != self.warmup + self.steps or not (self.all_ranks or trainer.global_rank == 0):
            return
        end, bytes_end = time.perf_counter(), interface_tx_bytes(self.interface)
        sent = None if bytes_end is None or self.bytes_start is None else bytes_end - self.bytes_start
        averager = getattr(trainer.strategy, "averager", None)
        payload = None if averager is None else averager.bytes_per_exchange / averager.tau
        result = {
            "method": self.method,
            "rank": trainer.global_rank,
            "seconds_per_step": (end - self.start) / self.steps,
            "median_step_seconds": statistics.median(self.step_times),
            "tx_bytes_per_step": None if sent is None else sent / self.steps,
            "payload_bytes_per_step": payload,
            "exchange_buffer_bytes": getattr(averager, "buffer_bytes", None),
            "parameters": sum(p.numel() for p in trainer.lightning_module.parameters()),
        }
        self.result.write_text(json.dumps(result))


def train(
    method: str,
    *,
    warmup: int,
    steps: int,
    batch_size: int,
    devices: int,
    num_nodes: int,
    interface: str,
    result: Path,
    all_ranks: bool,
    start_method: str = "popen",
) -> None:
    """Train ``method`` for ``warmup + steps`` optimizer steps on synthetic CIFAR-shaped data."""
    from lightning_easgd.recipes.classifier import ImageClassifier
    from lightning_easgd.recipes.models import PaperCIFAR10Net

    torch.manual_seed(0)
    total_steps = warmup + steps
    samples = batch_size * total_steps * devices * num_nodes
    data = TensorDataset(torch.rand(samples, 3, 28, 28), torch.randint(0, 10, (samples,)))
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True)
    module = ImageClassifier(
        net=PaperCIFAR10Net(), num_classes=10,
        optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.99, nesterov=True),
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=make_strategy(method, start_method),
        max_steps=total_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(result.parent),
        callbacks=[Window(method, warmup, steps, interface, result, all_ranks)],
    )
    trainer.fit(module, loader)
    if torch.distributed.is_initialized():
        # Lightning leaves the process group alive after fit. Tearing gloo down while a peer still exits, or at
        # interpreter exit, can abort the process ("terminate called without an active exception") after the
        # measurement is written: meet the peers first, destroy the group, then leave without running C++
        # destructors again.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
