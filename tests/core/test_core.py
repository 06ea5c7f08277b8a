"""The framework-free core on its own, in one process."""

from __future__ import annotations

import pytest
import torch

from lightning_easgd.core import ElasticAverager, ElasticWorker, FlatLayout


def test_layout_groups_by_dtype_and_caps_buckets() -> None:
    tensors = [torch.zeros(300_000), torch.zeros(10, dtype=torch.float64), torch.zeros(300_000), torch.zeros(5)]
    layout = FlatLayout(tensors, bucket_cap_mb=2.0)  # 2 MiB holds one 300k-float tensor (1.2 MB), not two
    assert [b.indices for b in layout.buckets] == [(0,), (2, 3), (1,)]
    assert layout.nbytes == 4 * 600_005 + 8 * 10
    flats = layout.allocate()
    views = layout.views(flats)
    assert [v.shape for v in views] == [t.shape for t in tensors]
    views[3].fill_(1.0)
    assert flats[1][-5:].eq(1).all() and flats[1][:-5].eq(0).all()
    with pytest.raises(ValueError, match="bucket_cap_mb=0 is invalid"):
        FlatLayout(tensors, bucket_cap_mb=0)


def _averager(tau: int = 2) -> tuple[torch.nn.Linear, ElasticAverager]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    return lin, ElasticAverager(list(lin.named_parameters()), tau=tau, alpha=0.5)


def test_exchange_buffers_are_the_center_and_the_difference_in_one_process() -> None:
    _, avg = _averager()
    assert avg.bytes_per_exchange == 4 * (6 + 2)
    assert avg.buffer_bytes == 2 * avg.bytes_per_exchange  # no separate all-reduce buffer without peers


def test_center_swap_is_exact_and_keeps_parameters() -> None:
    lin, avg = _averager()
    with torch.no_grad():
        lin.weight.add_(1.0)  # local weights drift from the center
    local = lin.weight.detach().clone()
    weight = lin.weight
    with avg.center_weights():
        assert avg.center_in_use
        assert torch.equal(lin.weight, avg.center_values()[0])
        assert torch.equal(avg.local_values()[0], local)
    assert lin.weight is weight and torch.equal(lin.weight, local)
    avg.adopt_center()
    assert torch.equal(lin.weight, avg.center_values()[0])


def test_single_worker_rule_and_clock() -> None:
    lin, avg = _averager(tau=2)
    center0 = lin.weight.detach().clone()
    for _ in range(3):
        with avg.step():
            with torch.no_grad():
                lin.weight.add_(1.0)  # a "local step"
    # t = 0, 1 plain steps; t = 2 exchange: d = x(2) - center = +2, then x = x(2) + 1 - 0.5 d, center += 0.5 d
    assert avg.clock == 3
    assert torch.allclose(lin.weight, center0 + 3 - 1.0)
    assert torch.allclose(avg.center_values()[0], center0 + 1.0)


def test_state_dict_round_trip_and_checks() -> None:
    lin, avg = _averager()
    avg.clock = 7
    state = avg.state_dict()
    _, other = _averager()
    other.load_state_dict(state)
    assert other.clock == 7 and all(torch.equal(a, b) for a, b in zip(other.center_values(), avg.center_values()))
    with pytest.raises(ValueError, match="center state has tensors"):
        other.load_state_dict({"clock": 0, "center": {"weight": lin.weight}})
    bad = {"clock": 0, "center": {"weight": torch.zeros(5), "bias": torch.zeros(2)}}
    with pytest.raises(ValueError, match=r"tensor 'weight' has shape \(5,\), expected \(2, 3\)"):
        other.load_state_dict(bad)
    with pytest.raises(ValueError, match="clock=-1 is invalid"):
        other.load_state_dict({"clock": -1, "center": state["center"]})


def test_misuse_is_reported() -> None:
    _, avg = _averager()
    avg.use_center()
    with pytest.raises(RuntimeError, match="already swapped in"):
        avg.use_center()
    with pytest.raises(RuntimeError, match="while the center weights are swapped in"):
        with avg.step():
            pass
    avg.restore_local()
    with pytest.raises(RuntimeError, match="not swapped in"):
        avg.restore_local()
    with pytest.raises(ValueError, match="only floating-point tensors"):
        ElasticAverager([("steps", torch.zeros(1, dtype=torch.long))], tau=1, alpha=0.5)


def test_one_step_template_for_both_averagers() -> None:
    """Both exchange algorithms run ElasticWorker.step(): their own code is the _begin/_end/_abandon hooks."""
    from lightning_easgd.core.async_averager import AsyncElasticAverager

    for averager in (ElasticAverager, AsyncElasticAverager):
        assert averager.step is ElasticWorker.step, averager.__name__
        assert averager._begin is not ElasticWorker._begin and averager._end is not ElasticWorker._end
    w = torch.zeros(2)
    averager = ElasticAverager([("w", w)], tau=1, alpha=0.5)
    with pytest.raises(ZeroDivisionError), averager.step():
        _ = 1 / 0
    assert averager.clock == 0  # a step that raised does not count
    with averager.step():
        w.add_(1.0)
    assert averager.clock == 1


def test_topology_resolves_node_once_and_checks_the_world() -> None:
    from lightning_easgd.core.topology import WorkerTopology

    # "node" is the processes per node: 8 ranks on 2 nodes of 4 give 2 workers; global rank 5 is worker 1, slot 1.
    assert WorkerTopology.resolve("node", 8, 5, 4) == WorkerTopology(4, 2, 1, 1)
    assert WorkerTopology.resolve(2, 6, 3, 6) == WorkerTopology(2, 3, 1, 1)
    single = WorkerTopology.resolve(1, 3, 2, 3)
    assert single == WorkerTopology(1, 3, 2, 0) and single.with_groups() is single  # no groups to build
    with pytest.raises(ValueError, match=r"ranks_per_worker=4 does not divide the world size 6"):
        WorkerTopology.resolve("node", 6, 0, 4)
