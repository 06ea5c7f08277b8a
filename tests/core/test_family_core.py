"""The elastic family in the core: the reset rule's arithmetic in one process, the synchronous start's schedule and
its misuse, and the reset rule's stability bound against the spectral radius of the iteration it bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_easgd.core import ElasticAverager, ExchangeConfig, ExchangeSchedule
from lightning_easgd.core.family import check_reset_beta, reset_beta_bound

# ---------------------------------------------------------------------------------------------- the reset rule


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.5, False), (0.9, True)])
def test_single_worker_reset_lands_on_the_new_center_plus_its_update(momentum: float, nesterov: bool) -> None:
    """One worker: Σ_i d_i is d itself (the sum and the difference share a buffer), so the order in which the
    reset subtracts the center's step matters; checked against the rule written out, over several exchanges."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, dtype=torch.float64, generator=g)
    avg = ElasticAverager([("x", x)], tau=2, alpha=0.6, worker_pull="reset", center_momentum=momentum,
                          center_nesterov=nesterov)
    center, velocity = x.clone(), torch.zeros_like(x)
    for t in range(9):
        update = torch.randn(7, dtype=torch.float64, generator=g)
        before = x.clone()
        with avg.step():
            x.add_(update)
        if t > 0 and t % 2 == 0:
            s = 0.6 * (before - center)
            velocity = momentum * velocity + s
            step = (momentum * velocity + s if nesterov else velocity) if momentum else s
            center = center + step
            expected = center + update
        else:
            expected = before + update
        assert torch.allclose(x, expected, rtol=0, atol=1e-12), f"step {t}"
        assert torch.allclose(avg.center_values()[0], center, rtol=0, atol=1e-12), f"step {t}"


def test_reset_takes_beta_as_an_outer_learning_rate_even_for_one_worker() -> None:
    """With worker_pull='reset' β is the outer learning rate in (0, 2) (below the momentum's bound): α = β/p weighs
    Σ_i d_i in the center's step and is not a pull, so one worker may take β ≥ 1 (α = β); the elastic rule still
    refuses that α, and the reset bound still applies."""
    assert ExchangeConfig(beta=1.5, worker_pull="reset").check_moving_rate(1) is None
    with pytest.raises(ValueError, match=r"alpha=1.5 is invalid: the moving rate must lie in \(0, 1\)"):
        ExchangeConfig(beta=1.5).check_moving_rate(1)
    with pytest.raises(ValueError, match=r"beta = p\*alpha = 1.5 \(the outer learning rate of worker_pull='reset'\) "
                                         r"with Nesterov center momentum"):
        ExchangeConfig(beta=1.5, worker_pull="reset", center_momentum=0.9, center_nesterov=True).check_moving_rate(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, dtype=torch.float64, generator=g)
    avg = ElasticAverager([("x", x)], ExchangeConfig(tau=1, beta=1.5, worker_pull="reset"))
    assert avg.alpha == 1.5
    center = x.clone()
    for t in range(5):
        update = torch.randn(5, dtype=torch.float64, generator=g)
        before = x.clone()
        with avg.step():
            x.add_(update)
        if t > 0:
            center = center + 1.5 * (before - center)
            expected = center + update
        else:
            expected = before + update
        assert torch.allclose(x, expected, rtol=0, atol=1e-12), f"step {t}"
        assert torch.allclose(avg.center_values()[0], center, rtol=0, atol=1e-12), f"step {t}"


def test_elastic_is_the_default_and_unknown_pulls_are_refused() -> None:
    x = torch.zeros(3)
    assert ElasticAverager([("x", x)], tau=1, alpha=0.5).worker_pull == "elastic"
    with pytest.raises(ValueError, match=r"worker_pull='nearest' is invalid: choose 'elastic'"):
        ElasticAverager([("x", x)], tau=1, alpha=0.5, worker_pull="nearest")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- synchronous start


def test_schedule_with_a_synchronous_start() -> None:
    schedule = ExchangeSchedule(tau=3, sync_steps=5)
    assert [t for t in range(20) if schedule.synchronous(t)] == [0, 1, 2, 3, 4]
    assert [t for t in range(20) if schedule.due(t)] == [8, 11, 14, 17]
    assert [schedule.exchange_index(t) for t in (0, 5, 7, 8, 10, 11, 17)] == [0, 0, 0, 1, 1, 2, 4]
    assert "sync_steps=5" in repr(schedule)
    with pytest.raises(ValueError, match="sync_steps=2 cannot be combined with warmup_steps=4"):
        ExchangeSchedule(tau=3, warmup_steps=4, warmup_tau=1, sync_steps=2)


def test_synchronous_steps_must_average_and_only_they_may() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    avg = ElasticAverager([("p", p)], tau=2, alpha=0.5, sync_steps=2)
    assert avg.synchronous and avg.bytes_per_sync_step == 0  # one worker sends nothing
    with pytest.raises(RuntimeError, match=r"optimizer step 0 belongs to the synchronous start .* without "
                                           r"average_gradients\(\)"), avg.step():
        pass
    assert avg.clock == 0
    with avg.step():
        p.grad = torch.full((4,), 2.0)
        avg.average_gradients([p])
        avg.average_gradients([p])  # clipping first, then the update: a second call does nothing
        with torch.no_grad():
            p.sub_(p.grad)
    assert torch.equal(avg.center_values()[0], p.detach())  # the center follows the worker
    avg.set_sync_steps(1)  # the clock (1) is past it now
    assert not avg.synchronous
    with pytest.raises(RuntimeError, match=r"average_gradients\(\) was called outside a step of the synchronous"), \
            avg.step():
        avg.average_gradients([p])


def test_bytes_of_both_phases_are_a_function_of_the_clock() -> None:
    avg = ElasticAverager([("x", torch.zeros(3))], tau=4, alpha=0.5, sync_steps=6)
    avg._average.world_size = 2  # as if a peer were there; only the count is read
    per_step = avg.bytes_per_sync_step
    assert per_step == 3 * 4  # the float buffer (no parameters here)
    assert avg.bytes_sent(0) == (0, 0)
    assert avg.bytes_sent(6) == (6 * per_step, 0)
    assert avg.bytes_sent(10) == (6 * per_step, 0)  # step 10 is the first exchange, not yet taken
    assert avg.bytes_sent(11) == (6 * per_step, avg.bytes_per_exchange)
    assert avg.bytes_sent(19) == (6 * per_step, 3 * avg.bytes_per_exchange)  # exchanges at 10, 14, 18


# ---------------------------------------------------------------------------------------------- stability


def _period_map(beta: float, mu: float, nesterov: bool, eta_h: float, tau: int) -> np.ndarray:
    """One period of the reset rule on f(x) = h·x²/2 (identical workers: x, center c, velocity v), as a matrix:
    the exchange at the period's first step, then τ − 1 local gradient steps."""
    def period(state: np.ndarray) -> np.ndarray:
        x, c, v = state
        d = x - c
        x_new = x - eta_h * x
        s = beta * d
        v = mu * v + s
        c_new = c + (mu * v + s if nesterov else v)
        x = c_new + (x_new - x)
        for _ in range(tau - 1):
            x = x - eta_h * x
        return np.array([x, c_new, v])

    return np.stack([period(e) for e in np.eye(3)], axis=1)


def _radius(*args: object) -> float:
    return float(max(abs(np.linalg.eigvals(_period_map(*args)))))  # type: ignore[arg-type]


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mu", [0.0, 0.2, 0.5, 0.9])
def test_reset_bound_is_the_spectral_radius_crossing_one_when_local_steps_reach_the_minimum(mu: float,
                                                                                        nesterov: bool) -> None:
    """η·h = 1 with τ ≥ 2: the local steps reach the minimum each period (c = 1), the bound's assumption; stable
    just below the bound, unstable just above it."""
    bound = reset_beta_bound(mu, nesterov)
    for tau in (2, 3, 16):
        assert _radius(0.98 * bound, mu, nesterov, 1.0, tau) < 1.0
        assert _radius(1.02 * bound, mu, nesterov, 1.0, tau) > 1.0


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("mu", [0.0, 0.2, 0.5])
def test_reset_bound_holds_for_partial_local_progress_with_long_periods(mu: float, nesterov: bool) -> None:
    """0 < c < 1 (η·h ≤ 0.5 over τ ≥ 2 steps): stable everywhere below the bound."""
    bound = reset_beta_bound(mu, nesterov)
    for eta_h in (0.01, 0.1, 0.5):
        for tau in (2, 3, 16):
            for fraction in (0.1, 0.5, 0.97):
                assert _radius(fraction * bound, mu, nesterov, eta_h, tau) < 1.0, (eta_h, tau, fraction)


def test_reset_bound_is_necessary_not_sufficient_with_momentum_and_short_periods() -> None:
    """τ = 1 and heavy ball μ = 0.9: the outer momentum multiplies the local step by about β/(1 − μ), so η·h = 0.5
    diverges at half the bound (docs/family.md says so); without momentum τ = 1 is stable for any β < 2."""
    assert _radius(0.5 * reset_beta_bound(0.9, False), 0.9, False, 0.5, 1) > 1.0
    for beta in (0.5, 1.0, 1.9):
        assert _radius(beta, 0.0, False, 0.5, 1) < 1.0


def test_reset_beta_check() -> None:
    assert reset_beta_bound(0.0, False) == 2.0
    assert math.isclose(reset_beta_bound(0.9, True), 2 * 1.9 / 2.8)
    check_reset_beta(1.9, 0.0, False)
    check_reset_beta(0.7, 0.9, True)  # DiLoCo
    with pytest.raises(ValueError, match=r"beta = p\*alpha = 2 .*no center momentum.*unless 0 < beta < 2 = 2"):
        check_reset_beta(2.0, 0.0, False)
    with pytest.raises(ValueError, match=r"beta = p\*alpha = 1.4 .*Nesterov.*2\*\(1 \+ mu\)/\(1 \+ 2\*mu\) = 1.35714"):
        check_reset_beta(1.4, 0.9, True)
