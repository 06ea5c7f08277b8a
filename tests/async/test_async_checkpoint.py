"""Checkpoints of asynchronous EASGD hold the center; resuming reproduces the uninterrupted run (round-robin order,
so that both runs are deterministic)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from async_replay import replay_async_easgd
from conftest import SEED, assert_close, fit_fork
from lightning.pytorch.callbacks import ModelCheckpoint
from toy import ToyRegressor, make_dataset, twins

from lightning_easgd.async_strategy import AsyncEASGDStrategy


def _strategy() -> AsyncEASGDStrategy:
    return AsyncEASGDStrategy(tau=3, order="round_robin", start_method="fork")


@pytest.mark.parametrize("on_train_epoch_end", [False, True])
def test_checkpoint_state_dict_is_the_center(tmp_path: Path, on_train_epoch_end: bool) -> None:
    """Saved in validation (the snapshot is swapped in) or at the training epoch's end (a snapshot is taken for
    the checkpoint, on every rank), the state_dict is the center and the section holds every worker."""
    module, init = twins(ToyRegressor, 10, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    checkpointing = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1,
                                    save_on_train_epoch_end=on_train_epoch_end)
    fit_fork(module, dataset, tmp_path, p=2, epochs=2, batch_size=4, callbacks=[checkpointing],
             enable_checkpointing=True, strategy=_strategy())
    expected = replay_async_easgd(init, dataset, p=2, tau=3, alpha=0.45, epochs=2, batch_size=4, seed=SEED)
    for epoch in range(2):
        ckpt = torch.load(tmp_path / "ckpt" / f"epoch={epoch}.ckpt", weights_only=True)
        assert_close(ckpt["state_dict"], expected.epoch_centers[epoch], 1e-10, f"epoch {epoch} checkpoint")
        section = ckpt["easgd"]
        assert section["world_size"] == 2 and section["clock"] == 6 * (epoch + 1)
        for rank, worker in enumerate(section["workers"]):
            assert_close(worker["state_dict"], expected.epoch_workers[epoch][rank], 1e-10, f"worker {rank} local")


def _resume_model() -> ToyRegressor:
    return ToyRegressor(lr=0.05, momentum=0.9, nesterov=True, dropout=0.2, dtype="float32")


def test_resume_reproduces_uninterrupted_run(tmp_path: Path) -> None:
    dataset = make_dataset(48, dtype=torch.float32)
    torch.manual_seed(11)
    init = _resume_model().state_dict()
    straight = _resume_model()
    straight.load_state_dict(init)
    _, full = fit_fork(straight, dataset, tmp_path / "full", p=2, epochs=2, batch_size=4, strategy=_strategy())
    first = _resume_model()
    first.load_state_dict(init)
    fit_fork(first, dataset, tmp_path / "first", p=2, epochs=1, batch_size=4, enable_checkpointing=True,
             callbacks=[ModelCheckpoint(dirpath=tmp_path / "first" / "ckpt", save_last=True)], strategy=_strategy())
    resumed = _resume_model()  # fresh weights: everything must come from the checkpoint
    _, second = fit_fork(resumed, dataset, tmp_path / "second", p=2, epochs=2, batch_size=4,
                         ckpt_path=str(tmp_path / "first" / "ckpt" / "last.ckpt"), strategy=_strategy())
    for rank in range(2):
        assert_close(second[rank]["local"], full[rank]["local"], 1e-6, f"worker {rank} after resume")
        assert_close(second[rank]["center"], full[rank]["center"], 1e-6, "center after resume")
    assert not torch.equal(full[0]["local"]["net.0.weight"], full[1]["local"]["net.0.weight"])
    assert_close(resumed.state_dict(), full[0]["center"], 1e-6, "user's module after the resumed fit")
