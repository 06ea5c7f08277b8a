"""The strategy against an independent single-process replay of the paper's rule (tests/toy.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.asserts import assert_close, assert_matches_replay
from helpers.instruments import count_collectives
from helpers.launch import SEED, fit_fork
from helpers.replay import replay_easgd
from helpers.toy import ToyRegressor, TwoOptimizerRegressor, make_dataset, twins
from lightning_easgd import EASGDStrategy

ATOL = 1e-10  # float64 model: the only differences are summation order in the all-reduce


@pytest.mark.parametrize(
    ("p", "tau", "optimizer", "overlap"),
    [
        (2, 1, "sgd", True),
        (2, 3, "sgd", True),
        (2, 2, "nesterov", False),
        (3, 1, "nesterov", True),
        (3, 3, "sgd", True),
        (3, 4, "nesterov", True),
    ],
)
def test_matches_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, p: int, tau: int, optimizer: str,
                        overlap: bool) -> None:
    momentum = {"sgd": {}, "nesterov": {"momentum": 0.9, "nesterov": True}}[optimizer]
    module, init = twins(ToyRegressor, 0, lr=0.1, weight_decay=1e-3, **momentum)
    dataset = make_dataset(48)
    alpha = 0.9 / p
    count_collectives(monkeypatch)

    trainer, records = fit_fork(module, dataset, tmp_path, p=p, epochs=2, batch_size=4,
                                strategy=EASGDStrategy(tau=tau, overlap=overlap, start_method="fork"))
    expected = replay_easgd(init, dataset, p=p, tau=tau, alpha=alpha, epochs=2, batch_size=4, seed=SEED)

    assert_matches_replay(records, expected, ATOL)  # every rank holds the very same bits of the center
    for rank, rec in enumerate(records):
        assert rec["wrapped"] == "ToyRegressor", "the module must not be wrapped in DistributedDataParallel"
        assert rec["alpha"] == pytest.approx(alpha)
        # Validation at the end of each epoch saw the center of that moment, not the local weights.
        assert len(rec["val_seen"]) == 2
        for epoch, seen in enumerate(rec["val_seen"]):
            assert_close(seen, expected.epoch_centers[epoch], ATOL, f"rank {rank} weights seen by validation")

    # No communication between exchanges; at each exchange one all-reduce per bucket plus the small statistics
    # vector (distances, which double as the divergence flags).
    for rank, rec in enumerate(records):
        for step, calls in rec["collectives"]:
            t = step - 1  # the batch ran optimizer step t, then global_step became t + 1
            if t > 0 and t % tau == 0:
                assert calls == {"all_reduce": rec["buckets"] + 1}, f"rank {rank} step {t}: {calls}"
            else:
                assert calls == {}, f"rank {rank} step {t} communicated between exchanges: {calls}"

    # The LightningModule the user holds contains the center after fit (fork sends rank 0's weights back).
    assert_close(module.state_dict(), expected.center, ATOL, "user's module after fit")
    # Validation on the center with sync_dist: the mean loss over all samples (shards are equal-sized).
    x, y = dataset.tensors
    init.load_state_dict(expected.center, strict=False)
    with torch.no_grad():
        loss = torch.nn.functional.mse_loss(init(x), y).item()
    assert trainer.callback_metrics["val_loss"].item() == pytest.approx(loss, rel=1e-9)


def test_batchnorm_buffers_take_part(tmp_path: Path) -> None:
    """Float buffers (running statistics) are averaged like parameters; integer ones stay local."""
    module, init = twins(ToyRegressor, 1, batchnorm=True)
    dataset = make_dataset(48)
    _, records = fit_fork(module, dataset, tmp_path, p=2, epochs=2, batch_size=6,
                          strategy=EASGDStrategy(tau=2, start_method="fork"))
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=2, batch_size=6, seed=SEED)
    for rank, rec in enumerate(records):
        assert "net.1.running_mean" in rec["center"] and "net.1.running_var" in rec["center"]
        assert "net.1.num_batches_tracked" not in rec["center"]
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank}")
        assert_close(rec["center"], expected.center, ATOL, "center")
        assert rec["local"]["net.1.num_batches_tracked"].item() == 8  # 2 epochs x 24 samples / 6 per batch
    # The running statistics really moved, so the comparison above is not vacuous.
    assert not torch.equal(records[0]["center"]["net.1.running_mean"], init.net[1].running_mean)


def test_gradient_accumulation(tmp_path: Path) -> None:
    module, init = twins(ToyRegressor, 2, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    _, records = fit_fork(module, dataset, tmp_path, p=2, epochs=1, batch_size=3, accumulate_grad_batches=2,
                          strategy=EASGDStrategy(tau=2, start_method="fork"))
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=1, batch_size=3, seed=SEED, accumulate=2)
    for rank, rec in enumerate(records):
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank}")
        assert_close(rec["center"], expected.center, ATOL, "center")


def test_manual_optimization_two_optimizers(tmp_path: Path) -> None:
    """Every optimizer.step() is one tick of the clock, as for trainer.global_step."""
    module, init = twins(TwoOptimizerRegressor, 3, lr=0.1)
    dataset = make_dataset(48)
    _, records = fit_fork(module, dataset, tmp_path, p=2, epochs=1, batch_size=4,
                          strategy=EASGDStrategy(tau=3, start_method="fork"))
    expected = replay_easgd(init, dataset, p=2, tau=3, alpha=0.45, epochs=1, batch_size=4, seed=SEED)
    assert len(expected.exchanges) == (2 * 6 - 1) // 3  # 12 optimizer steps, exchanges at t = 3, 6, 9
    for rank, rec in enumerate(records):
        assert_close(rec["local"], expected.workers[rank], ATOL, f"worker {rank}")
        assert_close(rec["center"], expected.center, ATOL, "center")


def test_bf16_mixed_precision(tmp_path: Path) -> None:
    """bf16 autocast: float32 weights are exchanged; the replay runs under the same autocast."""
    module, init = twins(ToyRegressor, 4, dtype="float32")
    dataset = make_dataset(48, dtype=torch.float32)
    _, records = fit_fork(module, dataset, tmp_path, p=2, epochs=1, batch_size=4, precision="bf16-mixed",
                          strategy=EASGDStrategy(tau=2, start_method="fork"))
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=1, batch_size=4, seed=SEED,
                            autocast=torch.bfloat16)
    for rank, rec in enumerate(records):
        assert_close(rec["local"], expected.workers[rank], 1e-6, f"worker {rank}")
        assert_close(rec["center"], expected.center, 1e-6, "center")
        assert rec["center"]["net.0.weight"].dtype == torch.float32


def test_single_worker_degenerates_without_collectives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       messages: Any) -> None:
    module, init = twins(ToyRegressor, 5)
    dataset = make_dataset(24)
    count_collectives(monkeypatch)
    _, records = fit_fork(module, dataset, tmp_path, p=1, epochs=1, batch_size=4,
                          strategy=EASGDStrategy(tau=2, alpha=0.3, start_method="fork"))
    assert "EASGD needs at least 2 workers" in messages()
    expected = replay_easgd(init, dataset, p=1, tau=2, alpha=0.3, epochs=1, batch_size=4, seed=SEED)
    assert_close(records[0]["local"], expected.workers[0], ATOL, "worker")
    assert_close(records[0]["center"], expected.center, ATOL, "center")
    assert all(calls == {} for _, calls in records[0]["collectives"])
