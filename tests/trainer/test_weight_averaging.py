"""Lightning features that would silently undo EASGD: weight-averaging callbacks are refused, and a per-step
``sync_dist`` log during training is warned about once, on rank 0, naming the metric."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, StochasticWeightAveraging, WeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from helpers.asserts import assert_close
from helpers.launch import SEED, fit_fork
from helpers.replay import replay_easgd
from helpers.toy import ToyRegressor, make_dataset, twins
from lightning_easgd import AsyncEASGDStrategy, EASGDStrategy
from lightning_easgd.trainer.guards import WEIGHT_AVERAGING_CALLBACKS


def test_every_weight_averaging_callback_of_this_lightning_is_covered() -> None:
    assert set(WEIGHT_AVERAGING_CALLBACKS) == {StochasticWeightAveraging, WeightAveraging}
    assert issubclass(EMAWeightAveraging, WeightAveraging)


@pytest.mark.parametrize(
    ("callback", "strategy"),
    [
        (StochasticWeightAveraging(swa_lrs=0.01), EASGDStrategy(tau=2, start_method="fork")),
        (EMAWeightAveraging(), EASGDStrategy(tau=2, start_method="fork")),
        (WeightAveraging(), AsyncEASGDStrategy(tau=2, start_method="fork")),
    ],
    ids=["swa-sync", "ema-sync", "weight-averaging-async"],
)
def test_weight_averaging_callbacks_are_refused_with_the_alternative(
    tmp_path: Path, callback: Any, strategy: EASGDStrategy
) -> None:
    name = type(callback).__name__
    with pytest.raises(Exception, match=rf"(?s){name} cannot be used with EASGD: it averages this worker's local "
                                        r"weights.*swa_utils.AveragedModel"):
        fit_fork(ToyRegressor(), make_dataset(16), tmp_path, p=2, epochs=1, batch_size=4, strategy=strategy,
                 callbacks=[callback])


class LoggingRegressor(ToyRegressor):
    """Logs one per-step synced metric (costly), one per-epoch synced metric and one unsynced one (both fine)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, sync_dist=True)  # on_step=True in training_step: a collective per step
        self.log("epoch_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        self.log("local_loss", loss)
        return loss


def test_per_step_sync_dist_warns_once_on_rank_zero_naming_the_metric(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    # Forked workers inherit the patch; rank_zero_only keeps the real rank-0 filter, printing to the shared stderr.
    monkeypatch.setattr("lightning_easgd.trainer.guards.rank_zero_warn",
                        rank_zero_only(lambda message, *a, **k: print(f"WARN {message}", file=sys.stderr)))
    capfd.readouterr()
    module, init = twins(LoggingRegressor, 11)
    dataset = make_dataset(32)
    _, records = fit_fork(module, dataset, tmp_path, p=2, epochs=2, batch_size=4,
                          strategy=EASGDStrategy(tau=2, start_method="fork"))
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("WARN ")]
    assert len(warnings) == 1, warnings  # 8 steps on 2 ranks: once, and on rank 0 only
    assert "self.log('train_loss', ..., sync_dist=True) in training_step all-reduces the value on every" in warnings[0]
    assert "on_step=False, on_epoch=True" in warnings[0]
    # The warning changes nothing: the run is still exactly the paper's rule.
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=2, batch_size=4, seed=SEED)
    for rank, rec in enumerate(records):
        assert_close(rec["local"], expected.workers[rank], 1e-10, f"worker {rank}")
