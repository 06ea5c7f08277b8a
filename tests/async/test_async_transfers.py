"""The asynchronous worker's GPU-minded paths: host staging (side stream, pinned buffers), the norm-based
finiteness check, the explicit choice of TensorPipe transports. The CPU tests run everywhere; the ``cuda`` ones
need a device and skip without one."""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_easgd import AsyncEASGDStrategy
from lightning_easgd.core import NonFiniteWorkerError
from lightning_easgd.core.async_averager import AsyncElasticAverager
from lightning_easgd.core.center_service import TRANSPORTS
from lightning_easgd.core.staging import HostStaging

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_huge_finite_weights_are_not_mistaken_for_divergence() -> None:
    """A float32 value near its maximum is finite although its square overflows: the check must not flag it."""
    w = torch.tensor([3.0e38, -3.0e38, 1.0])
    averager = AsyncElasticAverager([("w", w)], tau=1, alpha=0.5)
    try:
        averager.clock = 1
        with averager.step():
            pass
        assert averager.pop_resets() == [] and w.isfinite().all()
        w[2] = float("nan")
        with pytest.raises(NonFiniteWorkerError, match="worker 0 of 1 has non-finite"), averager.step():
            pass
    finally:
        averager.close()


def test_staging_on_the_cpu_copies_plainly_into_unpinned_buffers() -> None:
    staging = HostStaging([torch.device("cpu")])
    host = staging.empty(3, torch.float64)
    assert not staging.pinned and not host.is_pinned()
    src = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    staging.download([(host, src)])
    assert host.tolist() == [1.0, 2.0, 3.0]
    dst = torch.zeros(3, dtype=torch.float64)
    staging.upload([(dst, host * 2)])
    staging.release()
    assert dst.tolist() == [2.0, 4.0, 6.0]


@pytest.mark.parametrize("make", [
    lambda: AsyncElasticAverager([("w", torch.zeros(2))], tau=1, alpha=0.5, rpc_transport="shm"),
    lambda: AsyncEASGDStrategy(rpc_transport="ibv"),
])
def test_bad_transport_is_refused(make: object) -> None:
    with pytest.raises(ValueError, match=r"rpc_transport='(shm|ibv)' is invalid: choose 'tcp' .* or 'fast'"):
        make()  # type: ignore[operator]


def test_transport_choices_keep_tcp_as_the_fallback() -> None:
    assert TRANSPORTS["tcp"] == (["uv"], ["basic"])
    transports, channels = TRANSPORTS["fast"]
    assert transports[-1] == "uv" and channels[-1] == "basic"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _round_robin_worker(rank: int, p: int, port: int, transport: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=p)
    x = torch.zeros(5, dtype=torch.float64)
    averager = AsyncElasticAverager([("x", x)], tau=1, alpha=0.3, order="round_robin", rpc_transport=transport)
    for step in range(4):
        with averager.step():
            x.add_(float(rank + 1) * (step + 1))  # the "local step"
    averager.use_center()  # a consistent snapshot after both workers' exchanges; it stays readable
    averager.restore_local()
    torch.save({"center": averager.center_values()[0].clone(), "local": x.clone()}, f"{out}/{rank}.pt")
    averager.close()
    dist.destroy_process_group()


def test_fast_transport_falls_back_where_needed_and_keeps_the_rule(tmp_path: Path) -> None:
    """Two workers with rpc_transport='fast' (here: shared memory or TCP) against a hand replay of Algorithm 1."""
    p, alpha = 2, 0.3
    mp.start_processes(_round_robin_worker, args=(p, _free_port(), "fast", str(tmp_path)), nprocs=p,
                       start_method="fork")
    xs = [torch.zeros(5, dtype=torch.float64) for _ in range(p)]
    center = torch.zeros(5, dtype=torch.float64)
    for step in range(4):
        diffs = []
        if step > 0:
            for rank in range(p):  # the center serves worker 0, then worker 1
                diffs.append(xs[rank] - center)
                center = center + alpha * diffs[-1]
        for rank in range(p):
            xs[rank] = xs[rank] + float(rank + 1) * (step + 1)
            if diffs:
                xs[rank] = xs[rank] - alpha * diffs[rank]
    for rank in range(p):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert torch.allclose(got["local"], xs[rank], atol=1e-12, rtol=0), rank
        assert torch.allclose(got["center"], center, atol=1e-12, rtol=0), rank


@pytest.mark.cuda
@needs_cuda
def test_staging_on_cuda_uses_pinned_buffers_and_orders_the_streams() -> None:
    device = torch.device("cuda")
    staging = HostStaging([device])
    host = staging.empty(1 << 20, torch.float32)
    assert staging.pinned and host.is_pinned()
    src = torch.zeros(1 << 20, device=device)
    for _ in range(20):  # queued work the download must follow
        src.add_(1.0)
    staging.download([(host, src)])
    assert bool((host == 20.0).all())
    dst = torch.zeros(1 << 20, device=device)
    staging.upload([(dst, host)])
    dst.mul_(2.0)  # queued on the compute stream after the upload: must see the uploaded values
    assert bool((dst == 40.0).all())
    staging.release()


@pytest.mark.cuda
@needs_cuda
def test_cuda_worker_matches_the_cpu_one_without_host_waits_between_exchanges() -> None:
    results = []
    for device in ("cpu", "cuda"):
        w = torch.linspace(-1.0, 1.0, 4097, dtype=torch.float32, device=device)
        averager = AsyncElasticAverager([("w", w)], tau=3, alpha=0.4)
        waits = []
        try:
            for step in range(7):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    if device == "cuda":
                        torch.cuda.set_sync_debug_mode("warn")
                    try:
                        with averager.step():
                            w.mul_(0.9).add_(0.01 * (step + 1))
                    finally:
                        if device == "cuda":
                            torch.cuda.set_sync_debug_mode("default")
                waits.append(sum("synchroniz" in str(c.message) for c in caught))
            results.append((w.cpu(), averager.center_values()[0].cpu()))
        finally:
            averager.close()
        if device == "cuda":
            assert all(waits[s] == 0 for s in range(7) if not (s > 0 and s % 3 == 0)), waits
    (w_cpu, c_cpu), (w_gpu, c_gpu) = results
    assert torch.allclose(w_gpu, w_cpu, atol=1e-6) and torch.allclose(c_gpu, c_cpu, atol=1e-6)
