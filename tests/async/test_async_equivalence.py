"""AsyncEASGDStrategy against an independent single-process replay of Algorithm 1 and 2 (async_replay.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from helpers.asserts import assert_close
from helpers.async_replay import replay_async_easgd
from helpers.launch import SEED, fit_fork
from helpers.toy import ToyRegressor, make_dataset
from lightning_easgd.trainer.async_strategy import AsyncEASGDStrategy

ATOL = 1e-10  # float64 model


class StatsRecorder(L.Callback):
    """Keeps every exchange's statistics (the monitor's input) and saves them per rank."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.stats: list[dict[str, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.averager.track_distances()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        for s in trainer.strategy.averager.pop_stats():
            self.stats.append({"step": s.step, "distances": s.distances.tolist(), "center_norm": s.center_norm,
                               **s.extra})

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.save(self.stats, self.out / f"stats{trainer.global_rank}.pt")


def _modules(seed: int, **kwargs: Any) -> tuple[ToyRegressor, ToyRegressor]:
    torch.manual_seed(seed)
    module = ToyRegressor(**kwargs)
    init = ToyRegressor(**kwargs)
    init.load_state_dict(module.state_dict())
    return module, init


@pytest.mark.parametrize(
    ("p", "tau", "optimizer", "overlap"),
    [(1, 2, "sgd", True), (2, 2, "sgd", True), (3, 3, "nesterov", True), (2, 1, "nesterov", False)],
)
def test_round_robin_matches_replay(tmp_path: Path, p: int, tau: int, optimizer: str, overlap: bool) -> None:
    momentum = {"sgd": {}, "nesterov": {"momentum": 0.9, "nesterov": True}}[optimizer]
    module, init = _modules(0, lr=0.1, weight_decay=1e-3, **momentum)
    dataset = make_dataset(48)
    alpha = 0.9 / p
    # p = 1 runs free: with one worker there is only one order.
    order = "round_robin" if p > 1 else "free"
    _, records = fit_fork(module, dataset, tmp_path, p=p, epochs=2, batch_size=4, callbacks=[StatsRecorder(tmp_path)],
                          strategy=AsyncEASGDStrategy(tau=tau, order=order, overlap=overlap, start_method="fork"))
    expected = replay_async_easgd(init, dataset, p=p, tau=tau, alpha=alpha, epochs=2, batch_size=4, seed=SEED)
    assert len(expected.exchanges) >= 2 * p

    for rank, rec in enumerate(records):
        assert rec["wrapped"] == "ToyRegressor"
        assert rec["alpha"] == pytest.approx(alpha)
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank} local weights")
        assert_close(rec["center"], expected.center, ATOL, f"rank {rank} center")
        # Validation at each epoch end saw the center of that moment (a consistent snapshot, the same on all ranks).
        assert len(rec["val_seen"]) == 2
        for epoch, seen in enumerate(rec["val_seen"]):
            assert_close(seen, expected.epoch_centers[epoch], ATOL, f"rank {rank} weights seen by validation")
        # Monitor statistics: own distance and the center norm at each exchange, and the version lag.
        stats = torch.load(tmp_path / f"stats{rank}.pt")
        mine = [e for e in expected.exchanges if e["rank"] == rank]
        assert [s["step"] for s in stats] == [e["step"] for e in mine]
        for k, (s, e) in enumerate(zip(stats, mine)):
            assert s["distances"][rank] == pytest.approx(e["distance"], rel=1e-9, abs=1e-12)
            assert s["center_norm"] == pytest.approx(e["center_norm"], rel=1e-9)
            # Round robin: before a worker's k-th exchange the others made exactly `rank` (k = 0) or p − 1 updates.
            assert s["version_lag"] == (rank if k == 0 else p - 1)
            assert s["version_lag_max"] == s["version_lag"]
    # The user's module holds the center after fit.
    assert_close(module.state_dict(), expected.center, ATOL, "user's module after fit")
