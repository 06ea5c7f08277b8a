"""Center momentum and the exchange schedule in the core alone (moved from tests/trainer/test_center_momentum.py):
bit-identity of μ = 0 with the paper's rule, the velocity in the averager's state, the stability bounds against the
iteration's spectral radius, and the schedule's exchange steps."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_easgd.core import ElasticAverager, ExchangeSchedule
from lightning_easgd.core.center_momentum import (
    CenterMomentum,
    center_momentum_bound,
    check_center_momentum,
)


def test_zero_momentum_is_bit_identical_to_the_plain_rule() -> None:
    """μ = 0 keeps the paper's code path (no velocity), so a run is bit for bit the plain one."""
    torch.manual_seed(2)
    init = [torch.randn(5, 3, dtype=torch.float32), torch.randn(7, dtype=torch.float32)]
    runs = {}
    for key, kwargs in {"plain": {}, "zero": {"center_momentum": 0.0},
                        "momentum": {"center_momentum": 0.5}}.items():
        tensors = [t.clone() for t in init]
        averager = ElasticAverager([("a", tensors[0]), ("b", tensors[1])], tau=1, alpha=0.3, **kwargs)
        gen = torch.Generator().manual_seed(3)
        for _ in range(6):
            with averager.step():
                for t in tensors:
                    t.add_(torch.randn(t.shape, generator=gen))
        runs[key] = (averager, [c.clone() for c in averager.center_values()], [t.clone() for t in tensors])
    assert runs["zero"][0].center_momentum is None and runs["zero"][0].center_velocity() is None
    for plain, zero in zip(runs["plain"][1] + runs["plain"][2], runs["zero"][1] + runs["zero"][2]):
        assert torch.equal(plain, zero)
    assert not torch.equal(runs["plain"][1][0], runs["momentum"][1][0])  # the comparison can tell them apart


def test_core_state_dict_carries_the_velocity() -> None:
    """state_dict/load_state_dict move v with the center (by tensor name, any bucket layout); a state without v
    starts it at zero; a v where the averager has no momentum is refused."""
    torch.manual_seed(4)
    values = [torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]

    def averager(bucket_cap_mb: float = 25.0, **kwargs: Any) -> tuple[ElasticAverager, list[torch.Tensor]]:
        tensors = [v.clone() for v in values]
        return ElasticAverager([("a", tensors[0]), ("b", tensors[1])], tau=1, alpha=0.4,
                               bucket_cap_mb=bucket_cap_mb, **kwargs), tensors

    def run(avg: ElasticAverager, tensors: list[torch.Tensor], steps: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            with avg.step():
                for t in tensors:
                    t.add_(torch.randn(t.shape, generator=gen, dtype=t.dtype))

    first, first_tensors = averager(center_momentum=0.7)
    run(first, first_tensors, 4, seed=0)
    state = first.state_dict()
    assert set(state["center_velocity"]) == {"a", "b"} and state["center_velocity"]["a"].abs().max() > 0
    # Another bucket layout (one bucket per tensor) restores the same v by name and continues identically.
    second, second_tensors = averager(bucket_cap_mb=1e-5, center_momentum=0.7)
    second.load_state_dict(state)
    second.load_local(first.local_values())
    run(first, first_tensors, 3, seed=1)
    run(second, second_tensors, 3, seed=1)
    for a, b in zip(first.center_values(), second.center_values()):
        assert torch.equal(a, b)
    # A state without v (plain EASGD) starts v at zero.
    plain, _ = averager()
    fresh, _ = averager(center_momentum=0.7)
    fresh.load_state_dict(state)
    fresh.load_state_dict(plain.state_dict())
    assert all(not v.any() for v in fresh.center_velocity().values())
    with pytest.raises(ValueError, match="the state holds a center velocity, but this averager has no center "
                                         "momentum"):
        plain.load_state_dict(state)
    with pytest.raises(ValueError, match=r"center velocity state: tensor 'b' has shape \(4,\), expected \(5,\)"):
        fresh.load_state_dict({**state, "center_velocity": {"a": values[0], "b": torch.zeros(4)}})


def _iteration_matrix(beta: float, momentum: float, nesterov: bool) -> torch.Tensor:
    """The center's linear map (e, v) -> (e', v') toward a fixed workers' mean, read off CenterMomentum itself:
    with the mean at 0 and the center at e, Σ_i d_i = −p·e; α = β/p."""
    p = 4
    columns = []
    for e, v in ((1.0, 0.0), (0.0, 1.0)):
        momentum_rule = CenterMomentum([torch.zeros(1, dtype=torch.float64)], momentum, nesterov)
        momentum_rule.velocity[0].fill_(v)
        center = torch.tensor([e], dtype=torch.float64)
        momentum_rule.apply([center], [-p * center.clone()], beta / p)
        columns.append(torch.cat([center, momentum_rule.velocity[0]]))
    return torch.stack(columns, dim=1)


def _spectral_radius(beta: float, momentum: float, nesterov: bool) -> float:
    return torch.linalg.eigvals(_iteration_matrix(beta, momentum, nesterov)).abs().max().item()


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.2, 0.5, 0.9, 0.99])
def test_stability_bound_is_the_spectral_radius_crossing_one(momentum: float, nesterov: bool) -> None:
    bound = center_momentum_bound(momentum, nesterov)
    assert bound == pytest.approx(2 * (1 + momentum) / (1 + 2 * momentum) if nesterov else 2 * (1 + momentum))
    for beta in [bound * k / 20 for k in range(1, 20)] + [bound * (1 - 1e-6)]:
        assert _spectral_radius(beta, momentum, nesterov) < 1, f"beta={beta} inside the bound must be stable"
        check_center_momentum(beta, momentum, nesterov)  # accepted
    for beta in (bound * (1 + 1e-3), bound * 1.2):
        assert _spectral_radius(beta, momentum, nesterov) > 1, f"beta={beta} outside the bound must diverge"
        with pytest.raises(ValueError, match=rf"beta = p\*alpha = {beta:g} with center_momentum={momentum:g} "
                                             rf".* unstable: .* 0 < beta < .* = {bound:g}"):
            check_center_momentum(beta, momentum, nesterov)
    with pytest.raises(ValueError, match="unstable"):
        check_center_momentum(0.0, momentum, nesterov)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.6, 0.9])
def test_overshoot_warning_is_a_sign_change_every_other_exchange_or_faster(momentum: float, nesterov: bool) -> None:
    """The warning fires exactly when the center, started at rest off the mean, changes sides more often than every
    second exchange (the dominant eigenvalue's real part is negative)."""
    bound = center_momentum_bound(momentum, nesterov)
    for beta in [bound * k / 40 for k in range(1, 40)]:
        eigenvalues = torch.linalg.eigvals(_iteration_matrix(beta, momentum, nesterov))
        if abs(eigenvalues.real.sum().item()) < 0.05:
            continue  # too close to the threshold to tell from a finite run
        state = torch.tensor([1.0, 0.0], dtype=torch.float64)
        signs = []
        matrix = _iteration_matrix(beta, momentum, nesterov)
        for _ in range(400):
            state = matrix @ state
            state = state / state.abs().max()  # only the direction matters
            signs.append(bool(state[0] > 0))
        rate = sum(a != b for a, b in zip(signs[100:], signs[101:])) / 299
        warning = check_center_momentum(beta, momentum, nesterov)
        assert (warning is not None) == (rate > 0.5), f"beta={beta:g}: sign-change rate {rate:.2f}, {warning}"
    if momentum == 0.0:  # the paper's overshoot, beta > 1
        assert check_center_momentum(1.01, 0.0, nesterov) and not check_center_momentum(0.99, 0.0, nesterov)


def test_iteration_formulas_match_the_rule() -> None:
    from lightning_easgd.core.center_momentum import center_iteration

    for nesterov in (False, True):
        for momentum, beta in ((0.5, 0.9), (0.9, 0.3), (0.2, 1.7)):
            matrix = _iteration_matrix(beta, momentum, nesterov)
            trace, det = center_iteration(beta, momentum, nesterov)
            assert matrix.trace().item() == pytest.approx(trace, abs=1e-12)
            assert torch.linalg.det(matrix).item() == pytest.approx(det, abs=1e-12)


def test_schedule_names_the_exchange_steps() -> None:
    assert [t for t in range(20) if ExchangeSchedule(3).due(t)] == [3, 6, 9, 12, 15, 18]
    assert [t for t in range(20) if ExchangeSchedule(3, warmup_steps=5).due(t)] == [1, 2, 3, 4, 6, 9, 12, 15, 18]
    assert [t for t in range(20) if ExchangeSchedule(4, 10, 2).due(t)] == [2, 4, 6, 8, 12, 16]
    assert [t for t in range(8) if ExchangeSchedule(4, 1, 1).due(t)] == [4]  # only step 0 is in the warm-up
    for tau in (1, 3, 4):
        for warmup_steps in (0, 1, 2, 5, 8, 12):
            for warmup_tau in range(1, tau + 1):
                schedule = ExchangeSchedule(tau, warmup_steps, warmup_tau)
                count = 0
                for t in range(40):
                    count += schedule.due(t)
                    assert schedule.exchange_index(t) == count, (schedule, t)
