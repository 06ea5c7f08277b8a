"""The device check: the GPU paths of lightning-easgd, proven on one machine with one CUDA GPU in about 10 minutes.

    python -m benchmarks.gpu_check                          # all checks, table on stdout, runs/gpu_check/gpu_check.csv
    python -m benchmarks.gpu_check --only a_fake_world e_resnet50_overhead --out /tmp/check

It refuses (exit status 2, one line on stderr) where no CUDA device is visible. Every check runs in its own
subprocess, bounded by ``--timeout``, so that one that hangs or crashes the process is reported as FAIL and the
others still run. Exit status 1 if any check fails.

Checks (each a function of a device and a :class:`Sizes`, so that the tests run tiny versions on the CPU):

a. ``a_fake_world``: one NCCL rank plays two workers. Two synchronous averagers in one process, each on its own
   1-rank NCCL group; ``torch.distributed``'s world size and rank are faked to 2 for those groups, and every SUM
   all-reduce runs for real on its group and is then paired with the other worker's (their sum goes to both). The
   weights of both workers and the center are compared with an independent CPU replay of the paper's rule, and
   ``torch.cuda.set_sync_debug_mode`` counts the host waits on exchange steps and on the steps between them.
b. ``b_shared_gpu_gloo``: p processes share the GPU through gloo with CUDA tensors, synchronous and asynchronous
   (round-robin, so deterministic); their center must equal the same run's on the CPU.
c. ``c_lightning_precisions``: the Trainer with ``32-true``, ``16-mixed`` (one step made non-finite, which the
   GradScaler skips), ``bf16-mixed`` and ``bf16-true``; each run is checkpointed after its first epoch and resumed,
   and the resumed run must end where the straight one does.
d. ``d_exchange_memory``: the peak GPU memory the exchange adds for a ~2.5 B-parameter synthetic model with one
   rank per worker and ``center_device="cpu"`` (it must stay about one bucket). Skipped, saying so, where the
   averager has no ``center_device`` parameter.
e. ``e_resnet50_overhead``: step time of torchvision's ResNet-50 with an exchange every τ = 1, 4, 16 steps
   against none (one rank, so it is the exchange's device work and host waits, not network time); ratios, with
   ``torch.cuda.synchronize`` around the timers.

Note on (a): torch's sync debug mode reports synchronising calls (``.item()``, ``bool()`` of a device tensor,
blocking copies, stream and device synchronisations); it does not see a host spinning on ``cudaEventQuery`` or an
event synchronisation, so a zero count means "no synchronising call", not "no waiting at all".
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from benchmarks.procs import write_csv

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass(frozen=True)
class Sizes:
    """How big each check runs: :data:`FULL` on the GPU, :data:`TINY` for the CPU tests of this script."""

    a_features: int = 256
    a_steps: int = 9
    b_processes: int = 3
    b_steps: int = 12
    c_precisions: tuple[str, ...] = ("32-true", "16-mixed", "bf16-mixed", "bf16-true")
    c_samples: int = 512
    d_parameters: int = 2_500_000_000
    d_tensor_numel: int = 25_000_000
    e_model: str = "resnet50"
    e_batch: int = 64
    e_warmup: int = 10
    e_steps: int = 48
    e_rounds: int = 2
    e_taus: tuple[int, ...] = (1, 4, 16)


FULL = Sizes()
TINY = Sizes(a_features=8, a_steps=5, b_processes=2, b_steps=5, c_precisions=("32-true", "bf16-mixed"),
             c_samples=64, d_parameters=20_000, d_tensor_numel=5_000, e_model="mlp", e_batch=8, e_warmup=1,
             e_steps=4, e_rounds=1, e_taus=(1, 4))
SIZES = {"full": FULL, "tiny": TINY}

OVERHEAD_LIMITS = {1: 1.20, 4: 1.10, 16: 1.05}
"""Largest step-time ratio (exchange every τ steps / no exchange) that passes check (e), per τ."""


@dataclass
class Result:
    """One check's outcome: ``status`` is PASS, FAIL or SKIP; ``detail`` says why in one line."""

    check: str
    status: str
    detail: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _single_process_group(device: torch.device) -> Iterator[None]:
    """A world of one rank (NCCL on CUDA, gloo on the CPU), destroyed afterwards."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=0, world_size=1, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _count_host_waits(device: torch.device) -> Iterator[list[int]]:
    """Count synchronising CUDA calls inside the block (``[count]``; stays ``[-1]`` off CUDA)."""
    counter = [-1]
    if device.type != "cuda":
        yield counter
        return
    counter[0] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counter
        finally:
            torch.cuda.set_sync_debug_mode("default")
    counter[0] = sum("synchroniz" in str(w.message) for w in caught)


def _mlp(features: int, dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(features, features), nn.Tanh(), nn.Linear(features, 1)).to(dtype)


def _max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x.detach().double().cpu() - y.detach().double().cpu()).abs().max()) for x, y in zip(a, b))


class FakeTwoRanks:
    """Makes two 1-rank process groups look like ranks 0 and 1 of one group of two, for ``torch.distributed``'s
    ``get_world_size``, ``get_rank`` and ``all_reduce`` as the averager calls them (``dist.<name>``).

    Each all-reduce runs for real on its own group (NCCL on CUDA: its streams, its work objects, its waits), and
    when the second worker's k-th call arrives the two tensors are summed on the current stream and the sum is
    written into both. The two workers must be stepped in lock step (both enter their step before either leaves
    it), as ranks of a real job are, so every collective of a step is issued by both before either waits.
    """

    def __init__(self, groups: list[dist.ProcessGroup]) -> None:
        self._rank = {group: r for r, group in enumerate(groups)}
        self._calls = [0, 0]
        self._pending: dict[int, dict[int, Tensor]] = {}
        self._works: dict[int, list[Any]] = {}  # the first worker's real collectives, per call number
        self._real = {name: getattr(dist, name) for name in ("get_world_size", "get_rank", "all_reduce")}

    def __enter__(self) -> FakeTwoRanks:
        dist.get_world_size = self._world_size  # type: ignore[assignment]
        dist.get_rank = self._get_rank  # type: ignore[assignment]
        dist.all_reduce = self._all_reduce  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._real.items():
            setattr(dist, name, fn)

    def _world_size(self, group: dist.ProcessGroup | None = None) -> int:
        return 2 if group in self._rank else self._real["get_world_size"](group)

    def _get_rank(self, group: dist.ProcessGroup | None = None) -> int:
        return self._rank[group] if group in self._rank else self._real["get_rank"](group)

    def _all_reduce(self, tensor: Tensor, op: Any = dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None,
                    async_op: bool = False) -> Any:
        if group not in self._rank:
            return self._real["all_reduce"](tensor, op=op, group=group, async_op=async_op)
        if op != dist.ReduceOp.SUM:
            raise NotImplementedError(f"FakeTwoRanks pairs SUM all-reduces only, got {op}")
        work = self._real["all_reduce"](tensor, op=op, group=group, async_op=True)
        rank = self._rank[group]
        k = self._calls[rank]
        self._calls[rank] += 1
        slot = self._pending.setdefault(k, {})
        slot[rank] = tensor
        if len(slot) == 2:
            del self._pending[k]
            for w in self._works.pop(k, []) + ([work] if work is not None else []):
                w.wait()  # the real collectives first (on NCCL: the current stream waits; the host does not)
            total = slot[0] + slot[1]
            slot[0].copy_(total)
            slot[1].copy_(total)
        elif work is not None:
            self._works.setdefault(k, []).append(work)
        if not async_op:
            if len(slot) != 2:
                raise RuntimeError("FakeTwoRanks: a blocking all-reduce of the first worker cannot be paired in one "
                                   "thread; the averager must issue its exchange asynchronously")
            return None
        return work


# ---------------------------------------------------------------------------------------------------- (a)


def check_fake_world(device: torch.device, sizes: Sizes = FULL) -> Result:
    """One NCCL rank, world faked to 2, against an independent CPU replay; host waits per step."""
    from lightning_easgd.core import ElasticAverager

    tau, alpha, lr, momentum = 2, 0.3, 0.05, 0.9
    torch.manual_seed(0)
    init = _mlp(sizes.a_features, torch.float64)
    g = torch.Generator().manual_seed(1)
    data = [[(torch.randn(16, sizes.a_features, generator=g, dtype=torch.float64),
              torch.randn(16, 1, generator=g, dtype=torch.float64)) for _ in range(sizes.a_steps)] for _ in range(2)]

    def local_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor]) -> None:
        x, y = batch
        opt.zero_grad(set_to_none=False)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    models = [copy.deepcopy(init).to(device) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in models]
    batches = [[(x.to(device), y.to(device)) for x, y in rank] for rank in data]
    waits: dict[str, list[int]] = {"exchange": [], "between": []}
    with _single_process_group(device):
        groups = [dist.new_group([0]), dist.new_group([0])]
        with FakeTwoRanks(groups):
            averagers = [ElasticAverager(list(m.named_parameters()), tau=tau, alpha=alpha, group=grp)
                         for m, grp in zip(models, groups)]
            if any(a.world_size != 2 for a in averagers):
                return Result("a_fake_world", FAIL, "the averager did not take the faked world size of 2 (it must "
                              "read it through torch.distributed.get_world_size(group))")
            for t in range(sizes.a_steps):
                exchange = t > 0 and t % tau == 0
                with _count_host_waits(device) as count:
                    with contextlib.ExitStack() as stack:
                        for averager in averagers:
                            stack.enter_context(averager.step())
                        for r in range(2):
                            local_step(models[r], opts[r], batches[r][t])
                waits["exchange" if exchange else "between"].append(count[0])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            center = [c.clone() for c in averagers[0].center_values()]
            center_other = [c.clone() for c in averagers[1].center_values()]

    # The replay: the paper's Eq. 5-6 with plain tensor arithmetic on CPU copies.
    replay = [copy.deepcopy(init) for _ in range(2)]
    replay_opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in replay]
    replay_center = [p.detach().clone() for p in init.parameters()]
    with torch.no_grad():
        for t in range(sizes.a_steps):
            exchange = t > 0 and t % tau == 0
            diffs = [[p - c for p, c in zip(m.parameters(), replay_center)] for m in replay] if exchange else []
            with torch.enable_grad():
                for r in range(2):
                    local_step(replay[r], replay_opts[r], data[r][t])
            for m, d in zip(replay, diffs):
                for p, di in zip(m.parameters(), d):
                    p.sub_(alpha * di)
            if diffs:
                for c, d0, d1 in zip(replay_center, *diffs):
                    c.add_(alpha * (d0 + d1))
    errors = {
        "worker0_max_diff": _max_diff(list(models[0].parameters()), list(replay[0].parameters())),
        "worker1_max_diff": _max_diff(list(models[1].parameters()), list(replay[1].parameters())),
        "center_max_diff": _max_diff(center, replay_center),
    }
    metrics: dict[str, Any] = {**errors, "centers_max_diff_between_workers": _max_diff(center, center_other)}
    if device.type == "cuda":  # two workers stepped together: half of each step's count is one worker's
        metrics["host_waits_per_worker_exchange"] = max(waits["exchange"], default=0) / 2
        metrics["host_waits_per_worker_between"] = max(waits["between"], default=0) / 2
    tol = 1e-9
    problems = []
    if max(errors.values()) > tol:
        problems.append(f"weights differ from the CPU replay by up to {max(errors.values()):.3g} (tolerance {tol:g})")
    if metrics["centers_max_diff_between_workers"] != 0.0:
        problems.append("the two workers' centers differ")
    if device.type == "cuda":
        if metrics["host_waits_per_worker_between"] > 0:
            problems.append(f"{metrics['host_waits_per_worker_between']:g} host waits per worker on steps without an "
                            "exchange (must be 0)")
        if metrics["host_waits_per_worker_exchange"] > 1:
            problems.append(f"{metrics['host_waits_per_worker_exchange']:g} host waits per worker on exchange steps "
                            "(at most 1: one read of the statistics)")
    waits_text = (f"host waits per worker: exchange steps {metrics['host_waits_per_worker_exchange']:g}, other "
                  f"steps {metrics['host_waits_per_worker_between']:g}" if device.type == "cuda"
                  else "host waits not counted off CUDA")
    if problems:
        return Result("a_fake_world", FAIL, "; ".join(problems), metrics)
    return Result("a_fake_world", PASS, f"2 workers match the CPU replay to {tol:g}; {waits_text}", metrics)


# ---------------------------------------------------------------------------------------------------- (b)


def _shared_worker(rank: int, p: int, port: int, mode: str, device_name: str, steps: int, out: str) -> None:
    """One of p processes: gloo, CUDA (or CPU) tensors, the synchronous or round-robin asynchronous averager."""
    from lightning_easgd.core import ElasticAverager
    from lightning_easgd.core.async_averager import AsyncElasticAverager

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=p)
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = _mlp(16, torch.float64).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(100 + rank)
    named = list(model.named_parameters())
    if mode == "sync":
        averager: Any = ElasticAverager(named, tau=2, alpha=0.9 / p)
    else:
        averager = AsyncElasticAverager(named, tau=2, alpha=0.9 / p, order="round_robin")
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g, dtype=torch.float64).to(device)
        y = torch.randn(8, 1, generator=g, dtype=torch.float64).to(device)
        with averager.step():
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    averager.use_center()  # a consistent center (collective for the asynchronous one)
    center = [t.detach().cpu().clone() for t in model.parameters()]
    averager.restore_local()
    torch.save({"center": center}, f"{out}/{mode}_{device.type}_{rank}.pt")
    if mode == "async":
        averager.close()
    dist.barrier()
    dist.destroy_process_group()


def check_shared_gpu_gloo(device: torch.device, sizes: Sizes = FULL) -> Result:
    """p processes on one GPU through gloo with CUDA tensors; centers must equal the CPU run's."""
    import torch.multiprocessing as mp

    p = sizes.b_processes
    metrics: dict[str, Any] = {"processes": p}
    problems = []
    with tempfile.TemporaryDirectory() as out:
        for mode in ("sync", "async"):
            for dev in dict.fromkeys((device.type, "cpu")):
                # CUDA cannot be used in forked children once the parent touched it; the CPU runs fork (fast).
                mp.start_processes(_shared_worker, args=(p, _free_port(), mode, dev, sizes.b_steps, out), nprocs=p,
                                   start_method="spawn" if dev == "cuda" else "fork")
            got = [torch.load(Path(out) / f"{mode}_{device.type}_{r}.pt")["center"] for r in range(p)]
            ref = torch.load(Path(out) / f"{mode}_cpu_0.pt")["center"]
            diff = max(_max_diff(c, ref) for c in got)
            metrics[f"{mode}_center_max_diff"] = diff
            if diff > 1e-9:
                problems.append(f"{mode}: the {device.type} center differs from the CPU run's by {diff:.3g}")
    if problems:
        return Result("b_shared_gpu_gloo", FAIL, "; ".join(problems), metrics)
    return Result("b_shared_gpu_gloo", PASS, f"{p} processes on one {device.type} device through gloo: sync and async "
                  "(round-robin) centers equal the CPU run's to 1e-9", metrics)


# ---------------------------------------------------------------------------------------------------- (c)


def _fit(device: torch.device, precision: str, samples: int, root: Path, epochs: int, ckpt_path: str | None,
         skip_step: int | None) -> tuple[dict[str, Tensor], Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_easgd import EASGDStrategy

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            if skip_step is not None and self.global_step == skip_step:
                loss = loss * float("inf")  # non-finite gradients: the GradScaler must skip this step
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, 32, generator=g), torch.randint(0, 4, (samples,), generator=g))
    module = Classifier()
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
        strategy=EASGDStrategy(tau=2, start_method="popen"), max_epochs=epochs, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root),
        callbacks=[ModelCheckpoint(dirpath=str(root), filename="{epoch}", save_top_k=-1)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(data, batch_size=16), ckpt_path=ckpt_path)
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}, trainer


def check_lightning_precisions(device: torch.device, sizes: Sizes = FULL) -> Result:
    """Trainer runs in every precision, with checkpoint and resume; 16-mixed skips one non-finite step."""
    metrics: dict[str, Any] = {}
    problems = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for precision in sizes.c_precisions:
                root = Path(tmp) / precision
                skip = 3 if precision == "16-mixed" else None
                straight, trainer = _fit(device, precision, sizes.c_samples, root / "straight", 2, None, skip)
                if skip is not None:
                    scale = float(trainer.precision_plugin.scaler.get_scale())
                    metrics[f"{precision}_grad_scale"] = scale
                    if not scale < 65536.0:
                        problems.append(f"{precision}: the GradScaler did not skip the non-finite step")
                resumed, _ = _fit(device, precision, sizes.c_samples, root / "resumed", 2,
                                  str(root / "straight" / "epoch=0.ckpt"), skip)
                diff = max(float((straight[k] - resumed[k]).abs().max()) for k in straight)
                finite = all(bool(v.isfinite().all()) for v in straight.values())
                metrics[f"{precision}_resume_max_diff"] = diff
                if not finite:
                    problems.append(f"{precision}: the center is not finite")
                if diff > 1e-6:
                    problems.append(f"{precision}: the resumed run ends {diff:.3g} away from the straight one")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if problems:
        return Result("c_lightning_precisions", FAIL, "; ".join(problems), metrics)
    return Result("c_lightning_precisions", PASS, f"{', '.join(sizes.c_precisions)}: finite centers, resume exact to "
                  "1e-6" + (", the GradScaler skipped the non-finite step" if "16-mixed" in sizes.c_precisions
                            else ""), metrics)


# ---------------------------------------------------------------------------------------------------- (d)


def check_exchange_memory(device: torch.device, sizes: Sizes = FULL) -> Result:
    """Peak device memory the exchange adds, ~2.5 B parameters, one rank per worker, center on the CPU."""
    from lightning_easgd.core import ElasticAverager

    n, chunk = sizes.d_parameters, sizes.d_tensor_numel
    tensors = [torch.zeros(min(chunk, n - i), device=device) for i in range(0, n, chunk)]
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    averager = ElasticAverager([(f"t{i}", t) for i, t in enumerate(tensors)], tau=1, alpha=0.5, center_device="cpu")
    for _ in range(3):  # exchanges at steps 1 and 2
        with averager.step(), torch.no_grad():
            torch._foreach_add_(tensors, 1e-3)
    bucket = max(b.numel * torch.empty((), dtype=b.dtype).element_size() for b in averager.layout.buckets)
    metrics: dict[str, Any] = {"parameters": n, "model_bytes": model_bytes, "bucket_bytes": bucket,
                               "buffer_bytes": averager.buffer_bytes,
                               "device_buffer_bytes": averager.device_buffer_bytes}
    if not cuda:
        return Result("d_exchange_memory", PASS, "ran with center_device='cpu' (device memory is measured on CUDA "
                      "only)", metrics)
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - base
    metrics["peak_extra_bytes"] = extra
    metrics["peak_extra_over_model"] = extra / model_bytes
    limit = 2 * bucket + (64 << 20)
    text = (f"peak exchange memory {extra / 2**30:.2f} GiB = {extra / model_bytes:.3f} x model "
            f"({model_bytes / 2**30:.1f} GiB), bucket {bucket / 2**20:.0f} MiB")
    return Result("d_exchange_memory", PASS if extra <= limit else FAIL,
                  text + ("" if extra <= limit else f"; more than 2 buckets + 64 MiB ({limit / 2**20:.0f} MiB)"),
                  metrics)


# ---------------------------------------------------------------------------------------------------- (e)


def _overhead_model(name: str) -> tuple[nn.Module, Callable[[int, torch.device], tuple[Tensor, Tensor]]]:
    if name == "resnet50":
        import torchvision

        def batch(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
            return torch.randn(size, 3, 224, 224, device=device), torch.randint(0, 1000, (size,), device=device)

        return torchvision.models.resnet50(weights=None), batch
    if name == "mlp":
        def small(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
            return torch.randn(size, 32, device=device), torch.randint(0, 10, (size,), device=device)

        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)), small
    raise ValueError(f"model={name!r} is invalid: choose 'resnet50' or 'mlp'")


def overhead_verdict(ratios: dict[int, float]) -> tuple[str, str]:
    """PASS when every τ's step-time ratio is within :data:`OVERHEAD_LIMITS` (τ without a limit: that of the
    nearest smaller τ that has one)."""
    over = []
    for tau, ratio in sorted(ratios.items()):
        limit = OVERHEAD_LIMITS[max([t for t in OVERHEAD_LIMITS if t <= tau], default=min(OVERHEAD_LIMITS))]
        if ratio > limit:
            over.append(f"tau={tau}: {ratio:.3f} > {limit:.2f}")
    text = ", ".join(f"tau={t}: {r:.3f}" for t, r in sorted(ratios.items()))
    return (FAIL, f"step-time ratios {text}; too slow at {'; '.join(over)}") if over else \
        (PASS, f"step-time ratios vs no exchange: {text}")


def check_resnet_overhead(device: torch.device, sizes: Sizes = FULL) -> Result:
    """Step time with an exchange every τ steps against none (one rank: device work and host waits only)."""
    from lightning_easgd.core import ElasticAverager

    torch.manual_seed(0)
    model, make_batch = _overhead_model(sizes.e_model)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = make_batch(sizes.e_batch, device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def one_step(averager: Any) -> None:
        with averager.step() if averager is not None else contextlib.nullcontext():
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    for _ in range(sizes.e_warmup):  # first-use costs (allocator, cuDNN autotuning) before any timing
        one_step(None)
    configs: list[int | None] = [None, *sizes.e_taus]
    times: dict[int | None, list[float]] = {c: [] for c in configs}
    for round_ in range(sizes.e_rounds):
        for tau in configs if round_ % 2 == 0 else reversed(configs):
            averager = None if tau is None else ElasticAverager(list(model.named_parameters()), tau=tau, alpha=0.5)
            for _ in range(sizes.e_warmup):
                one_step(averager)
            sync()
            start = time.perf_counter()
            for _ in range(sizes.e_steps):
                one_step(averager)
            sync()
            times[tau].append((time.perf_counter() - start) / sizes.e_steps)
    base = statistics.median(times[None])
    ratios = {tau: statistics.median(times[tau]) / base for tau in sizes.e_taus}
    metrics: dict[str, Any] = {"model": sizes.e_model, "batch": sizes.e_batch, "seconds_per_step_none": base,
                               **{f"ratio_tau{t}": r for t, r in ratios.items()}}
    status, text = overhead_verdict(ratios)
    return Result("e_resnet50_overhead", status, f"{sizes.e_model}, batch {sizes.e_batch}: {text}", metrics)


# ---------------------------------------------------------------------------------------------------- running


CHECKS: dict[str, Callable[[torch.device, Sizes], Result]] = {
    "a_fake_world": check_fake_world,
    "b_shared_gpu_gloo": check_shared_gpu_gloo,
    "c_lightning_precisions": check_lightning_precisions,
    "d_exchange_memory": check_exchange_memory,
    "e_resnet50_overhead": check_resnet_overhead,
}


def run_check(name: str, device: torch.device, sizes: Sizes) -> Result:
    """Run one check in this process; an exception is a FAIL that names it."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # process groups bind to an indexed device
    start = time.perf_counter()
    try:
        result = CHECKS[name](device, sizes)
    except Exception as error:  # noqa: BLE001 - every failure is reported, not raised
        result = Result(name, FAIL, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    result.seconds = time.perf_counter() - start
    return result


def run_isolated(name: str, device: str, size: str, timeout: float) -> Result:
    """Run one check in a subprocess of its own (``--one``), bounded by ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.gpu_check", "--one", name, "--device", device, "--size", size,
                   "--result", str(path)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                  cwd=Path(__file__).resolve().parents[1])
        except subprocess.TimeoutExpired:
            return Result(name, FAIL, f"did not finish within --timeout {timeout:g} s", seconds=timeout)
        if proc.returncode != 0 or not path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return Result(name, FAIL, f"the check's process exited with status {proc.returncode}: {tail[0]}",
                          seconds=time.perf_counter() - start)
        return Result(**json.loads(path.read_text()))


def table(results: list[Result]) -> str:
    """One line per check: name, status, seconds, what it found."""
    width = max(len(r.check) for r in results)
    lines = [f"{'check':<{width}}  status  seconds  detail", f"{'-' * width}  ------  -------  ------"]
    lines += [f"{r.check:<{width}}  {r.status:<6}  {r.seconds:7.1f}  {r.detail}" for r in results]
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    lines.append(f"{counts[PASS]} PASS, {counts[FAIL]} FAIL, {counts[SKIP]} SKIP")
    return "\n".join(lines)


def save_csv(results: list[Result], path: Path) -> None:
    """One row per check; its metrics as a JSON object in the last column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(path, [{"check": r.check, "status": r.status, "seconds": f"{r.seconds:.1f}", "detail": r.detail,
                      "metrics": json.dumps(r.metrics, sort_keys=True)} for r in results])


def environment() -> str:
    """The one line that says what ran the check."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; {when}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run these checks only")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check"), help="where gpu_check.csv goes")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds each check may take")
    parser.add_argument("--one", choices=sorted(CHECKS), help=argparse.SUPPRESS)  # internal: one check, in-process
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        if args.result is None:
            parser.error("--one needs --result")
        result = run_check(args.one, torch.device(args.device), SIZES[args.size])
        args.result.write_text(json.dumps(asdict(result)))
        return 0
    if not torch.cuda.is_available():
        print("gpu_check: refused: no CUDA device is visible (torch.cuda.is_available() is False); run it on a "
              "machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    if args.timeout <= 0:
        parser.error(f"--timeout={args.timeout} is invalid: it must be > 0 seconds")
    print(f"gpu_check on {environment()}", flush=True)
    results = []
    for name in args.only or list(CHECKS):
        results.append(run_isolated(name, "cuda", "full", args.timeout))
        print(f"{name}: {results[-1].status} ({results[-1].seconds:.0f} s)", flush=True)
    print(table(results))
    csv_path = args.out / "gpu_check.csv"
    save_csv(results, csv_path)
    print(f"CSV: {csv_path}")
    return 1 if any(r.status == FAIL for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
