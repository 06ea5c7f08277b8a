"""The framework-free asynchronous core: the sharded center service and the worker-side averager."""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_easgd.core import NonFiniteWorkerError
from lightning_easgd.core.async_averager import AsyncElasticAverager, async_stability_bound, async_stability_warning
from lightning_easgd.core.center_service import CenterShard, shard_bounds


def test_shard_bounds_are_contiguous_and_balanced() -> None:
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert shard_bounds(0, 2) == [(0, 0), (0, 0)]


def test_shard_applies_round_robin_turns_in_order() -> None:
    """Requests that arrive before their turn wait; each update sees the center its predecessor left."""
    shard = CenterShard([torch.zeros(2, dtype=torch.float64)], [[(0, 0, 2)]], num_tensors=1, num_workers=3,
                        alpha=0.5)
    x = [torch.full((2,), float(v), dtype=torch.float64) for v in (4.0, 8.0, 16.0)]
    late = shard.exchange(2, [x[2]], turn=2)
    middle = shard.exchange(1, [x[1]], turn=1)
    assert not late.done() and not middle.done() and shard.version == 0
    first = shard.exchange(0, [x[0]], turn=0)
    assert first.done() and middle.done() and late.done() and shard.version == 3
    # c: 0 -> 0 + .5*(4-0) = 2 -> 2 + .5*(8-2) = 5 -> 5 + .5*(16-5) = 10.5
    assert [f.value().diffs[0][0].item() for f in (first, middle, late)] == [4.0, 6.0, 11.0]
    assert [f.value().version for f in (first, middle, late)] == [0, 1, 2]
    assert shard.values[0].tolist() == [10.5, 10.5]
    # Every worker's squared distance at its latest exchange: (4², 6², 11²) · 2 elements.
    assert late.value().worker_sq[:, 0].tolist() == pytest.approx([32.0, 72.0, 242.0], rel=1e-12)
    with pytest.raises(RuntimeError, match="turn 1 of worker 1 was already taken"):
        shard.exchange(1, [x[1]], turn=1)


def test_shard_read_and_update_are_atomic_under_concurrency() -> None:
    """Four threads hammer one shard (as RPC handler threads do); the replies must be linearizable: ordered by
    version, each update saw exactly the center the previous one left, c_(k+1) = c_k + α·(x_k − c_k)."""
    alpha, n = 0.3, 4096
    shard = CenterShard([torch.zeros(n, dtype=torch.float64)], [[(0, 0, n)]], num_tensors=1, num_workers=4,
                        alpha=alpha)
    log: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def worker(rank: int) -> None:
        g = torch.Generator().manual_seed(rank)
        for _ in range(100):
            x = torch.randn(n, generator=g, dtype=torch.float64)
            reply = shard.exchange(rank, [x], None).value()
            log.append((reply.version, x, reply.diffs[0]))

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.sort(key=lambda e: e[0])
    assert [v for v, _, _ in log] == list(range(400))
    center = torch.zeros(n, dtype=torch.float64)
    for _, x, d in log:
        assert torch.allclose(x - d, center, rtol=0, atol=1e-12), "an update read a center another was changing"
        center = center + alpha * d
    assert torch.allclose(shard.values[0], center, atol=1e-12)


def test_waits_are_bounded_by_the_timeout() -> None:
    """A reply that never comes (a dead owner, a round-robin turn that never arrives) raises instead of hanging."""
    from torch.futures import Future

    from lightning_easgd.core import ExchangeError
    from lightning_easgd.core.center_service import CenterService

    service = CenterService([torch.zeros(4)], [[(0, 0, 4)]], num_tensors=1, alpha=0.5, timeout=0.2)
    try:
        start = time.perf_counter()
        with pytest.raises(ExchangeError, match=r"the exchange did not complete within timeout=0.2 s"):
            service.wait(Future(), "the exchange")
        assert time.perf_counter() - start < 5.0
        failed: Future[int] = Future()
        failed.set_exception(RuntimeError("eof"))
        with pytest.raises(ExchangeError, match="the exchange failed on rank 0: eof"):
            service.wait(failed, "the exchange")
    finally:
        service.close()


def test_stability_bound() -> None:
    assert async_stability_bound(0.0) == 1.0
    assert async_stability_bound(1.0) == pytest.approx(2 / 3)
    assert async_stability_bound(2.0) == 0.0
    assert async_stability_bound(2.5) == 0.0
    assert async_stability_warning(0.45, 0.1) is None
    assert "(4 - 2*lr)/(4 - lr) = 0.4" in async_stability_warning(0.45, 1.5)
    assert "outside" in async_stability_warning(0.1, 2.5)


def _single(alpha: float = 0.5, **kwargs: object) -> tuple[AsyncElasticAverager, torch.Tensor]:
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    return AsyncElasticAverager([("w", w)], tau=1, alpha=alpha, **kwargs), w


def test_single_worker_rule_and_interface() -> None:
    averager, w = _single(per_tensor_distances=True)
    try:
        averager.track_distances(per_tensor=True)
        with averager.step():  # t = 0: no exchange
            w.add_(1.0)
        assert averager.center_values()[0].tolist() == [1.0, 2.0, 3.0]
        with averager.step():  # t = 1: x = (2, 3, 4), center (1, 2, 3): d = 1
            w.mul_(2.0)  # the "local step", evaluated at x
        assert w.tolist() == [3.5, 5.5, 7.5]  # 2x − α·d
        assert averager.center_values()[0].tolist() == [1.5, 2.5, 3.5]
        (stats,) = averager.pop_stats()
        assert stats.step == 1 and stats.distances.tolist() == [pytest.approx(3 ** 0.5)]
        assert stats.center_norm == pytest.approx(14 ** 0.5)
        assert stats.layer_distances.shape == (1, 1)
        assert stats.extra["version_lag"] == 0.0
        averager.use_center()
        assert w.tolist() == [1.5, 2.5, 3.5] and averager.local_values()[0].tolist() == [3.5, 5.5, 7.5]
        with pytest.raises(RuntimeError, match="swapped in"):
            averager.step().__enter__()
        averager.restore_local()
        assert w.tolist() == [3.5, 5.5, 7.5]
        state = averager.state_dict()
        state["center"]["w"] = torch.zeros(3, dtype=torch.float64)
        averager.load_state_dict(state)
        assert averager.center_values()[0].tolist() == [0.0, 0.0, 0.0]
        with pytest.raises(ValueError, match="tensor 'w' has shape"):
            averager.load_local([torch.zeros(2)])
        averager.adopt_center()
        assert w.tolist() == [0.0, 0.0, 0.0]
        assert averager.bytes_per_exchange == 0  # one worker: nothing crosses the network
    finally:
        averager.close()
    assert averager.service.closed


def test_nonfinite_worker_raise_and_reset() -> None:
    averager, w = _single()
    try:
        averager.clock = 1
        w[0] = float("nan")
        with pytest.raises(NonFiniteWorkerError, match="worker 0 of 1 has non-finite .* step 1"), averager.step():
            pass
        assert averager.center_values()[0].tolist() == [1.0, 2.0, 3.0]  # nothing reached the center
    finally:
        averager.close()
    averager, w = _single(on_nonfinite="reset")
    try:
        averager.clock = 1
        w[1] = float("inf")
        with averager.step():
            w.add_(1.0)
        assert w.tolist() == [1.0, 2.0, 3.0] and averager.pop_resets() == [(1, (0,))]
    finally:
        averager.close()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"order": "fifo"}, r"order='fifo' is invalid: choose 'free' .* or 'round_robin'"),
    ({"overlap": 1}, r"overlap=1 is invalid"),
    ({"on_nonfinite": "skip"}, r"on_nonfinite='skip' is invalid"),
    ({"alpha": 1.5}, r"alpha=1.5 is invalid"),
])
def test_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _single(**kwargs)


# ---------------------------------------------------------------------------------------------- free-running, p = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_worker(rank: int, p: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=p)
    x = torch.linspace(-1.0, 1.0, 1001, dtype=torch.float64)  # same start everywhere
    bias = torch.zeros(3, dtype=torch.float64)
    target = torch.full_like(x, float(rank + 1))
    averager = AsyncElasticAverager([("x", x), ("b", bias)], tau=1, alpha=0.2, timeout=None)
    averager.track_distances()
    elastic = torch.zeros_like(x)
    rng = random.Random(rank)
    lags = []
    for _ in range(60):
        before = x.clone()
        with averager.step():
            x.sub_(0.05 * (x - target))  # gradient step at x, the pre-elastic point
            time.sleep(rng.random() * 0.004)  # uneven, overlapping clocks
        elastic += x - before + 0.05 * (before - target)
        lags += [s.extra["version_lag"] for s in averager.pop_stats()]
    averager.use_center()  # consistent snapshot: every exchange of every worker applied
    versions = averager.service.shard.version
    torch.save({"elastic": elastic, "center": x.clone(), "lags": lags, "version": versions}, f"{out}/{rank}.pt")
    averager.restore_local()
    averager.close()
    dist.destroy_process_group()


def test_free_running_updates_are_atomic_and_conserved(tmp_path: Path) -> None:
    """Three workers exchange on their own, uneven clocks: Σ over workers of their elastic moves equals minus the
    center's move (every update reached the center exactly once), each slice counted p·59 updates, and the
    snapshot taken between barriers is the same on every rank."""
    p = 3
    mp.start_processes(_free_worker, args=(p, _free_port(), str(tmp_path)), nprocs=p, start_method="fork")
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(p)]
    start = torch.linspace(-1.0, 1.0, 1001, dtype=torch.float64)
    center = results[0]["center"]
    for r in results[1:]:
        assert torch.equal(r["center"], center), "ranks saw different center snapshots"
    total_elastic = sum(r["elastic"] for r in results)
    assert torch.allclose(center - start, -total_elastic, atol=1e-12, rtol=0)
    assert not torch.allclose(center, start)
    # 59 exchanges per worker (t = 1..59) reached each slice; lags count the others' updates in between.
    assert all(len(r["lags"]) == 59 for r in results)
    # Each worker's lags add up to the other workers' exchanges that landed before its last one.
    for r in results:
        assert 0 <= sum(r["lags"]) <= (p - 1) * 59 + 1e-9
    assert results[0]["version"] == results[1]["version"] == results[2]["version"] == p * 59


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_tensors_keep_a_float32_center(dtype: torch.dtype) -> None:
    """``*-true`` precisions: updates α·(x − x̃) far below the 16-bit spacing still move the center, which follows a
    float32 replay of Algorithm 1 exactly; the pull is computed in float32 and rounded once into the tensor."""
    alpha, spacing = 0.1, 2.0  # the spacing of bf16 at 256 and of fp16 at 2048
    start = 256.0 if dtype == torch.bfloat16 else 2048.0
    w = torch.full((5,), start, dtype=dtype)
    averager = AsyncElasticAverager([("w", w)], tau=1, alpha=alpha)
    center = torch.full((5,), start)
    try:
        for t in range(6):
            with averager.step():
                before = w.float()
                w.sub_(spacing)  # the local step moves x by one 16-bit spacing
                after = w.float()
            if t > 0:  # float32 replay: d at the pre-step x, center += α·d, pull rounded once
                d = before - center
                center += alpha * d
                expected = (after - alpha * d).to(dtype)
                assert torch.equal(w, expected), (t, w, expected)
        got = averager.center_values()[0]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, center, rtol=0, atol=0)
        # Every update α·d here is at most 10 % of a spacing: a 16-bit center would never have left its start.
        assert float((center - start).abs().min()) > 0.5
        assert averager.service.shard.values[0].dtype == torch.float32
        assert averager.state_dict()["center"]["w"].dtype == torch.float32
    finally:
        averager.close()


def test_shard_takes_sixteen_bit_slices_into_a_float32_center() -> None:
    """A worker sends x in bfloat16; the owner subtracts and updates in float32 and replies in float32."""
    shard = CenterShard([torch.full((3,), 256.0, dtype=torch.bfloat16)], [[(0, 0, 3)]], num_tensors=1,
                        num_workers=1, alpha=0.01)
    assert shard.values[0].dtype == torch.float32
    reply = shard.exchange(0, [torch.full((3,), 258.0, dtype=torch.bfloat16)], None).value()
    assert reply.diffs[0].dtype == torch.float32 and reply.diffs[0].tolist() == [2.0] * 3
    assert torch.equal(shard.values[0], torch.full((3,), 256.0) + 0.01 * torch.full((3,), 2.0))
