"""Center momentum and the exchange schedule through the Trainer: against an independent replay
(momentum_replay.py), bit-identity of μ = 0 with the paper's rule, exact resume, the stability refusal at setup, and
refusals. The core-only tests are in tests/core/test_center_momentum_core.py, the accuracy suite's in
tests/benchmarks/test_benchmarks_suite_methods.py."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from helpers.asserts import assert_close
from helpers.instruments import count_collectives
from helpers.launch import SEED, fit_fork
from helpers.momentum_replay import every, replay_center_momentum
from helpers.toy import NaNLossRegressor, ToyRegressor, make_dataset, twins
from lightning_easgd import AsyncEASGDStrategy, EASGDFabricStrategy, EASGDStrategy, ElasticDistanceMonitor
from lightning_easgd.core import ElasticAverager

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
                                      due=every(tau), epochs=2, batch_size=4, seed=SEED)
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
                                   due=every(tau), epochs=2, batch_size=4, seed=SEED)
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
                                      due=every(2), epochs=1, batch_size=4, seed=SEED)
    for rank, rec in enumerate(records):
        assert all(v.isfinite().all() for v in rec["local"].values())
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank}")
        assert_close(rec["center"], expected.center, ATOL, "center")
        assert_close(_velocity(tmp_path, rank)["velocity"], expected.velocity, ATOL, "velocity")


# ---------------------------------------------------------------------------------------------- μ = 0 is the paper


def test_zero_momentum_strategy_run_is_bit_identical(tmp_path: Path) -> None:
    dataset = make_dataset(48)
    runs = []
    for name, kwargs in (("plain", {}), ("zero", {"center_momentum": 0.0})):
        module, _ = twins(ToyRegressor, 6, lr=0.1, momentum=0.9, nesterov=True)
        _, records = fit_fork(module, dataset, tmp_path / name, p=2, epochs=1, batch_size=4,
                              strategy=EASGDStrategy(tau=2, start_method="fork", **kwargs))
        runs.append(records)
    for plain, zero in zip(*runs):
        for key in ("local", "center"):
            for name, value in plain[key].items():
                assert torch.equal(value, zero[key][name]), f"{key} {name}"


@pytest.mark.parametrize("owner", [EASGDStrategy, EASGDFabricStrategy, AsyncEASGDStrategy])
def test_nesterov_without_center_momentum_is_refused(owner: type) -> None:
    """``center_nesterov=True`` with μ = 0 would change nothing; like ``torch.optim.SGD(nesterov=True)`` without
    momentum it is refused rather than accepted and ignored, from every entry point with one message."""
    with pytest.raises(ValueError, match=r"^center_nesterov=True is invalid with center_momentum=0.0: the Nesterov "
                                         r"form needs a center momentum in \(0, 1\); set center_momentum or leave "
                                         r"center_nesterov=False$"):
        owner(center_nesterov=True)


# ---------------------------------------------------------------------------------------------- checkpoints


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
