"""Checkpoints of asynchronous EASGD hold the center and every worker (round-robin order, so that the run is
deterministic). Exact resume is tested for both strategies in tests/test_checkpoint.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers.asserts import assert_close
from helpers.async_replay import replay_async_easgd
from helpers.checkpoint_files import worker_states
from helpers.launch import SEED, fit_fork
from helpers.toy import ToyRegressor, make_dataset, twins
from lightning_easgd.trainer.async_strategy import AsyncEASGDStrategy


def _strategy() -> AsyncEASGDStrategy:
    return AsyncEASGDStrategy(tau=3, order="round_robin", start_method="fork")


@pytest.mark.parametrize("on_train_epoch_end", [False, True])
def test_checkpoint_state_dict_is_the_center(tmp_path: Path, on_train_epoch_end: bool) -> None:
    """Saved in validation (the snapshot is swapped in) or at the training epoch's end (a snapshot is taken for
    the checkpoint, on every rank), the state_dict is the center and every worker's file holds that worker."""
    module, init = twins(ToyRegressor, 10, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    checkpointing = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1,
                                    save_on_train_epoch_end=on_train_epoch_end)
    fit_fork(module, dataset, tmp_path, p=2, epochs=2, batch_size=4, callbacks=[checkpointing],
             enable_checkpointing=True, strategy=_strategy())
    expected = replay_async_easgd(init, dataset, p=2, tau=3, alpha=0.45, epochs=2, batch_size=4, seed=SEED)
    for epoch in range(2):
        path = tmp_path / "ckpt" / f"epoch={epoch}.ckpt"
        ckpt = torch.load(path, weights_only=True)
        assert_close(ckpt["state_dict"], expected.epoch_centers[epoch], 1e-10, f"epoch {epoch} checkpoint")
        section = ckpt["easgd"]
        assert section["world_size"] == 2 and section["clock"] == 6 * (epoch + 1)
        for rank, worker in enumerate(worker_states(path)):
            assert_close(worker["state_dict"], expected.epoch_workers[epoch][rank], 1e-10, f"worker {rank} local")
