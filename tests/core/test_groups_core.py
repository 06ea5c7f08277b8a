"""The sharded averager on its own: several buckets, tensors split between slices, two dtypes, padding; memory;
host synchronisation; 16-bit tensors; placement."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from helpers.bounded import fork_ranks
from lightning_easgd.core import ElasticAverager, ExchangeError, NonFiniteWorkerError
from lightning_easgd.core.buckets import check_device
from lightning_easgd.core.topology import worker_topology

WORLD = 4
TAU, ALPHA, STEPS = 2, 0.3, 7  # exchanges at t = 2, 4, 6
SHAPES = {"a": ((5, 3), torch.float64), "b": ((7,), torch.float64), "c": ((2, 2, 2), torch.float32),
          "e": ((11,), torch.float64), "f": ((3,), torch.float32), "h": ((9,), torch.bfloat16)}
CAP_MB = 150 / 2**20  # 150-byte buckets: [a], [b, e], [c, f] (float32), [h]; a, e, c and h are split between slices
MASTER = {torch.float64: torch.float64, torch.float32: torch.float32, torch.bfloat16: torch.float32}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for name, (shape, dtype) in
            SHAPES.items()}


def _local_step(x: dict[str, torch.Tensor], worker: int, t: int) -> None:
    """A deterministic "optimizer step" that differs between workers and is the same on a worker's ranks."""
    for i, value in enumerate(x.values()):
        value.mul_(0.9).add_(0.05 * (worker + 1) * (t + 1) + 0.01 * i)


def _run(rank: int, store: str, out: str, k: int, options: dict[str, Any]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    topo = worker_topology(k, WORLD, rank)
    x = _tensors()
    avg = ElasticAverager(list(x.items()), tau=TAU, alpha=ALPHA, group=topo.column_group,
                          worker_group=topo.worker_group, bucket_cap_mb=CAP_MB, per_tensor_distances=True,
                          **options)
    avg.track_distances(per_tensor=True)
    for t in range(STEPS):
        with avg.step(), torch.no_grad():
            _local_step(x, topo.worker_index, t)
    local = {n: v.clone() for n, v in x.items()}
    center = {n: v.clone() for n, v in zip(avg.names, avg.center_values())}
    with avg.center_weights():
        swapped = {n: v.clone() for n, v in x.items()}
        during = {n: v.clone() for n, v in zip(avg.names, avg.local_values())}
    restored = all(torch.equal(x[n], local[n]) for n in x)
    state = avg.state_dict()
    other = ElasticAverager(list(_tensors().items()), tau=TAU, alpha=ALPHA, group=topo.column_group,
                            worker_group=topo.worker_group, bucket_cap_mb=CAP_MB, **options)
    other.load_state_dict(state)
    reloaded = {n: v.clone() for n, v in zip(other.names, other.center_values())}
    velocity, reloaded_velocity = avg.center_velocity(), other.center_velocity()  # collective, like the center
    torch.save({"local": local, "center": center, "swapped": swapped, "during": during, "restored": restored,
                "reloaded": reloaded, "clock": other.clock, "stats": avg.pop_stats(),
                "velocity": velocity and {n: v.clone() for n, v in velocity.items()},
                "reloaded_velocity": reloaded_velocity and {n: v.clone() for n, v in reloaded_velocity.items()},
                "buffer_bytes": avg.buffer_bytes, "device_buffer_bytes": avg.device_buffer_bytes,
                "bytes_per_exchange": avg.bytes_per_exchange, "nbytes": avg.layout.nbytes,
                "buckets": [(b.numel, b.dtype) for b in avg.layout.buckets]}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _launch(tmp_path: Path, k: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    exitcodes = fork_ranks(_run, WORLD, str(tmp_path / "store"), str(tmp_path), k, options, timeout=60)
    assert exitcodes == [0] * WORLD, exitcodes
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


Replay = tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]], list[list[float]], float,
               dict[str, torch.Tensor]]


def _replay(p: int, wire: torch.dtype | None, mu: float = 0.0, nesterov: bool = False) -> Replay:
    """Eq. 5-6 with the center in the tensors' dtype, d rounded to ``wire`` if given; with ``mu`` > 0, momentum on
    the center's increment s = α·Σ d: v ← μ·v + s, then x̃ += v (heavy ball) or x̃ += μ·v + s (Nesterov). Returns
    the center, the workers, their distances at each exchange, the largest |Σ d| and the velocity."""
    workers = [_tensors() for _ in range(p)]
    center = {n: v.to(MASTER[v.dtype]) for n, v in _tensors().items()}  # a float32 center for bf16 tensors
    velocity = {n: torch.zeros_like(v) for n, v in center.items()}
    distances = []
    largest = 0.0
    for t in range(STEPS):
        exchange = t > 0 and t % TAU == 0
        diffs = [{n: x[n].to(center[n].dtype) - center[n] for n in x} for x in workers] if exchange else []
        for g, x in enumerate(workers):
            _local_step(x, g, t)
        if exchange:
            distances.append([sum(float(v.double().square().sum()) for v in d.values()) ** 0.5 for d in diffs])
            for n in center:
                largest = max(largest, float(sum(d[n].abs() for d in diffs).max()))
                total = sum(d[n] if wire is None else d[n].to(wire) for d in diffs)
                if mu:
                    step = ALPHA * total
                    velocity[n] = mu * velocity[n] + step
                    center[n] += mu * velocity[n] + step if nesterov else velocity[n]
                else:
                    center[n].add_(ALPHA * total.to(center[n].dtype))
            for x, d in zip(workers, diffs):
                for n in x:  # computed in the center's dtype, rounded once into the tensor's
                    x[n].copy_(x[n].to(d[n].dtype) - ALPHA * d[n])
    return center, workers, distances, largest, velocity


@pytest.mark.parametrize(
    ("k", "options"),
    [(1, {}), (2, {}), (2, {"center_device": "cpu"}), (2, {"exchange_dtype": torch.bfloat16}),
     (4, {"overlap": False}), (2, {"center_device": "cpu", "exchange_dtype": "bfloat16"}),
     (1, {"exchange_dtype": "bfloat16"})],
)
def test_sharded_exchange_matches_replay(tmp_path: Path, k: int, options: dict[str, Any]) -> None:
    p = WORLD // k
    wire = torch.bfloat16 if options.get("exchange_dtype") else None
    records = _launch(tmp_path, k, options)
    center, workers, distances, largest, _ = _replay(p, wire if p > 1 else None)
    buckets = records[0]["buckets"]
    assert len(buckets) == 4 and (k == 1 or any(n % k for n, _ in buckets))  # several buckets, some padded
    atol = {torch.float64: 1e-12, torch.float32: 1e-6}  # float32: the center of the float32 and bf16 tensors
    exact = wire is None or p <= 2
    if not exact:
        # With p >= 3 the collective rounds each partial sum to bfloat16, in an order of its own choosing: per
        # exchange the sums differ by at most (p - 2) roundings of 2^-8 relative to |Σ d|, scaled by α; later
        # differences propagate through d. Twice that over the exchanges bounds it; p = 2 rounds once: exact.
        bound = 2 * (STEPS // TAU) * ALPHA * (p - 2) * 2**-8 * largest
        atol = {dtype: max(tol, bound) for dtype, tol in atol.items()}
    for rank, rec in enumerate(records):
        worker = rank // k
        for n in center:
            tol = atol[center[n].dtype]
            assert rec["center"][n].dtype == center[n].dtype
            torch.testing.assert_close(rec["center"][n], center[n], rtol=0, atol=tol, msg=f"rank {rank} {n}")
            local_tol = tol
            if workers[worker][n].dtype == torch.bfloat16:  # rounded once, as replayed: exact unless the center
                local_tol = 0.0 if exact else tol + 2**-7 * float(workers[worker][n].abs().max())  # may differ
            torch.testing.assert_close(rec["local"][n].float(), workers[worker][n].float(), rtol=0, atol=local_tol,
                                       msg=f"{rank} {n}")
            assert torch.equal(rec["center"][n], records[0]["center"][n])
            assert torch.equal(rec["local"][n], records[worker * k]["local"][n])
            dtype = rec["local"][n].dtype  # the bf16 tensor gets its float32 center rounded once
            assert torch.equal(rec["swapped"][n], rec["center"][n].to(dtype)), "use_center put the full center in"
            assert torch.equal(rec["during"][n].to(dtype), rec["local"][n]), "local_values() during the swap"
            assert torch.equal(rec["reloaded"][n], rec["center"][n]), "state_dict round trip"
        assert rec["restored"] and rec["clock"] == STEPS
        assert [s.step for s in rec["stats"]] == [2, 4, 6]
        rel = 1e-6 if exact else 1e-2
        for stats, expected in zip(rec["stats"], distances):
            assert stats.distances.tolist() == pytest.approx(expected, rel=rel)  # one per worker
            assert stats.layer_distances is not None and stats.layer_distances.shape == (p, len(SHAPES))
            assert stats.layer_distances.square().sum(1).sqrt().tolist() == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_exchange_memory_is_three_kths_of_the_model_plus_one_bucket(tmp_path: Path, k: int) -> None:
    records = _launch(tmp_path, k, {})
    for rec in records:
        buckets = rec["buckets"]
        # The averaged tensors in the center's dtype (float32 for the bf16 tensor).
        model = sum(n * MASTER[dtype].itemsize for n, dtype in buckets)
        # Padding: at most k - 1 elements per bucket in each of the three slices.
        padding = 3 * (k - 1) * 8 * len(buckets)
        largest = max(-(-n // k) * k * 8 for n, _ in buckets)  # the gather buffer (float64, padded)
        slices = rec["buffer_bytes"] - (largest if k > 1 else 0)
        factor = 3 if k < WORLD else 2  # one worker: no reduction, so no separate sum
        assert factor * model / k <= slices <= factor * model / k + padding
        assert rec["buffer_bytes"] <= 3 / k * model + largest + padding
        assert rec["device_buffer_bytes"] == rec["buffer_bytes"]
        assert rec["bytes_per_exchange"] <= model / k + 8 * (k - 1) * len(buckets)
        assert rec["nbytes"] < model  # the bf16 tensor's center and d are float32


def test_host_center_keeps_one_bucket_on_the_device(tmp_path: Path) -> None:
    for k in (1, 2):
        out = tmp_path / str(k)
        out.mkdir()
        for rec in _launch(out, k, {"center_device": "cpu"}):
            largest_slice = max(-(-n // k) * 8 for n, _ in rec["buckets"])
            gather = largest_slice * k if k > 1 else 0
            assert rec["device_buffer_bytes"] == largest_slice + gather
            assert rec["buffer_bytes"] - rec["device_buffer_bytes"] >= 3 * rec["nbytes"] / k


def test_no_host_synchronisation_outside_the_one_read_per_exchange(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors on the meta device hold no data, so anything that reads a value on the host (``bool``, ``item``,
    ``float``, ``.cpu()``) raises there: steps and the start of an exchange must run through, and the end of an
    exchange reads the statistics exactly once."""
    lin = torch.nn.Linear(3, 2, device="meta")
    avg = ElasticAverager(list(lin.named_parameters()), tau=2, alpha=0.5, per_tensor_distances=True)
    avg.track_distances(per_tensor=True)
    reads: list[torch.Tensor] = []

    def read(stats: torch.Tensor) -> torch.Tensor:
        assert stats.device.type == "meta"
        reads.append(stats)
        return torch.zeros(stats.shape, dtype=stats.dtype)

    monkeypatch.setattr(avg, "_read", read)
    for _ in range(5):  # t = 0, 1, 3: plain steps; t = 2, 4: exchanges
        with avg.step():
            pass
    assert len(reads) == 2
    assert [s.step for s in avg.pop_stats()] == [2, 4]


def test_half_precision_tensors_keep_a_float32_center() -> None:
    """bf16 weights: the center and d are float32 and the pull is rounded once into bf16 (one worker)."""
    w = torch.nn.Parameter(torch.full((4,), 1.0, dtype=torch.bfloat16))
    avg = ElasticAverager([("w", w)], tau=1, alpha=0.25)
    center = torch.full((4,), 1.0)
    for t in range(4):
        with avg.step():
            before = w.detach().float()
            with torch.no_grad():
                w.sub_(0.03)
            after = w.detach().clone()
        if t > 0:
            d = before - center
            center += 0.25 * d
            expected = (after.float() - 0.25 * d).to(torch.bfloat16)
            assert torch.equal(w.detach(), expected)
    assert avg.center_values()[0].dtype == torch.float32
    torch.testing.assert_close(avg.center_values()[0], center, rtol=0, atol=0)


def test_placement_is_checked_by_name() -> None:
    module = torch.nn.Linear(2, 2)
    module.register_buffer("scale", torch.ones(1, device="meta"))
    with pytest.raises(ValueError, match=r"tensor 'scale' is on meta but the model runs on cpu"):
        check_device([*module.named_parameters(), *module.named_buffers()], torch.device("cpu"))
    check_device(list(module.named_parameters()), torch.device("cpu"))


def test_nccl_waits_leave_timeouts_to_the_process_group() -> None:
    """On NCCL ``Work.wait(timeout)`` only polls on the host while the watchdog may abort the process: the exchange
    waits plainly there and relies on the process group's timeout; gloo keeps the exchange's own limit."""
    lin = torch.nn.Linear(2, 1)
    avg = ElasticAverager(list(lin.named_parameters()), tau=1, alpha=0.5, timeout=timedelta(seconds=7))

    class Work:
        def __init__(self) -> None:
            self.calls: list[tuple[Any, ...]] = []

        def wait(self, *args: Any) -> bool:
            self.calls.append(args)
            return True

    for nccl, expected in ((False, [(timedelta(seconds=7),)]), (True, [()])):
        avg._nccl = nccl
        work = Work()
        avg._wait_for([work])  # type: ignore[list-item]
        assert work.calls == expected


def test_default_bucket_size_follows_the_device() -> None:
    from types import SimpleNamespace

    from lightning_easgd.core.buckets import resolve_bucket_cap_mb

    cpu = torch.zeros(1)
    cuda = SimpleNamespace(device=torch.device("cuda", 0))  # only the device is read
    assert resolve_bucket_cap_mb(None, [cpu]) == 25.0
    assert resolve_bucket_cap_mb(None, [cpu, cuda]) == 256.0  # type: ignore[list-item]
    assert resolve_bucket_cap_mb(4.0, [cuda]) == 4.0  # type: ignore[list-item]


def _stalled_group(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    topo = worker_topology(2, WORLD, rank, timeout=timedelta(seconds=2))
    if rank != 2:
        # Rank 3 never joins its worker's all-reduce; no rank exits either (until killed), so that rank 2 can only
        # fail through the timeout, not through a peer's closed connection.
        time.sleep(30)
    else:
        start = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=topo.worker_group)
            outcome = "no error"
        except RuntimeError as error:
            outcome = f"{type(error).__name__}: {error}"
        Path(f"{out}/rank2.txt").write_text(f"{time.monotonic() - start:.1f} {outcome}")


def test_worker_groups_use_the_given_timeout(tmp_path: Path) -> None:
    """torch gives new groups its own default timeout, not the world's: the strategy's must reach them."""
    fork_ranks(_stalled_group, WORLD, str(tmp_path / "store"), str(tmp_path), timeout=40, wait_for=[2])
    waited, outcome = (tmp_path / "rank2.txt").read_text().split(" ", 1)
    assert outcome != "no error" and 1.5 <= float(waited) < 15, (waited, outcome)


@pytest.mark.parametrize(("k", "nesterov", "options"),
                         [(1, False, {}), (2, False, {}), (2, True, {}), (2, True, {"center_device": "cpu"})])
def test_center_momentum_is_sharded_like_the_center(tmp_path: Path, k: int, nesterov: bool,
                                                     options: dict[str, Any]) -> None:
    """The velocity is a slice per rank with worker groups: updated, gathered and restored like the center."""
    mu = 0.5
    records = _launch(tmp_path, k, {"center_momentum": mu, "center_nesterov": nesterov, **options})
    center, _, _, _, velocity = _replay(WORLD // k, None, mu, nesterov)
    atol = {torch.float64: 1e-12, torch.float32: 1e-6}
    for rank, rec in enumerate(records):
        for n in center:
            tol = atol[center[n].dtype]
            torch.testing.assert_close(rec["center"][n], center[n], rtol=0, atol=tol, msg=f"rank {rank} center {n}")
            torch.testing.assert_close(rec["velocity"][n], velocity[n], rtol=0, atol=tol, msg=f"rank {rank} v {n}")
            assert torch.equal(rec["velocity"][n], records[0]["velocity"][n]), "v is identical on every rank"
            assert torch.equal(rec["reloaded_velocity"][n], rec["velocity"][n]), "state_dict round trip of v"
        assert float(sum(v.abs().sum() for v in rec["velocity"].values())) > 0


# ------------------------------------------------------------------ decisions taken per worker, not per slice


def _slice_fault(rank: int, store: str, out: str, fault: str, policy: str) -> None:
    """2 workers × 2 ranks, one 8-element tensor: rank j of a worker owns elements [4j, 4j + 4). A fault that only
    one slice sees: a sum that overflows in slice 0 (each worker's difference finite), or a NaN in worker 1's
    slice 1. Writes what the exchange did and how long it took."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))
    topo = worker_topology(2, WORLD, rank)
    w = torch.zeros(8)
    avg = ElasticAverager([("w", w)], tau=1, alpha=0.25, group=topo.column_group, worker_group=topo.worker_group,
                          on_nonfinite=policy, timeout=timedelta(seconds=10))
    with avg.step():  # t = 0: no exchange
        w.add_(topo.worker_index + 1.0)
    if fault == "overflow":
        w[0] = 3e38  # d = 3e38 on both workers: Σd = 6e38 overflows float32 in slice 0 only
    elif topo.worker_index == 1:
        w[6] = float("nan")
    start = time.monotonic()
    try:
        with avg.step():
            pass
        outcome = f"ok {avg.pop_resets()} {w.tolist()}"
    except (ExchangeError, NonFiniteWorkerError) as error:
        outcome = f"{type(error).__name__}: {error}"
    Path(f"{out}/rank{rank}.txt").write_text(f"{time.monotonic() - start:.1f} {outcome}")
    os._exit(0)  # peers may have left mid-collective: no orderly teardown


@pytest.mark.parametrize(("fault", "policy"), [("overflow", "raise"), ("nan", "raise"), ("nan", "reset")])
def test_a_fault_in_one_slice_is_decided_worker_wide(tmp_path: Path, fault: str, policy: str) -> None:
    """Every rank of every worker takes the same decision, within the timeout: none raises while its worker's other
    rank waits in the gather of the pull."""
    exitcodes = fork_ranks(_slice_fault, WORLD, str(tmp_path / "store"), str(tmp_path), fault, policy, timeout=40)
    hung = [rank for rank, code in enumerate(exitcodes) if code is None]
    assert not hung, f"ranks {hung} hung"
    results = [(tmp_path / f"rank{r}.txt").read_text().split(" ", 1) for r in range(WORLD)]
    assert all(float(waited) < 5 for waited, _ in results), results
    outcomes = [outcome for _, outcome in results]
    if fault == "overflow":
        assert all(o.startswith("ExchangeError: ") and "overflowed" in o for o in outcomes), outcomes
    elif policy == "raise":
        assert all(o.startswith("NonFiniteWorkerError: EASGD: worker(s) 1 of 2 ") for o in outcomes), outcomes
    else:  # worker 0 pulled toward the new center (worker 1 contributed nothing), worker 1 reset to it
        expected = {0: [1.0 - 0.25 * 1.0] * 8, 1: [0.0 + 0.25 * 1.0] * 8}  # d_0 = 1, center 0 + α·d_0
        for rank, o in enumerate(outcomes):
            assert o == f"ok [(1, (1,))] {expected[rank // 2]}", (rank, o)
