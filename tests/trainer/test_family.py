"""The elastic family in the Trainer strategy: the reset rule (local SGD, SlowMo, DiLoCo) and the synchronous start
against an independent replay (helpers/momentum_replay.py), the hand-over, resume in and across both phases, the
bytes of both phases, and refusals."""

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
from lightning.pytorch.strategies import DDPStrategy

from helpers.asserts import assert_close, assert_matches_replay
from helpers.instruments import count_collectives
from helpers.launch import SEED, fit_fork, loaders
from helpers.momentum_replay import every, replay_center_momentum
from helpers.toy import ToyRegressor, TwoOptimizerRegressor, make_dataset, twins
from lightning_easgd import AsyncEASGDStrategy, EASGDStrategy, ElasticDistanceMonitor

ATOL = 1e-10  # float64 model: the only differences are summation order in the all-reduces
WORKERS = {"sgd": {}, "nesterov": {"momentum": 0.9, "nesterov": True}}
NUMEL = 6 * 8 + 8 + 8 + 1  # ToyRegressor's parameters


def _communicating_steps(record: dict[str, Any]) -> dict[int, dict[str, int]]:
    """Optimizer step t -> the collectives its batch ran (the batch ran step t, then global_step became t + 1)."""
    return {step - 1: calls for step, calls in record["collectives"] if calls}


class HandOver(L.Callback):
    """Keeps every rank's local weights and center right after optimizer step ``step`` (the last synchronous one)."""

    def __init__(self, out: Path, step: int) -> None:
        self.out, self.step = out, step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step + 1:
            averager = trainer.strategy.averager
            torch.save({"local": {k: v.clone() for k, v in pl_module.state_dict().items()},
                        "center": {n: v.clone() for n, v in zip(averager.names, averager.center_values())},
                        "bytes": averager.bytes_sent()},
                       self.out / f"handover{trainer.global_rank}.pt")


# ---------------------------------------------------------------------------------------------- the reset rule


@pytest.mark.parametrize(
    ("p", "tau", "optimizer", "beta", "momentum", "nesterov"),
    [
        (2, 1, "sgd", 1.0, 0.0, False),  # periodic averaging at every step
        (3, 3, "nesterov", 1.0, 0.0, False),  # local SGD with Nesterov workers
        (2, 3, "sgd", 1.0, 0.5, False),  # SlowMo
        (3, 1, "nesterov", 0.7, 0.9, True),  # DiLoCo
        (3, 3, "sgd", 1.5, 0.0, False),  # an outer learning rate above 1
    ],
)
def test_reset_matches_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p: int, tau: int, optimizer: str,
                              beta: float, momentum: float, nesterov: bool) -> None:
    module, init = twins(ToyRegressor, 3, lr=0.1, weight_decay=1e-3, **WORKERS[optimizer])
    dataset = make_dataset(48)
    count_collectives(monkeypatch)
    _, records = fit_fork(module, dataset, tmp_path, p=p, epochs=2, batch_size=4,
                          strategy=EASGDStrategy(tau=tau, beta=beta, worker_pull="reset", center_momentum=momentum,
                                                 center_nesterov=nesterov, start_method="fork"))
    due = every(tau)
    expected = replay_center_momentum(init, dataset, p=p, alpha=beta / p, momentum=momentum, nesterov=nesterov,
                                      due=due, epochs=2, batch_size=4, seed=SEED, reset=True)
    assert_matches_replay(records, expected, ATOL)
    for rank, rec in enumerate(records):
        for epoch, seen in enumerate(rec["val_seen"]):
            assert_close(seen, expected.epoch_centers[epoch], ATOL, f"rank {rank} weights seen by validation")
        assert sorted(_communicating_steps(rec)) == expected.exchange_steps
    # The reset rule really differs from the elastic pull with the same center update.
    elastic = replay_center_momentum(init, dataset, p=p, alpha=beta / p, momentum=momentum, nesterov=nesterov,
                                     due=due, epochs=2, batch_size=4, seed=SEED)
    assert (records[0]["local"]["net.0.weight"] - elastic.workers[0]["net.0.weight"]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------- synchronous start


@pytest.mark.parametrize(("p", "tau", "sync", "optimizer", "batchnorm", "pull"), [
    (2, 3, 5, "sgd", True, "elastic"),
    (3, 2, 4, "nesterov", False, "reset"),
])
def test_sync_start_matches_replay_and_hands_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p: int, tau: int,
                                                  sync: int, optimizer: str, batchnorm: bool, pull: str) -> None:
    module, init = twins(ToyRegressor, 4, lr=0.1, weight_decay=1e-3, batchnorm=batchnorm, **WORKERS[optimizer])
    dataset = make_dataset(48)
    count_collectives(monkeypatch)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    _, records = fit_fork(module, dataset, tmp_path, p=p, epochs=2, batch_size=4, logger=logger,
                          callbacks=[HandOver(tmp_path, sync - 1), ElasticDistanceMonitor()],
                          strategy=EASGDStrategy(tau=tau, sync_steps=sync, worker_pull=pull, start_method="fork"))
    due = every(tau, after=sync)
    expected = replay_center_momentum(init, dataset, p=p, alpha=0.9 / p, momentum=0.0, nesterov=False, due=due,
                                      epochs=2, batch_size=4, seed=SEED, reset=pull == "reset", sync_steps=sync)
    assert_matches_replay(records, expected, ATOL)
    steps = 2 * 48 // (4 * p)
    exchanges = [t for t in range(steps) if due(t)]
    assert expected.exchange_steps == exchanges and exchanges[0] == sync + tau
    for rank, rec in enumerate(records):
        calls = _communicating_steps(rec)
        # Steps 0..N−1: one all-reduce of the gradients and buffers (all float64); then only the exchanges
        # (one bucket and the statistics).
        assert {t: c for t, c in calls.items() if t < sync} == {t: {"all_reduce": 1} for t in range(sync)}
        assert {t: c for t, c in calls.items() if t >= sync} == {t: {"all_reduce": 2} for t in exchanges}
        # At the hand-over every worker and the center are one and the same model.
        handover = torch.load(tmp_path / f"handover{rank}.pt", weights_only=False)
        for name, value in handover["center"].items():
            assert torch.equal(value, handover["local"][name]), name
            assert torch.equal(value, torch.load(tmp_path / "handover0.pt", weights_only=False)["local"][name])
        # Bytes of both phases: N steps of the whole model (gradients and buffers), no exchange yet.
        assert handover["bytes"] == (sync * numel_with(batchnorm) * 8, 0)
    # The monitor logs the exchanges after the hand-over only, numbered from it.
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("easgd/distance_mean")]
    assert [int(row["step"]) for row in rows] == exchanges
    assert float(rows[0]["easgd/bytes_sync"]) == sync * numel_with(batchnorm) * 8
    assert [float(row["easgd/bytes_exchanges"]) for row in rows] == [
        (i + 1) * records[0]["bytes_per_exchange"] for i in range(len(rows))]


def test_sync_start_with_worker_groups_matches_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """2 workers of 2 ranks: DDP averages inside each worker, the synchronous start all-reduces slice j of the
    gradients across the workers' column j and gathers the slices inside the worker, then the reset rule exchanges
    the slices of d_i."""
    module, init = twins(ToyRegressor, 8, lr=0.1, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    count_collectives(monkeypatch)
    _, records = fit_fork(module, dataset, tmp_path, p=4, epochs=2, batch_size=2,
                          callbacks=[HandOver(tmp_path, 3)],
                          strategy=EASGDStrategy(tau=2, sync_steps=4, worker_pull="reset", beta=1.0,
                                                 ranks_per_worker=2, start_method="fork"))
    due = every(2, after=4)
    expected = replay_center_momentum(init, dataset, p=2, alpha=0.5, momentum=0.0, nesterov=False, due=due,
                                      epochs=2, batch_size=2, seed=SEED, reset=True, sync_steps=4,
                                      ranks_per_worker=2)
    assert_matches_replay(records, expected, ATOL, k=2)
    for rank, rec in enumerate(records):
        column, worker = (rank % 2, rank % 2 + 2), (rank - rank % 2, rank - rank % 2 + 1)
        half = -(-NUMEL // 2) * 8  # the gradients padded to 2 slices, float64
        for step, traffic in rec["traffic"]:
            t = step - 1
            if t < 4:
                assert traffic == [("all_reduce", column, half), ("all_gather_single", worker, half)], (
                    f"rank {rank} step {t}: {traffic}")
            elif not due(t):
                if t == 4:  # HandOver gathered the sharded center after step 3: the test's collective, not training's
                    traffic = [call for call in traffic if call[:2] != ("all_gather_single", (rank - rank % 2,
                                                                                              rank - rank % 2 + 1))]
                assert traffic == [], f"rank {rank} step {t}: {traffic}"
        handover = torch.load(tmp_path / f"handover{rank}.pt", weights_only=False)
        assert_close(handover["local"], handover["center"], 0.0, f"rank {rank} at the hand-over")
        assert handover["bytes"] == (4 * half, 0)


@pytest.mark.parametrize(("cls", "clip"), [(ToyRegressor, None), (ToyRegressor, 0.05), (TwoOptimizerRegressor, None)])
def test_an_all_synchronous_run_is_lightnings_ddp(tmp_path: Path, cls: type[ToyRegressor], clip: float | None) -> None:
    """sync_steps beyond the run: every step is DDP's, so every worker and the center end where Lightning's own
    DDPStrategy ends (an independent implementation), also with gradient clipping, which must see the averaged
    gradient (clipping each worker's own before averaging would differ), and in manual optimization with two
    optimizers (each step averages its own optimizer's gradients)."""
    dataset = make_dataset(48)
    options = {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3} if cls is ToyRegressor else {}
    module, init = twins(cls, 9, lr=0.2, **options)
    clipping = {} if clip is None else {"gradient_clip_val": clip, "gradient_clip_algorithm": "norm"}
    _, records = fit_fork(module, dataset, tmp_path / "easgd", p=3, epochs=2, batch_size=4,
                          strategy=EASGDStrategy(tau=2, sync_steps=1000, start_method="fork"), **clipping)
    train, val = loaders(dataset, 4)
    trainer = L.Trainer(accelerator="cpu", devices=3, strategy=DDPStrategy(start_method="fork"), max_epochs=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path / "ddp"),
                        **clipping)
    trainer.fit(init, train, val)  # the fork launcher loads rank 0's final weights into `init`
    ddp = {k: v for k, v in init.state_dict().items() if v.is_floating_point()}
    for rank, rec in enumerate(records):
        assert_close(rec["local"], ddp, ATOL, f"worker {rank} against DDP")
        assert_close(rec["center"], ddp, ATOL, f"rank {rank} center against DDP")
    if clip is not None:  # the clipping acted: the unclipped run ends elsewhere
        module, _ = twins(cls, 9, lr=0.2, **options)
        _, free = fit_fork(module, dataset, tmp_path / "free", p=3, epochs=2, batch_size=4,
                           strategy=EASGDStrategy(tau=2, sync_steps=1000, start_method="fork"))
        assert (free[0]["center"]["net.0.weight"] - ddp["net.0.weight"]).abs().max() > 1e-4


def test_sync_start_with_worker_groups_and_batchnorm_matches_replay(tmp_path: Path) -> None:
    """BatchNorm in 2 workers of 2 ranks: each rank's forward updates its own running statistics from the worker's
    first rank's (DDP's broadcast); the synchronous step gives the worker its first rank's again before averaging
    across workers. Against the replay that keeps the ranks' batches apart, every rank and the center, and at the
    hand-over all four ranks hold one model and the center is it."""
    module, init = twins(ToyRegressor, 10, lr=0.1, batchnorm=True)
    dataset = make_dataset(48)
    _, records = fit_fork(module, dataset, tmp_path, p=4, epochs=1, batch_size=2, callbacks=[HandOver(tmp_path, 3)],
                          strategy=EASGDStrategy(tau=2, sync_steps=4, ranks_per_worker=2, start_method="fork"))
    due = every(2, after=4)
    expected = replay_center_momentum(init, dataset, p=2, alpha=0.45, momentum=0.0, nesterov=False, due=due,
                                      epochs=1, batch_size=2, seed=SEED, sync_steps=4, ranks_per_worker=2,
                                      union_batches=False)
    assert_matches_replay(records, expected, ATOL, k=2)
    first = torch.load(tmp_path / "handover0.pt", weights_only=False)
    assert first["local"]["net.1.running_mean"].abs().max() > 0  # the statistics moved
    floats = {k: v for k, v in first["local"].items() if v.is_floating_point()}
    for rank in range(4):
        handover = torch.load(tmp_path / f"handover{rank}.pt", weights_only=False)
        assert_close(handover["local"], first["local"], 0.0, f"rank {rank} at the hand-over")
        assert_close(handover["center"], floats, 0.0, f"rank {rank} center at the hand-over")
    assert not torch.equal(records[0]["local"]["net.0.weight"], records[2]["local"]["net.0.weight"])


def numel_with(batchnorm: bool) -> int:
    """The toy model's floating-point elements (BatchNorm1d(8) adds weight, bias, running mean and variance)."""
    return NUMEL + (4 * 8 if batchnorm else 0)


def test_sync_epochs_is_sync_steps_of_the_loaders_length(tmp_path: Path) -> None:
    """sync_epochs=1 with 6 batches of which every 2 accumulate: ⌈6/2⌉ = 3 synchronous steps."""
    dataset = make_dataset(48)
    runs = []
    for name, options in (("epochs", {"sync_epochs": 1}), ("steps", {"sync_steps": 3})):
        module, _ = twins(ToyRegressor, 6, lr=0.1)
        _, records = fit_fork(module, dataset, tmp_path / name, p=2, epochs=2, batch_size=4,
                              accumulate_grad_batches=2,
                              strategy=EASGDStrategy(tau=2, start_method="fork", **options))
        runs.append(records)
    for a, b in zip(*runs):
        assert_close(a["local"], b["local"], 0.0, "sync_epochs=1 against sync_steps=3")
        assert_close(a["center"], b["center"], 0.0, "center")


def _checkpointing(out: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=out / "ckpt", filename="{epoch}", save_top_k=-1, save_last=True)


@pytest.mark.parametrize("sync", [8, 6, 4])  # the resume at step 6: inside the start, at the hand-over, after it
def test_resume_inside_and_across_the_hand_over_is_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         sync: int) -> None:
    """6 steps per epoch, τ = 2, SlowMo's reset with heavy ball: a run resumed from the checkpoint of epoch 0 (clock
    6) ends where the uninterrupted one does, every worker and the center, and communicates on the same steps."""
    dataset = make_dataset(48)
    torch.manual_seed(12)
    init = ToyRegressor(momentum=0.9, nesterov=True).state_dict()

    def model() -> ToyRegressor:
        m = ToyRegressor(momentum=0.9, nesterov=True)
        m.load_state_dict(init)
        return m

    def strategy() -> EASGDStrategy:
        return EASGDStrategy(tau=2, sync_steps=sync, worker_pull="reset", beta=1.0, center_momentum=0.5,
                             start_method="fork")

    count_collectives(monkeypatch)
    _, full = fit_fork(model(), dataset, tmp_path / "full", p=2, epochs=2, batch_size=4, strategy=strategy())
    fit_fork(model(), dataset, tmp_path / "first", p=2, epochs=1, batch_size=4, strategy=strategy(),
             enable_checkpointing=True, callbacks=[_checkpointing(tmp_path / "first")])
    path = tmp_path / "first" / "ckpt" / "last.ckpt"
    assert torch.load(path, weights_only=True)["easgd"]["clock"] == 6
    _, second = fit_fork(ToyRegressor(momentum=0.9, nesterov=True), dataset, tmp_path / "second", p=2, epochs=2,
                         batch_size=4, ckpt_path=str(path), strategy=strategy())
    due = every(2, after=sync)
    expected = replay_center_momentum(model(), dataset, p=2, alpha=0.5, momentum=0.5, nesterov=False, due=due,
                                      epochs=2, batch_size=4, seed=SEED, reset=True, sync_steps=sync)
    assert_matches_replay(full, expected, ATOL)
    for rank in range(2):
        assert_close(second[rank]["local"], full[rank]["local"], 1e-12, f"worker {rank} after resume")
        assert_close(second[rank]["center"], full[rank]["center"], 1e-12, "center after resume")
        calls = _communicating_steps(second[rank])
        assert sorted(t for t, c in calls.items() if c == {"all_reduce": 1}) == list(range(6, sync))
        assert sorted(t for t, c in calls.items() if c == {"all_reduce": 2}) == [t for t in range(6, 12) if due(t)]


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"worker_pull": "pull"}, r"worker_pull='pull' is invalid: choose 'elastic' .* or 'reset'"),
        ({"worker_pull": None}, r"worker_pull=None is invalid"),
        ({"sync_steps": -1}, r"sync_steps=-1 is invalid: it must be an integer >= 0"),
        ({"sync_steps": 2.5}, r"sync_steps=2.5 is invalid"),
        ({"sync_steps": True}, r"sync_steps=True is invalid"),
        ({"sync_epochs": -2}, r"sync_epochs=-2 is invalid: it must be an integer >= 0 \(epochs"),
        ({"sync_steps": 4, "sync_epochs": 1}, r"sync_steps=4 and sync_epochs=1 were both given"),
        ({"sync_steps": 4, "warmup_steps": 8, "warmup_tau": 2},
         r"sync_steps=4 cannot be combined with warmup_steps=8: .*ambiguous"),
        ({"sync_epochs": 1, "warmup_steps": 8}, r"sync_epochs=1 cannot be combined with warmup_steps=8"),
    ],
)
def test_bad_family_options_are_refused(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EASGDStrategy(**kwargs)


@pytest.mark.parametrize("kwargs", [{"worker_pull": "reset"}, {"sync_steps": 3}, {"sync_epochs": 1}])
def test_async_refuses_the_family_options(kwargs: dict[str, Any]) -> None:
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=rf"AsyncEASGDStrategy does not accept {name}={value!r}: .*EASGDStrategy"):
        AsyncEASGDStrategy(**kwargs)


def test_reset_refuses_an_unstable_outer_step(tmp_path: Path) -> None:
    """DiLoCo's Nesterov μ = 0.9 allows β < 2·1.9/2.8 ≈ 1.357; β = 1.5 is refused at setup with the bound."""
    module, _ = twins(ToyRegressor, 0)
    with pytest.raises(Exception, match=r"beta = p\*alpha = 1.5 .*worker_pull='reset'.*Nesterov.*< "
                                         r"2\*\(1 \+ mu\)/\(1 \+ 2\*mu\) = 1.35714"):
        fit_fork(module, make_dataset(8), tmp_path, p=2, epochs=1, batch_size=4,
                 strategy=EASGDStrategy(beta=1.5, worker_pull="reset", center_momentum=0.9, center_nesterov=True,
                                        start_method="fork"))


def test_reset_with_a_single_worker_takes_beta_above_one(tmp_path: Path) -> None:
    """β is the outer learning rate of the reset rule, in (0, 2): one worker's α = β/1 = 1.5 is not refused (the
    elastic rule's range (0, 1) for α does not apply; tests/core/test_family_core.py checks the arithmetic)."""
    module, _ = twins(ToyRegressor, 0)
    _, records = fit_fork(module, make_dataset(8), tmp_path, p=1, epochs=1, batch_size=4,
                          strategy=EASGDStrategy(tau=1, beta=1.5, worker_pull="reset", start_method="fork"))
    assert records[0]["center"] and all(v.isfinite().all() for v in records[0]["center"].values())


def test_sync_epochs_refused_with_manual_optimization(tmp_path: Path) -> None:
    module, _ = twins(TwoOptimizerRegressor, 0)
    with pytest.raises(Exception, match="sync_epochs needs the number of optimizer steps per epoch, which manual"):
        fit_fork(module, make_dataset(8), tmp_path, p=2, epochs=1, batch_size=4,
                 strategy=EASGDStrategy(sync_epochs=1, start_method="fork"))


def test_family_options_are_public_attributes() -> None:
    strategy = EASGDStrategy(worker_pull="reset", sync_steps=7)
    assert (strategy.worker_pull, strategy.sync_steps, strategy.sync_epochs) == ("reset", 7, 0)
    assert math.isclose(EASGDStrategy(sync_epochs=2).sync_epochs, 2)
