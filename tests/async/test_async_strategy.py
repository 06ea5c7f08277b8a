"""AsyncEASGDStrategy's own surface: registered names, the Hydra config, refused input, the stability warning and
what the distance monitor logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from helpers.launch import fit_fork
from helpers.toy import ToyRegressor, make_dataset
from lightning_easgd import ElasticDistanceMonitor
from lightning_easgd.trainer.async_strategy import AsyncEASGDStrategy

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def test_registered_names() -> None:
    if "easgd_async" not in StrategyRegistry:
        AsyncEASGDStrategy.register_strategies(StrategyRegistry)
    for name, start_method in [("easgd_async", "popen"), ("easgd_async_spawn", "spawn"), ("easgd_async_fork", "fork")]:
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
        assert type(trainer.strategy) is AsyncEASGDStrategy
        assert trainer.strategy._start_method == start_method


def test_hydra_config_instantiates() -> None:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("cifar10", overrides=["strategy=easgd_async"])
    finally:
        GlobalHydra.instance().clear()
    strategy = instantiate(cfg.strategy)
    assert type(strategy) is AsyncEASGDStrategy
    assert strategy.order == "free" and strategy.tau == 10 and strategy.beta == 0.9 and strategy.overlap
    assert "elastic_distance" in cfg.callbacks
    assert not cfg.optimizer.get("nesterov", False)  # Algorithm 1; optimizer=nesterov gives Algorithm 2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"order": "random"}, r"order='random' is invalid: choose 'free' \(asynchronous\) or 'round_robin'"),
    ({"tau": 0}, r"tau=0 is invalid"),
    ({"alpha": 1.0}, r"alpha=1.0 is invalid"),
    ({"on_nonfinite": "ignore"}, r"on_nonfinite='ignore' is invalid"),
    ({"find_unused_parameters": True}, r"find_unused_parameters=True: it is an option of DistributedDataParallel"),
])
def test_bad_input(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AsyncEASGDStrategy(**kwargs)


class MemoryLogger(Logger):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only  # as Lightning's loggers: only rank 0's view is logged
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, dict(metrics)))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        torch.save(self.rows, self.out / "metrics.pt")


def test_stability_warning_and_monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capfd: pytest.CaptureFixture[str]) -> None:
    """lr = 1.5 with alpha = 0.45 lies outside (4 - 2 lr)/(4 - lr) = 0.4: warned at setup. The monitor logs this
    worker's distance and the version lag, p - 1 = 2 in round-robin order with 3 workers."""
    import sys

    monkeypatch.setattr("lightning_easgd.trainer.async_strategy.rank_zero_warn",
                        lambda msg, *a, **k: print(msg, file=sys.stderr))
    module = ToyRegressor(lr=1.5)
    logger = MemoryLogger(tmp_path)
    fit_fork(module, make_dataset(48), tmp_path, p=3, epochs=1, batch_size=4, logger=logger,
             callbacks=[ElasticDistanceMonitor(per_rank=True)],
             strategy=AsyncEASGDStrategy(tau=2, alpha=0.45, order="round_robin", start_method="fork"))
    err = capfd.readouterr().err
    assert "outside the paper's round-robin stability region" in err and "= 0.4" in err
    rows = [(step, m) for step, m in torch.load(tmp_path / "metrics.pt") if "easgd/version_lag" in m]
    assert [step for step, _ in rows] == [2]  # 4 steps per worker: one exchange, at t = 2
    _, metrics = rows[0]
    assert metrics["easgd/version_lag"] == 0.0  # rank 0 goes first in the round
    assert metrics["easgd/distance_rank0"] > 0.0
    assert metrics["easgd/distance_rank1"] == metrics["easgd/distance_rank2"] == 0.0  # not yet exchanged
    assert metrics["easgd/exchange_wait_ms"] >= 0.0


def test_warns_nothing_inside_the_region(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capfd: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setattr("lightning_easgd.trainer.async_strategy.rank_zero_warn",
                        lambda msg, *a, **k: print(msg, file=sys.stderr))
    fit_fork(ToyRegressor(lr=0.1), make_dataset(16), tmp_path, p=1, epochs=1, batch_size=4,
             strategy=AsyncEASGDStrategy(tau=2, start_method="fork"))
    assert "stability region" not in capfd.readouterr().err
