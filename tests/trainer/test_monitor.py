"""ElasticDistanceMonitor's numbers against distances computed independently by the replay."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from helpers.instruments import count_collectives
from helpers.launch import SEED, fit_fork, loaders
from helpers.replay import replay_easgd
from helpers.toy import ToyRegressor, make_dataset, twins
from lightning_easgd import EASGDStrategy, ElasticDistanceMonitor


def _rows(path: Path) -> dict[int, dict[str, float]]:
    by_step: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if k.startswith("easgd/") and v != ""}
            if values:
                by_step.setdefault(int(row["step"]), {}).update(values)
    return by_step


def test_logged_distances_match_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module, init = twins(ToyRegressor, 30, momentum=0.9, nesterov=True, batchnorm=True)
    dataset = make_dataset(48)
    count_collectives(monkeypatch)
    logger = CSVLogger(tmp_path, name="logs", version=0)
    _, records = fit_fork(module, dataset, tmp_path, p=3, epochs=2, batch_size=4, logger=logger,
                          callbacks=[ElasticDistanceMonitor(per_layer=True, per_rank=True)],
                          strategy=EASGDStrategy(tau=2, per_tensor_distances=True, start_method="fork"))
    expected = replay_easgd(init, dataset, p=3, tau=2, alpha=0.3, epochs=2, batch_size=4, seed=SEED)
    logged = _rows(tmp_path / "logs" / "version_0" / "metrics.csv")
    assert sorted(logged) == [e["step"] for e in expected.exchanges] == [2, 4, 6]  # 8 steps per worker
    for exchange in expected.exchanges:
        got = logged[exchange["step"]]
        d = torch.tensor(exchange["distances"], dtype=torch.float64)
        c = exchange["center_norm"]
        assert d.min() > 0
        assert got["easgd/distance_mean"] == pytest.approx(d.mean().item(), rel=1e-9)
        assert got["easgd/distance_max"] == pytest.approx(d.max().item(), rel=1e-9)
        assert got["easgd/center_norm"] == pytest.approx(c, rel=1e-9)
        assert got["easgd/relative_distance_mean"] == pytest.approx((d / c).mean().item(), rel=1e-9)
        assert got["easgd/relative_distance_max"] == pytest.approx((d / c).max().item(), rel=1e-9)
        for rank in range(3):
            assert got[f"easgd/distance_rank{rank}"] == pytest.approx(d[rank].item(), rel=1e-9)
            for name, value in exchange["layers"][rank].items():
                assert got[f"easgd/layer/{name}/distance_rank{rank}"] == pytest.approx(value, rel=1e-9, abs=1e-15)
        running_var = [layers["net.1.running_var"] for layers in exchange["layers"]]
        assert got["easgd/layer/net.1.running_var/distance_max"] == pytest.approx(max(running_var), rel=1e-9)
    # Monitoring rides on the exchange's statistics all-reduce: nothing more at exchanges, nothing in between.
    for rec in records:
        for step, calls in rec["collectives"]:
            t = step - 1
            assert calls == ({"all_reduce": rec["buckets"] + 1} if t > 0 and t % 2 == 0 else {}), (t, calls)


def test_log_every_n_exchanges(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="logs", version=0)
    fit_fork(ToyRegressor(), make_dataset(48), tmp_path, p=2, epochs=1, batch_size=2, logger=logger,
             callbacks=[ElasticDistanceMonitor(log_every_n_exchanges=2)],
             strategy=EASGDStrategy(tau=2, start_method="fork"))
    logged = _rows(tmp_path / "logs" / "version_0" / "metrics.csv")
    assert sorted(logged) == [4, 8]  # exchanges at t = 2, 4, 6, 8, 10; every second one is logged
    assert set(logged[4]) == {"easgd/distance_mean", "easgd/distance_max", "easgd/relative_distance_mean",
                              "easgd/relative_distance_max", "easgd/center_norm"}


def test_monitor_needs_easgd_strategy(tmp_path: Path) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        callbacks=[ElasticDistanceMonitor()], default_root_dir=str(tmp_path))
    train, _ = loaders(make_dataset(8), 4)
    with pytest.raises(ValueError, match="ElasticDistanceMonitor needs an EASGD strategy.*SingleDeviceStrategy"):
        trainer.fit(ToyRegressor(), train)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"per_layer": 1}, "per_layer=1 is invalid"), ({"log_every_n_exchanges": 0}, "log_every_n_exchanges=0")],
)
def test_monitor_bad_parameters(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ElasticDistanceMonitor(**kwargs)  # type: ignore[arg-type]
