"""Center momentum and the exchange schedule: against an independent replay (momentum_replay.py), bit-identity of
μ = 0 with the paper's rule, exact resume, the stability bounds, and refusals."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from benchmarks import accuracy
from helpers.asserts import assert_close
from helpers.instruments import count_collectives
from helpers.launch import SEED, fit_fork
from helpers.momentum_replay import replay_center_momentum
from helpers.toy import NaNLossRegressor, ToyRegressor, make_dataset, twins
from lightning_easgd import AsyncEASGDStrategy, EASGDStrategy, ElasticDistanceMonitor
from lightning_easgd.core import ElasticAverager, ExchangeSchedule
from lightning_easgd.core.center_momentum import (
    CenterMomentum,
    center_momentum_bound,
    check_center_momentum,
)

REPO = Path(__file__).resolve().parents[2]

ATOL = 1e-10  # float64 model: the only differences are summation order in the all-reduce


class VelocityRecorder(L.Callback):
    """Saves every rank's center velocity and the steps its exchanges happened at (from the statistics)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.steps: list[int] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.averager.track_distances()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.steps += [s.step for s in trainer.strategy.averager.pop_stats()]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        velocity = trainer.strategy.averager.center_velocity()
        torch.save({"steps": self.steps, "velocity": None if velocity is None else
                    {k: v.clone() for k, v in velocity.items()}}, self.out / f"velocity{trainer.global_rank}.pt")


def _velocity(out: Path, rank: int) -> dict[str, Any]:
    return torch.load(out / f"velocity{rank}.pt", weights_only=False)


def _exchange_steps(records: list[dict[str, Any]], rank: int, buckets: int) -> list[int]:
    """Optimizer steps whose batch communicated, from the counted collectives (one all-reduce per bucket + stats)."""
    steps = []
    for step, calls in records[rank]["collectives"]:
        if calls:
            assert calls == {"all_reduce": buckets + 1}, f"rank {rank} step {step - 1}: {calls}"
            steps.append(step - 1)  # the batch ran optimizer step t, then global_step became t + 1
    return steps


# ---------------------------------------------------------------------------------------------- against the replay


@pytest.mark.parametrize(
    ("p", "tau", "optimizer", "momentum", "nesterov"),
    [
        (2, 1, "sgd", 0.5, False),
        (2, 3, "nesterov", 0.9, True),
        (3, 1, "nesterov", 0.9, False),
        (3, 3, "sgd", 0.5, True),
    ],
)
def test_matches_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p: int, tau: int, optimizer: str,
                        momentum: float, nesterov: bool) -> None:
    workers = {"sgd": {}, "nesterov": {"momentum": 0.9, "nesterov": True}}[optimizer]
    module, init = twins(ToyRegressor, 0, lr=0.1, weight_decay=1e-3, **workers)
    dataset = make_dataset(48)
    count_collectives(monkeypatch)
    _, records = fit_fork(module, dataset, tmp_path, p=p, epochs=2, batch_size=4,
                          callbacks=[VelocityRecorder(tmp_path)],
                          strategy=EASGDStrategy(tau=tau, center_momentum=momentum, center_nesterov=nesterov,
                                                 start_method="fork"))
    expected = replay_center_momentum(init, dataset, p=p, alpha=0.9 / p, momentum=momentum, nesterov=nesterov,
                                      due=lambda t: t > 0 and t % tau == 0, epochs=2, batch_size=4, seed=SEED)
    for rank, rec in enumerate(records):
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank} local weights")
        assert_close(rec["center"], expected.center, ATOL, f"rank {rank} center")
        velocity = _velocity(tmp_path, rank)["velocity"]
        assert_close(velocity, expected.velocity, ATOL, f"rank {rank} center velocity")
        for name, value in velocity.items():  # v is bit-identical on every rank, like the center
            assert torch.equal(value, _velocity(tmp_path, 0)["velocity"][name])
            assert torch.equal(rec["center"][name], records[0]["center"][name])
        for epoch, seen in enumerate(rec["val_seen"]):
            assert_close(seen, expected.epoch_centers[epoch], ATOL, f"rank {rank} weights seen by validation")
        assert _exchange_steps(records, rank, rec["buckets"]) == expected.exchange_steps
    # The momentum really acted: the center is not where the paper's rule would have put it.
    plain = replay_center_momentum(init, dataset, p=p, alpha=0.9 / p, momentum=0.0, nesterov=False,
                                   due=lambda t: t > 0 and t % tau == 0, epochs=2, batch_size=4, seed=SEED)
    assert (records[0]["center"]["net.0.weight"] - plain.center["net.0.weight"]).abs().max() > 1e-4


def test_warmup_schedule_matches_replay_and_monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """τ₀ = 2 for the first 7 steps, then τ = 4: exchanges at 2, 4, 6, then 8, 12, 16, 20 (24 steps); the monitor's
    log_every_n_exchanges counts exchanges, not t/τ."""
    module, init = twins(ToyRegressor, 1, lr=0.1, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    count_collectives(monkeypatch)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    _, records = fit_fork(module, dataset, tmp_path, p=2, epochs=2, batch_size=2, logger=logger,
                          callbacks=[ElasticDistanceMonitor(log_every_n_exchanges=2)],
                          strategy=EASGDStrategy(tau=4, warmup_steps=7, warmup_tau=2, center_momentum=0.5,
                                                 start_method="fork"))
    steps = [2, 4, 6, 8, 12, 16, 20]
    expected = replay_center_momentum(init, dataset, p=2, alpha=0.45, momentum=0.5, nesterov=False,
                                      due=lambda t: t in steps, epochs=2, batch_size=2, seed=SEED)
    assert expected.exchange_steps == steps
    for rank, rec in enumerate(records):
        assert _exchange_steps(records, rank, rec["buckets"]) == steps
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank} local weights")
        assert_close(rec["center"], expected.center, ATOL, f"rank {rank} center")
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        logged = sorted({int(row["step"]) for row in csv.DictReader(f) if row.get("easgd/distance_mean")})
    assert logged == steps[1::2]  # exchanges number 2, 4, 6


def test_reset_policy_with_momentum(tmp_path: Path, messages: Any) -> None:
    """A diverged worker's difference stays out of s (so out of v); it restarts from the new center."""
    module, init = twins(NaNLossRegressor, 40, nan_rank=1, nan_step=3, momentum=0.9)
    dataset = make_dataset(48)
    _, records = fit_fork(module, dataset, tmp_path, p=2, epochs=1, batch_size=4,
                          callbacks=[VelocityRecorder(tmp_path)],
                          strategy=EASGDStrategy(tau=2, on_nonfinite="reset", center_momentum=0.5,
                                                 center_nesterov=True, start_method="fork"))
    assert "worker(s) 1 had non-finite weights at optimizer step 4" in messages()
    expected = replay_center_momentum(init, dataset, p=2, alpha=0.45, momentum=0.5, nesterov=True,
                                      due=lambda t: t > 0 and t % 2 == 0, epochs=1, batch_size=4, seed=SEED)
    for rank, rec in enumerate(records):
        assert all(v.isfinite().all() for v in rec["local"].values())
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank}")
        assert_close(rec["center"], expected.center, ATOL, "center")
        assert_close(_velocity(tmp_path, rank)["velocity"], expected.velocity, ATOL, "velocity")


# ---------------------------------------------------------------------------------------------- μ = 0 is the paper


def test_zero_momentum_is_bit_identical_to_the_plain_rule() -> None:
    """μ = 0 keeps the paper's code path (no velocity), so a run is bit for bit the plain one."""
    torch.manual_seed(2)
    init = [torch.randn(5, 3, dtype=torch.float32), torch.randn(7, dtype=torch.float32)]
    runs = {}
    for key, kwargs in {"plain": {}, "zero": {"center_momentum": 0.0, "center_nesterov": True},
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


def test_zero_momentum_strategy_run_is_bit_identical(tmp_path: Path) -> None:
    dataset = make_dataset(48)
    runs = []
    for name, kwargs in (("plain", {}), ("zero", {"center_momentum": 0.0, "center_nesterov": True})):
        module, _ = twins(ToyRegressor, 6, lr=0.1, momentum=0.9, nesterov=True)
        _, records = fit_fork(module, dataset, tmp_path / name, p=2, epochs=1, batch_size=4,
                              strategy=EASGDStrategy(tau=2, start_method="fork", **kwargs))
        runs.append(records)
    for plain, zero in zip(*runs):
        for key in ("local", "center"):
            for name, value in plain[key].items():
                assert torch.equal(value, zero[key][name]), f"{key} {name}"


# ---------------------------------------------------------------------------------------------- checkpoints


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



def _checkpointing(tmp_path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, save_last=True)


def _strategy(**kwargs: Any) -> EASGDStrategy:
    # τ₀ = 1 until step 8, then τ = 3: the resume at step 6 falls inside the warm-up.
    return EASGDStrategy(tau=3, warmup_steps=8, warmup_tau=1, start_method="fork", **kwargs)


def test_resume_with_momentum_and_warmup_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 epochs == 1 epoch, resume, 1 more: v comes back from the checkpoint (not zero) and the schedule resumes on
    the steps it names."""
    dataset = make_dataset(48)
    torch.manual_seed(11)
    init = ToyRegressor(momentum=0.9, nesterov=True).state_dict()

    def model() -> ToyRegressor:
        m = ToyRegressor(momentum=0.9, nesterov=True)
        m.load_state_dict(init)
        return m

    count_collectives(monkeypatch)
    _, full = fit_fork(model(), dataset, tmp_path / "full", p=2, epochs=2, batch_size=4,
                       strategy=_strategy(center_momentum=0.5, center_nesterov=True))
    fit_fork(model(), dataset, tmp_path / "first", p=2, epochs=1, batch_size=4, enable_checkpointing=True,
             callbacks=[_checkpointing(tmp_path / "first")], strategy=_strategy(center_momentum=0.5,
                                                                                center_nesterov=True))
    path = tmp_path / "first" / "ckpt" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)  # plain tensors and Python types only
    saved = ckpt["easgd"]["center_velocity"]
    assert ckpt["easgd"]["clock"] == 6
    assert max(v.abs().max().item() for v in saved.values()) > 1e-3, "a zero velocity would prove nothing"
    expected = replay_center_momentum(model(), dataset, p=2, alpha=0.45, momentum=0.5, nesterov=True,
                                      due=lambda t: 0 < t < 8 or (t >= 8 and t % 3 == 0), epochs=2, batch_size=4,
                                      seed=SEED)
    assert_close(saved, expected.epoch_velocities[0], ATOL, "saved center velocity")
    _, second = fit_fork(ToyRegressor(momentum=0.9, nesterov=True), dataset, tmp_path / "second", p=2, epochs=2,
                         batch_size=4, ckpt_path=str(path), callbacks=[VelocityRecorder(tmp_path / "second")],
                         strategy=_strategy(center_momentum=0.5, center_nesterov=True))
    for rank in range(2):
        assert_close(second[rank]["local"], full[rank]["local"], 1e-12, f"worker {rank} after resume")
        assert_close(second[rank]["center"], full[rank]["center"], 1e-12, "center after resume")
        # The resumed run exchanges exactly at the schedule's steps 6, 7 (warm-up) and 9 (tau = 3), and the
        # uninterrupted one at 1-7 and 9.
        assert _exchange_steps(second, rank, second[rank]["buckets"]) == [6, 7, 9]
        assert _exchange_steps(full, rank, full[rank]["buckets"]) == [1, 2, 3, 4, 5, 6, 7, 9]
        assert _velocity(tmp_path / "second", rank)["steps"] == [6, 7, 9]
        assert_close(second[rank]["center"], expected.center, ATOL, "center against the replay")
        assert_close(_velocity(tmp_path / "second", rank)["velocity"], expected.velocity, ATOL, "velocity")


def test_resume_across_momentum_settings(tmp_path: Path, messages: Any) -> None:
    """A checkpoint without a velocity (plain EASGD, or written before center momentum existed) starts v at zero; a
    velocity the resumed run has no use for is dropped, with a warning."""
    dataset = make_dataset(48)
    torch.manual_seed(12)
    fit_fork(ToyRegressor(), dataset, tmp_path / "plain", p=2, epochs=1, batch_size=4, enable_checkpointing=True,
             callbacks=[_checkpointing(tmp_path / "plain")], strategy=EASGDStrategy(tau=5, start_method="fork"))
    plain = tmp_path / "plain" / "ckpt" / "last.ckpt"
    ckpt = torch.load(plain, weights_only=True)
    assert "center_velocity" not in ckpt["easgd"] and ckpt["easgd"]["clock"] == 6
    # One exchange after the resume (steps 6-11, tau = 5): with v = 0 before it, v = s and the center moved by v.
    _, records = fit_fork(ToyRegressor(), dataset, tmp_path / "resumed", p=2, epochs=2, batch_size=4,
                          ckpt_path=str(plain), callbacks=[VelocityRecorder(tmp_path / "resumed")],
                          strategy=EASGDStrategy(tau=5, center_momentum=0.9, start_method="fork"))
    for rank, rec in enumerate(records):
        recorded = _velocity(tmp_path / "resumed", rank)
        assert recorded["steps"] == [10]
        moved = {k: rec["center"][k] - ckpt["state_dict"][k] for k in recorded["velocity"]}
        assert_close(recorded["velocity"], moved, 1e-12, f"rank {rank}: v after one exchange from v = 0")

    fit_fork(ToyRegressor(), dataset, tmp_path / "momentum", p=2, epochs=1, batch_size=4, enable_checkpointing=True,
             callbacks=[_checkpointing(tmp_path / "momentum")],
             strategy=EASGDStrategy(tau=2, center_momentum=0.5, start_method="fork"))
    messages()
    fit_fork(ToyRegressor(), dataset, tmp_path / "dropped", p=2, epochs=2, batch_size=4,
             ckpt_path=str(tmp_path / "momentum" / "ckpt" / "last.ckpt"),
             strategy=EASGDStrategy(tau=2, start_method="fork"))
    assert "the checkpoint holds a center-momentum velocity, but this run has center_momentum=0" in messages()


# ---------------------------------------------------------------------------------------------- stability


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


def test_strategy_refuses_an_unstable_center_and_warns_on_overshoot(tmp_path: Path, messages: Any) -> None:
    dataset = make_dataset(16)
    # Nesterov with mu = 0.9 is stable only for beta < 3.8/2.8 = 1.357; alpha = 0.75 with 2 workers is beta = 1.5.
    with pytest.raises(Exception, match=r"beta = p\*alpha = 1.5 with center_momentum=0.9 \(Nesterov\) is unstable"):
        fit_fork(ToyRegressor(), dataset, tmp_path / "a", p=2, epochs=1, batch_size=4,
                 strategy=EASGDStrategy(alpha=0.75, center_momentum=0.9, center_nesterov=True, start_method="fork"))
    messages()
    # Heavy ball overshoots for beta > 1 + mu: beta = 1.3 warns with mu = 0.2 ...
    fit_fork(ToyRegressor(), dataset, tmp_path / "b", p=2, epochs=1, batch_size=4,
             strategy=EASGDStrategy(alpha=0.65, center_momentum=0.2, start_method="fork"))
    assert "beta = p*alpha = 1.3 with center_momentum=0.2 (heavy-ball) exceeds 1 + mu = 1.2" in messages()
    # ... and not with mu = 0.5, although the paper's rule alone (beta > 1) would.
    fit_fork(ToyRegressor(), dataset, tmp_path / "c", p=2, epochs=1, batch_size=4,
             strategy=EASGDStrategy(alpha=0.65, center_momentum=0.5, start_method="fork"))
    assert "overshoot" not in messages()


# ---------------------------------------------------------------------------------------------- the schedule


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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 0}, r"tau=0 is invalid"),
        ({"tau": 4, "warmup_steps": -1}, r"warmup_steps=-1 is invalid: it must be an integer >= 0"),
        ({"tau": 4, "warmup_steps": 2.5}, r"warmup_steps=2.5 is invalid"),
        ({"tau": 4, "warmup_steps": True}, r"warmup_steps=True is invalid"),
        ({"tau": 4, "warmup_steps": 10, "warmup_tau": 0}, r"warmup_tau=0 is invalid: .* integer in \[1, tau=4\]"),
        ({"tau": 4, "warmup_steps": 10, "warmup_tau": 5}, r"warmup_tau=5 is invalid: .* \[1, tau=4\]"),
        ({"tau": 4, "warmup_steps": 10, "warmup_tau": "1"}, r"warmup_tau='1' is invalid"),
        ({"center_momentum": 1.0}, r"center_momentum=1.0 is invalid: it must lie in \[0, 1\)"),
        ({"center_momentum": -0.1}, r"center_momentum=-0.1 is invalid: it must lie in \[0, 1\)"),
        ({"center_momentum": "0.5"}, r"center_momentum='0.5' is invalid: it must be a real number in \[0, 1\)"),
        ({"center_momentum": True}, r"center_momentum=True is invalid"),
        ({"center_momentum": math.nan}, r"center_momentum=nan is invalid"),
        ({"center_momentum": 0.5, "center_nesterov": "yes"}, r"center_nesterov='yes' is invalid: it must be True or"),
    ],
)
def test_bad_values_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EASGDStrategy(**kwargs)
    core = {k: v for k, v in kwargs.items() if k != "tau"}
    with pytest.raises(ValueError, match=match):
        ElasticAverager([("w", torch.zeros(3))], tau=kwargs.get("tau", 4), alpha=0.5, **core)


def test_async_refuses_center_momentum_with_a_reason() -> None:
    with pytest.raises(ValueError, match=r"AsyncEASGDStrategy does not accept center_momentum=0.5: the asynchronous "
                                         r"center is updated by each worker's exchange separately"):
        AsyncEASGDStrategy(center_momentum=0.5)
    assert AsyncEASGDStrategy(center_momentum=0.0).center_momentum == 0.0


def test_async_round_robin_follows_the_warmup_schedule(tmp_path: Path) -> None:
    dataset = make_dataset(48)
    torch.manual_seed(5)
    fit_fork(ToyRegressor(), dataset, tmp_path, p=2, epochs=2, batch_size=4, callbacks=[VelocityRecorder(tmp_path)],
             strategy=AsyncEASGDStrategy(tau=4, warmup_steps=5, warmup_tau=2, order="round_robin",
                                         start_method="fork"))
    for rank in range(2):
        assert _velocity(tmp_path, rank) == {"steps": [2, 4, 8], "velocity": None}


# ---------------------------------------------------------------------------------------------- Hydra and the suite


def _compose(overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("cifar10", overrides=overrides)


@pytest.mark.parametrize(
    ("text", "fields", "strategy", "target"),
    [
        ("eamsgd:16:cm0.5", {"tau": 16, "center_momentum": 0.5},
         {"tau": 16, "center_momentum": 0.5, "center_nesterov": False, "warmup_steps": 0}, EASGDStrategy),
        ("eamsgd:16:cn0.9:warm500:lr0.01:seed1",
         {"tau": 16, "center_momentum": 0.9, "center_nesterov": True, "warmup_steps": 500, "lr": 0.01, "seed": 1},
         {"tau": 16, "center_momentum": 0.9, "center_nesterov": True, "warmup_steps": 500, "warmup_tau": 1},
         EASGDStrategy),
        ("easgd:16:lr0.05", {"tau": 16, "lr": 0.05}, {"tau": 16, "center_momentum": 0.0}, EASGDStrategy),
        ("eamsgd_async:8:warm100", {"tau": 8, "warmup_steps": 100}, {"tau": 8, "warmup_steps": 100},
         AsyncEASGDStrategy),
    ],
)
def test_suite_methods_compose_and_instantiate(text: str, fields: dict[str, Any], strategy: dict[str, Any],
                                               target: type) -> None:
    method = accuracy.Method.parse(text)
    assert method == accuracy.Method(method.name, **fields)
    assert method.label == text and accuracy.Method.parse(method.label) == method
    command = accuracy.recipe_command(method, processes=4, epochs=1, evals_per_epoch=1, batch_size=64,
                                      data_dir=Path("/data/cifar10"), run_dir=Path("/tmp/run"), extra=[])
    cfg = _compose([arg for arg in command[2:] if not arg.startswith("hydra.")])
    assert cfg.optimizer.lr == fields.get("lr", 0.05 if method.name == "easgd" else 0.01)
    assert cfg.seed == fields.get("seed", 0)
    built = instantiate(cfg.strategy)
    assert isinstance(built, target)
    for key, value in strategy.items():
        assert getattr(built, key) == value, key


def test_ddp_and_msgd_take_the_shared_options() -> None:
    assert accuracy.Method.parse("ddp:lr0.01:seed1").overrides()[-2:] == ["optimizer.lr=0.01", "seed=1"]
    assert accuracy.Method.parse("msgd:lr0.0005").label == "msgd:lr0.0005"


@pytest.mark.parametrize(
    "text",
    ["eamsgd:16:cm1", "eamsgd:16:cm0", "eamsgd_async:8:cm0.5", "ddp:16", "ddp:cm0.5", "eamsgd:cm0.5",
     "eamsgd:16:cm0.5:cn0.3", "average:16:warm5", "eamsgd:16:warm0", "eamsgd:16:lrx", "eamsgd:16:lr0",
     "eamsgd:16:foo", "eamsgd:16:seed-1", "eamsgd:16:lr0.01:lr0.02", "eamsgd:16:"],
)
def test_bad_options_are_refused_with_what_is_allowed(text: str) -> None:
    with pytest.raises(ValueError, match=r"method=.* is invalid: use msgd, ddp, or average:TAU.* options :OPTION.*"
                                         r"lrETA, seedN, cmMU or cnMU \(easgd, eamsgd, localsgd, slowmo, diloco; "
                                         r"0 < MU < 1\), warmW"):
        accuracy.Method.parse(text)


def _row(method: str, error: float, at_budget: float, sent_mb: float) -> dict[str, Any]:
    return {"rate_mbit": "100", "method": method, "epochs": 8, "test_error_after_epochs": error,
            "error_at_budget": at_budget, "sent_mb_per_worker": sent_mb}


def test_claims_check_the_issue_targets_on_the_whole_family() -> None:
    rows = [_row("ddp", 41.4, 60.0, 1000.0), _row("average:16", 43.5, 50.0, 60.0), _row("eamsgd:16", 44.2, 52.0, 60.0),
            _row("eamsgd:16:cm0.5", 42.0, 48.0, 60.0), _row("eamsgd:4:cm0.5", 41.0, 47.0, 240.0)]
    lines = accuracy.claims(rows)
    # The presets' claim sees eamsgd:16 only (not its momentum variant under the same tau).
    assert "EAMSGD τ=16 52.00% vs best baseline average:16 50.00%" in lines[0]
    assert ("best EASGD-family setting with τ >= 16 within 1 point of DDP after 8 epochs, sending >= 16x fewer "
            "bytes: holds (eamsgd:16:cm0.5 42.00% vs ddp 41.40%, +0.60 points, 16.7x fewer bytes)") in lines[1]
    assert ("beats DDP and periodic averaging at the budget: holds (eamsgd:16:cm0.5 48.00% vs average:16 50.00%)"
            in lines[2])
    rows[3] = _row("eamsgd:16:cm0.5", 42.5, 51.0, 60.0)
    lines = accuracy.claims(rows)
    assert "does not hold (eamsgd:16:cm0.5 42.50% vs ddp 41.40%, +1.10 points" in lines[1]
    assert "at the budget: does not hold (eamsgd:16:cm0.5 51.00% vs average:16 50.00%)" in lines[2]
