"""The device check's correctness checks: the GPU paths of lightning-easgd against independent computations.

Each check is a function of a device and a :class:`Sizes` that returns ``(detail, metrics)`` or raises
:class:`CheckFailed`; ``test_device_checks.py`` runs them on CUDA at full size under the ``cuda`` marker, the CPU
tests run them tiny, and ``python -m benchmarks.gpu_check`` runs them in bounded subprocesses (through pytest where
it is installed, directly otherwise). This module imports neither pytest nor hydra: it must run on a device's bare
stack (torch, lightning).

- :func:`check_fake_world`: one process plays two workers (two threads, each on its own 1-rank NCCL group whose
  all-reduces are paired): both workers and the center equal an independent replay of the paper's rule, with the
  center on the device, with the bfloat16 exchange, and with the center in host memory (``center_device="cpu"``).
  Host waits are counted directly (every ``torch.cuda.Event.synchronize``, plus torch's sync debug mode raising on
  any other synchronising call): none on plain steps, exactly one per worker on an exchange step.
- :func:`check_shared_gpu_gloo`: several processes share the GPU through gloo with CUDA tensors: synchronous,
  asynchronous (round-robin) and 2 workers × 2 ranks (worker groups); each center equals the same run on the CPU.
- :func:`check_trainer_precisions`: the Trainer with two workers (two processes on the one GPU, gloo) in each
  precision, one step made non-finite under ``16-mixed`` (the GradScaler must skip it); checkpointed after epoch 1
  and resumed, each run must end where the straight run ends.
- :func:`check_fabric_bf16_resume`: Fabric with two workers, ``bf16-mixed``, ``fabric.save`` and ``fabric.load`` in
  new processes: the resumed run ends where the straight one does.
"""

from __future__ import annotations

import contextlib
import copy
import os
import socket
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import Self


class CheckFailed(AssertionError):
    """A check found something wrong; ``metrics`` holds what it measured."""

    def __init__(self, detail: str, metrics: dict[str, Any]) -> None:
        super().__init__(detail)
        self.detail = detail
        self.metrics = metrics


Outcome = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class Sizes:
    """How big each check runs: :data:`FULL` on the GPU, :data:`TINY` for the CPU tests."""

    a_features: int = 256
    a_steps: int = 9
    b_processes: int = 3
    b_steps: int = 12
    c_precisions: tuple[str, ...] = ("32-true", "16-mixed", "bf16-mixed", "bf16-true")
    c_samples: int = 256
    f_samples: int = 128


FULL = Sizes()
TINY = Sizes(a_features=8, a_steps=5, b_processes=2, b_steps=5, c_precisions=("32-true", "bf16-mixed", "bf16-true"),
             c_samples=64, f_samples=32)


def _verdict(problems: list[str], detail: str, metrics: dict[str, Any]) -> Outcome:
    if problems:
        raise CheckFailed("; ".join(problems), metrics)
    return detail, metrics


# ---------------------------------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A world of one rank (NCCL on CUDA, gloo on the CPU), destroyed afterwards."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=0, world_size=1, **kwargs)
    try:
        yield
    finally:
        dist.destroy_process_group()


def indexed(device: torch.device) -> torch.device:
    """``device`` with an index (process groups bind to an indexed CUDA device)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def mlp(features: int, dtype: torch.dtype) -> nn.Module:
    return nn.Sequential(nn.Linear(features, features), nn.Tanh(), nn.Linear(features, 1)).to(dtype)


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x.detach().double().cpu() - y.detach().double().cpu()).abs().max()) for x, y in zip(a, b))


class FakeTwoRanks:
    """Two threads of one process act as ranks 0 and 1 of one group of two, for ``torch.distributed``'s
    ``get_world_size``, ``get_rank`` and ``all_reduce`` as the averager calls them (``dist.<name>``).

    Each thread's averager has its own 1-rank process group (NCCL on CUDA). Every all-reduce runs for real on it
    (its streams, its work object, its wait) and then waits, on the host, for the other thread's matching call;
    the first thread adds the two tensors in place on the current stream (in their dtype, as NCCL sums two ranks)
    and copies the sum into the other. Both threads enqueue on the device's default stream, and the barrier orders
    their host calls, so the sum follows both inputs and precedes everything either thread does afterwards.
    """

    def __init__(self, groups: list[dist.ProcessGroup]) -> None:
        self._rank = {group: r for r, group in enumerate(groups)}
        self._slots: list[Tensor | None] = [None, None]
        self._barrier = threading.Barrier(2, timeout=120)
        self.paired = 0
        """How many all-reduces were paired (each one real collective per worker)."""
        self._real = {name: getattr(dist, name) for name in ("get_world_size", "get_rank", "all_reduce")}

    def __enter__(self) -> Self:
        dist.get_world_size = self._world_size  # type: ignore[assignment]
        dist.get_rank = self._get_rank  # type: ignore[assignment]
        dist.all_reduce = self._all_reduce  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self._real.items():
            setattr(dist, name, fn)

    def abort(self) -> None:
        """Release the other thread from a pairing that will not come (this one failed)."""
        self._barrier.abort()

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
        work.wait()  # on NCCL the current stream waits for the (1-rank) collective; the host does not
        rank = self._rank[group]
        self._slots[rank] = tensor
        self._barrier.wait()
        if rank == 0:
            first, second = self._slots
            assert first is not None and second is not None
            first.add_(second)
            second.copy_(first)
            self.paired += 1
        self._barrier.wait()
        return work if async_op else None


class HostWaitCounter:
    """Counts ``torch.cuda.Event.synchronize`` calls per thread (the exchange's one wait, on the statistics)."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()
        self._original: Callable[..., Any] | None = None

    def __enter__(self) -> Self:
        self._original = original = torch.cuda.Event.synchronize
        counts, lock = self._counts, self._lock

        def counted(event: torch.cuda.Event) -> None:
            with lock:
                counts[threading.get_ident()] = counts.get(threading.get_ident(), 0) + 1
            original(event)

        torch.cuda.Event.synchronize = counted  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.Event.synchronize = self._original  # type: ignore[method-assign]

    def take(self) -> int:
        """This thread's count since its last call."""
        with self._lock:
            return self._counts.pop(threading.get_ident(), 0)


# ---------------------------------------------------------------------------------------------------- (a)

FAKE_WORLD_VARIANTS: dict[str, dict[str, Any]] = {
    "device_center": {},
    "bf16_exchange": {"exchange_dtype": "bfloat16"},
    "host_center": {"center_device": "cpu"},
}


def _sgd_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[Tensor, Tensor]) -> None:
    x, y = batch
    opt.zero_grad(set_to_none=False)
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _replay_fake_world(init: nn.Module, data: list[list[tuple[Tensor, Tensor]]], steps: int, tau: int, alpha: float,
                       lr: float, momentum: float, wire: torch.dtype | None) -> tuple[list[nn.Module], list[Tensor]]:
    """The paper's Eq. 5-6 for two workers with plain tensor arithmetic on CPU copies; with ``wire``, each d_i is
    rounded to it and the two are summed in it (as the exchange sends them), the pull using the exact d_i."""
    replay = [copy.deepcopy(init) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in replay]
    center = [p.detach().clone() for p in init.parameters()]
    with torch.no_grad():
        for t in range(steps):
            exchange = t > 0 and t % tau == 0
            diffs = [[p - c for p, c in zip(m.parameters(), center)] for m in replay] if exchange else []
            with torch.enable_grad():
                for r in range(2):
                    _sgd_step(replay[r], opts[r], data[r][t])
            for m, d in zip(replay, diffs):
                for p, di in zip(m.parameters(), d):
                    p.sub_(alpha * di)
            if diffs:
                for c, d0, d1 in zip(center, *diffs):
                    total = d0 + d1 if wire is None else (d0.to(wire) + d1.to(wire)).to(c.dtype)
                    c.add_(alpha * total)
    return replay, center


def _fake_world_variant(device: torch.device, sizes: Sizes, options: dict[str, Any]) -> dict[str, Any]:
    from lightning_easgd.core import ElasticAverager

    tau, alpha, lr, momentum = 2, 0.3, 0.05, 0.9
    torch.manual_seed(0)
    init = mlp(sizes.a_features, torch.float64)
    g = torch.Generator().manual_seed(1)
    data = [[(torch.randn(16, sizes.a_features, generator=g, dtype=torch.float64),
              torch.randn(16, 1, generator=g, dtype=torch.float64)) for _ in range(sizes.a_steps)] for _ in range(2)]
    models = [copy.deepcopy(init).to(device) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in models]
    batches = [[(x.to(device), y.to(device)) for x, y in rank] for rank in data]
    cuda = device.type == "cuda"
    # The host center waits on its copies by design; everywhere else any synchronising call is an error.
    strict = cuda and "center_device" not in options
    waits: list[list[tuple[bool, int]]] = [[], []]
    centers: list[list[Tensor]] = [[], []]
    errors: list[BaseException] = []
    with single_process_group(device):
        groups = [dist.new_group([0]), dist.new_group([0])]
        with FakeTwoRanks(groups) as fake, HostWaitCounter() if cuda else contextlib.nullcontext() as counter:
            averagers = [ElasticAverager(list(m.named_parameters()), tau=tau, alpha=alpha, group=grp, **options)
                         for m, grp in zip(models, groups)]
            if any(a.world_size != 2 for a in averagers):
                raise CheckFailed("the averager did not take the faked world size of 2 (it must read it through "
                                  "torch.distributed.get_world_size(group))", {})

            def worker(r: int) -> None:
                try:
                    for t in range(sizes.a_steps):
                        exchange = averagers[r].exchange_due
                        with averagers[r].step():
                            _sgd_step(models[r], opts[r], batches[r][t])
                        waits[r].append((exchange, counter.take() if counter is not None else -1))
                    centers[r] = [c.detach().clone() for c in averagers[r].center_values()]
                except BaseException as error:  # noqa: BLE001 - re-raised by the main thread
                    errors.append(error)
                    fake.abort()

            if strict:
                torch.cuda.set_sync_debug_mode("error")
            try:
                threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            finally:
                if strict:
                    torch.cuda.set_sync_debug_mode("default")
            if errors:
                raise errors[0]
            if cuda:
                torch.cuda.synchronize(device)
    wire = torch.bfloat16 if options.get("exchange_dtype") == "bfloat16" else None
    replay, replay_center = _replay_fake_world(init, data, sizes.a_steps, tau, alpha, lr, momentum, wire)
    metrics: dict[str, Any] = {
        "worker0_max_diff": max_diff(list(models[0].parameters()), list(replay[0].parameters())),
        "worker1_max_diff": max_diff(list(models[1].parameters()), list(replay[1].parameters())),
        "center_max_diff": max_diff(centers[0], replay_center),
        "centers_max_diff_between_workers": max_diff(centers[0], centers[1]),
    }
    if cuda:
        metrics["host_waits_per_exchange"] = sorted({n for w in waits for e, n in w if e})
        metrics["host_waits_per_plain_step"] = sorted({n for w in waits for e, n in w if not e})
    return metrics


def check_fake_world(device: torch.device, sizes: Sizes = FULL) -> Outcome:
    """Two workers in one process against the replay: device center, bfloat16 exchange, host center."""
    device = indexed(device)
    tol = 1e-9
    metrics: dict[str, Any] = {}
    problems = []
    for name, options in FAKE_WORLD_VARIANTS.items():
        got = _fake_world_variant(device, sizes, options)
        metrics.update({f"{name}_{k}": v for k, v in got.items()})
        worst = max(got["worker0_max_diff"], got["worker1_max_diff"], got["center_max_diff"])
        if worst > tol:
            problems.append(f"{name}: weights differ from the replay by up to {worst:.3g} (tolerance {tol:g})")
        if got["centers_max_diff_between_workers"] != 0.0:
            problems.append(f"{name}: the two workers' centers differ")
        if device.type == "cuda" and "center_device" not in options:
            if got["host_waits_per_exchange"] != [1]:
                problems.append(f"{name}: host waits per worker on exchange steps {got['host_waits_per_exchange']} "
                                "(exactly 1: the read of the statistics)")
            if got["host_waits_per_plain_step"] != [0]:
                problems.append(f"{name}: host waits per worker on plain steps {got['host_waits_per_plain_step']} "
                                "(must be 0)")
    waits = ("host waits per worker: 1 per exchange, 0 on plain steps (counted directly, and sync debug mode "
             "'error' around every step)" if device.type == "cuda" else "host waits not counted off CUDA")
    return _verdict(problems, f"2 workers match the replay to {tol:g} with the center on the device, the bfloat16 "
                    f"exchange and the host center; {waits}", metrics)


# ---------------------------------------------------------------------------------------------------- (b)


def _shared_worker(rank: int, p: int, port: int, mode: str, device_name: str, steps: int, out: str) -> None:
    """One of p processes: gloo, CUDA (or CPU) tensors; the synchronous, round-robin asynchronous, or grouped
    (2 ranks per worker) averager."""
    from lightning_easgd.core import ElasticAverager, worker_topology
    from lightning_easgd.core.async_averager import AsyncElasticAverager

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=p)
    device = torch.device(device_name)
    torch.manual_seed(0)
    model = mlp(16, torch.float64).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    named = list(model.named_parameters())
    worker = rank
    if mode == "sync":
        averager: Any = ElasticAverager(named, tau=2, alpha=0.9 / p)
    elif mode == "async":
        averager = AsyncElasticAverager(named, tau=2, alpha=0.9 / p, order="round_robin")
    else:  # 2 ranks per worker: identical batches within a worker, the center sharded over its ranks
        topo = worker_topology(2, p, rank)
        worker = topo.worker_index
        averager = ElasticAverager(named, tau=2, alpha=0.9 / (p // 2), group=topo.column_group,
                                   worker_group=topo.worker_group)
    g = torch.Generator().manual_seed(100 + worker)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g, dtype=torch.float64).to(device)
        y = torch.randn(8, 1, generator=g, dtype=torch.float64).to(device)
        with averager.step():
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    averager.use_center()  # a consistent center (collective for the asynchronous and grouped ones)
    center = [t.detach().cpu().clone() for t in model.parameters()]
    averager.restore_local()
    local = [t.detach().cpu().clone() for t in model.parameters()]
    torch.save({"center": center, "local": local}, f"{out}/{mode}_{device.type}_{rank}.pt")
    if mode == "async":
        averager.close()
    dist.barrier()
    dist.destroy_process_group()


def check_shared_gpu_gloo(device: torch.device, sizes: Sizes = FULL) -> Outcome:
    """Processes on one device through gloo with its tensors; centers and workers equal the CPU run's."""
    import torch.multiprocessing as mp

    p = sizes.b_processes
    runs = {"sync": p, "async": p, "groups": 4}
    metrics: dict[str, Any] = {"processes": runs}
    problems = []
    with tempfile.TemporaryDirectory() as out:
        for mode, n in runs.items():
            for dev in dict.fromkeys((device.type, "cpu")):
                # CUDA cannot be used in forked children once the parent touched it; the CPU runs fork (fast).
                mp.start_processes(_shared_worker, args=(n, free_port(), mode, dev, sizes.b_steps, out), nprocs=n,
                                   start_method="spawn" if dev == "cuda" else "fork")
            diff = 0.0
            for r in range(n):
                got = torch.load(Path(out) / f"{mode}_{device.type}_{r}.pt")
                ref = torch.load(Path(out) / f"{mode}_cpu_{r}.pt")
                diff = max(diff, max_diff(got["center"], ref["center"]), max_diff(got["local"], ref["local"]))
            spread = max(max_diff(torch.load(Path(out) / f"{mode}_{device.type}_{r}.pt")["center"],
                                  torch.load(Path(out) / f"{mode}_{device.type}_0.pt")["center"]) for r in range(n))
            metrics[f"{mode}_max_diff_vs_cpu"] = diff
            metrics[f"{mode}_center_spread"] = spread
            if diff > 1e-9:
                problems.append(f"{mode}: the {device.type} run differs from the CPU run's by {diff:.3g}")
            if spread != 0.0:
                problems.append(f"{mode}: ranks hold different centers (up to {spread:.3g} apart)")
    return _verdict(problems, f"processes on one {device.type} device through gloo: sync ({p}), async round-robin "
                    f"({p}) and 2 workers x 2 ranks: centers and workers equal the CPU run's to 1e-9", metrics)


# ---------------------------------------------------------------------------------------------------- (c)


class _TrainerClassifier(L.LightningModule):
    """A small classifier; under ``16-mixed`` one step's loss is made infinite (the GradScaler must skip it)."""

    def __init__(self, skip_step: int | None) -> None:
        super().__init__()
        self.skip_step = skip_step
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        # The GradScaler's final scale, brought back from the worker processes in the state dict (an integer
        # buffer: EASGD averages floating-point tensors only).
        self.register_buffer("grad_scale", torch.zeros((), dtype=torch.int64))

    def on_train_end(self) -> None:
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.grad_scale.fill_(int(scaler.get_scale()))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.skip_step is not None and self.global_step == self.skip_step:
            loss = loss * float("inf")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _dataset(samples: int) -> Any:
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(samples, 32, generator=g), torch.randint(0, 4, (samples,), generator=g))


def _two_workers(device: torch.device) -> dict[str, Any]:
    """Strategy arguments for two worker processes on the one device: gloo (NCCL refuses two ranks on one GPU);
    spawn on CUDA (a forked child cannot use CUDA), fork on the CPU."""
    return {"parallel_devices": [device, device], "process_group_backend": "gloo",
            "start_method": "spawn" if device.type == "cuda" else "fork"}


def _fit(device: torch.device, precision: str, samples: int, root: Path, ckpt_path: str | None,
         skip_step: int | None) -> tuple[dict[str, Tensor], float | None]:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    from lightning_easgd import EASGDStrategy

    L.seed_everything(0, verbose=False)
    module = _TrainerClassifier(skip_step)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", precision=precision,
        strategy=EASGDStrategy(tau=2, **_two_workers(device)), max_epochs=2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root),
        callbacks=[ModelCheckpoint(dirpath=str(root), filename="{epoch}", save_top_k=-1)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(_dataset(samples), batch_size=16), ckpt_path=ckpt_path)
    state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return state, float(state["grad_scale"]) if skip_step is not None else None


def check_trainer_precisions(device: torch.device, sizes: Sizes = FULL) -> Outcome:
    """The Trainer, two workers, in every precision, with checkpoint and resume; 16-mixed skips a non-finite step."""
    device = indexed(device)
    metrics: dict[str, Any] = {}
    problems = []
    init = _TrainerClassifier(None).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        for precision in sizes.c_precisions:
            root = Path(tmp) / precision
            skip = 3 if precision == "16-mixed" else None
            straight, scale = _fit(device, precision, sizes.c_samples, root / "straight", None, skip)
            if scale is not None:  # 2**16 at the start, halved by every skipped step, doubled after 2000 good ones
                metrics[f"{precision}_grad_scale"] = scale
                if scale == 0:
                    problems.append(f"{precision}: no GradScaler ran (Lightning turns 16-mixed into bf16-mixed on "
                                    "the CPU)")
                elif not scale < 65536.0:
                    problems.append(f"{precision}: the GradScaler's scale is {scale:g}: it did not skip the "
                                    "non-finite step")
            resumed, _ = _fit(device, precision, sizes.c_samples, root / "resumed",
                              str(root / "straight" / "epoch=0.ckpt"), skip)
            diff = max(float((straight[k] - resumed[k]).abs().max()) for k in straight)
            moved = max(float((straight[k] - init[k].float()).abs().max()) for k in straight)
            metrics[f"{precision}_resume_max_diff"] = diff
            if not all(bool(v.isfinite().all()) for v in straight.values()):
                problems.append(f"{precision}: the center is not finite")
            if not moved > 0:
                problems.append(f"{precision}: the center never moved")
            if diff > 1e-6:
                problems.append(f"{precision}: the resumed run ends {diff:.3g} away from the straight one")
    return _verdict(problems, f"2 workers, {', '.join(sizes.c_precisions)}: finite centers, resume exact to 1e-6"
                    + (", the GradScaler skipped the non-finite step" if "16-mixed" in sizes.c_precisions else ""),
                    metrics)


# ---------------------------------------------------------------------------------------------------- (f)


def _fabric_loop(fabric: Any, samples: int, out: str, first_epoch: int, epochs: int, load: str | None,
                 save: str | None) -> None:
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    fabric.seed_everything(0)
    module = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9))
    dataset = _dataset(samples)
    # Exact resume: our own sampler, its epoch set from the loop's counter, and a loader Fabric does not wrap (its
    # wrapper would set the sampler's epoch from its own count of iter() calls, which restarts at 0 on resume).
    sampler = DistributedSampler(dataset, num_replicas=fabric.world_size, rank=fabric.global_rank, shuffle=True,
                                 seed=0)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    if load is not None:
        fabric.load(load, {"model": model, "optimizer": optimizer})
    for epoch in range(first_epoch, epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            x, y = fabric.to_device(batch)
            optimizer.zero_grad()
            fabric.backward(nn.functional.cross_entropy(model(x), y))
            optimizer.step()
        if save is not None and epoch == 0:
            fabric.save(save, {"model": model, "optimizer": optimizer})
    local = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    with fabric.strategy.center():
        center = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    torch.save({"local": local, "center": center}, f"{out}/rank{fabric.global_rank}.pt")


def _fabric_run(device: torch.device, samples: int, out: Path, first_epoch: int, load: str | None,
                save: str | None) -> list[dict[str, Any]]:
    from lightning.fabric import Fabric

    from lightning_easgd import EASGDFabricStrategy

    out.mkdir(parents=True, exist_ok=True)
    fabric = Fabric(accelerator="cuda" if device.type == "cuda" else "cpu", precision="bf16-mixed",
                    strategy=EASGDFabricStrategy(tau=2, **_two_workers(device)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fabric.launch(_fabric_loop, samples, str(out), first_epoch, 2, load, save)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def check_fabric_bf16_resume(device: torch.device, sizes: Sizes = FULL) -> Outcome:
    """Fabric, two workers, bf16-mixed: 2 epochs straight == 1 epoch, fabric.save, fabric.load in new processes."""
    device = indexed(device)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(Path(tmp) / "epoch0.ckpt")
        straight = _fabric_run(device, sizes.f_samples, Path(tmp) / "straight", 0, None, ckpt)
        resumed = _fabric_run(device, sizes.f_samples, Path(tmp) / "resumed", 1, ckpt, None)
    metrics: dict[str, Any] = {}
    problems = []
    for rank in range(2):
        for what in ("local", "center"):
            a, b = straight[rank][what], resumed[rank][what]
            diff = max(float((a[k] - b[k]).abs().max()) for k in a)
            metrics[f"rank{rank}_{what}_resume_max_diff"] = diff
            if diff > 1e-6:
                problems.append(f"rank {rank}: the resumed {what} ends {diff:.3g} away from the straight run's")
    spread = max(float((straight[0]["local"][k] - straight[1]["local"][k]).abs().max()) for k in straight[0]["local"])
    metrics["worker_spread"] = spread
    if not spread > 0:
        problems.append("the two workers hold identical weights: nothing was learnt apart, the check proves nothing")
    return _verdict(problems, "Fabric, 2 workers, bf16-mixed: fabric.save after epoch 1 and fabric.load in new "
                    "processes end where the straight run ends (1e-6)", metrics)


CHECKS: dict[str, Callable[[torch.device, Sizes], Outcome]] = {
    "a_fake_world": check_fake_world,
    "b_shared_gpu_gloo": check_shared_gpu_gloo,
    "c_trainer_precisions": check_trainer_precisions,
    "f_fabric_bf16_resume": check_fabric_bf16_resume,
}
"""The correctness checks by name, in the order the device check runs them."""
