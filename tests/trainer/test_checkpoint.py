"""Checkpoints hold the center; resuming reproduces an uninterrupted run, also with a different world size."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers.asserts import assert_close
from helpers.checkpoint_files import worker_states
from helpers.launch import SEED, fit_fork
from helpers.replay import replay_easgd
from helpers.toy import ToyRegressor, make_dataset, twins
from lightning_easgd import AsyncEASGDStrategy, EASGDStrategy


def _checkpointing(tmp_path: Path) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, save_last=True)


def test_checkpoint_state_dict_is_the_center(tmp_path: Path) -> None:
    module, init = twins(ToyRegressor, 10, momentum=0.9, nesterov=True)
    dataset = make_dataset(48)
    fit_fork(module, dataset, tmp_path, p=2, epochs=2, batch_size=4, callbacks=[_checkpointing(tmp_path)],
             enable_checkpointing=True, strategy=EASGDStrategy(tau=3, start_method="fork"))
    expected = replay_easgd(init, dataset, p=2, tau=3, alpha=0.45, epochs=2, batch_size=4, seed=SEED)
    for epoch in range(2):
        path = tmp_path / "ckpt" / f"epoch={epoch}.ckpt"
        ckpt = torch.load(path, weights_only=True)  # plain tensors and Python types only
        # Saved during validation, when the center is swapped in, and it is the center either way.
        assert_close(ckpt["state_dict"], {f"net.{k[4:]}": v for k, v in expected.epoch_centers[epoch].items()},
                     1e-10, f"epoch {epoch} checkpoint")
        loaded = ToyRegressor.load_from_checkpoint(path)
        assert_close(loaded.state_dict(), expected.epoch_centers[epoch], 1e-10, "load_from_checkpoint")
        section = ckpt["easgd"]
        assert section["world_size"] == 2 and section["tau"] == 3 and section["alpha"] == pytest.approx(0.45)
        assert section["num_workers"] == 2 and section["ranks_per_worker"] == 1
        assert section["clock"] == 6 * (epoch + 1)
        assert not ckpt["optimizer_states"][0]["state"], "per-parameter state is in the worker files only"
        workers = worker_states(path)
        assert len(workers) == 2
        for rank, worker in enumerate(workers):
            assert worker["worker"] == rank and len(worker["rng"]) == 1
            assert_close(worker["state_dict"], expected.epoch_workers[epoch][rank], 1e-10, f"worker {rank} local")
            assert worker["optimizer_states"][0]["state"], "momentum buffers are saved"


def _resume_model() -> ToyRegressor:
    return ToyRegressor(lr=0.05, momentum=0.9, nesterov=True, dropout=0.2, dtype="float32")


_RESUMABLE: dict[str, Callable[[], EASGDStrategy]] = {
    "sync": lambda: EASGDStrategy(tau=2, start_method="fork"),
    # Free-running asynchronous exchanges are not reproducible; round-robin order makes both runs deterministic.
    "async_round_robin": lambda: AsyncEASGDStrategy(tau=2, order="round_robin", start_method="fork"),
}


@pytest.mark.parametrize("kind", list(_RESUMABLE))
def test_resume_reproduces_uninterrupted_run(tmp_path: Path, kind: str) -> None:
    """Train 2 epochs == train 1 epoch, resume, train 1 more (dropout, momentum and float32 included)."""
    strategy = _RESUMABLE[kind]
    dataset = make_dataset(48, dtype=torch.float32)
    torch.manual_seed(11)
    init = _resume_model().state_dict()

    straight = _resume_model()
    straight.load_state_dict(init)
    _, full = fit_fork(straight, dataset, tmp_path / "full", p=2, epochs=2, batch_size=4,
                       strategy=strategy())

    first = _resume_model()
    first.load_state_dict(init)
    fit_fork(first, dataset, tmp_path / "first", p=2, epochs=1, batch_size=4, enable_checkpointing=True,
             callbacks=[_checkpointing(tmp_path / "first")], strategy=strategy())
    resumed = _resume_model()  # fresh weights: everything must come from the checkpoint
    _, second = fit_fork(resumed, dataset, tmp_path / "second", p=2, epochs=2, batch_size=4,
                         ckpt_path=str(tmp_path / "first" / "ckpt" / "last.ckpt"),
                         strategy=strategy())

    for rank in range(2):
        assert_close(second[rank]["local"], full[rank]["local"], 1e-6, f"worker {rank} after resume")
        assert_close(second[rank]["center"], full[rank]["center"], 1e-6, "center after resume")
        for got, want in zip(second[rank]["optim"][0]["state"].values(), full[rank]["optim"][0]["state"].values()):
            assert torch.allclose(got["momentum_buffer"], want["momentum_buffer"], atol=1e-6)
    # The runs really differ between workers (otherwise the per-worker comparison would prove little).
    assert not torch.equal(full[0]["local"]["net.0.weight"], full[1]["local"]["net.0.weight"])
    assert_close(resumed.state_dict(), full[0]["center"], 1e-6, "user's module after the resumed fit")


@pytest.mark.parametrize(("saved_p", "new_p"), [(2, 3), (3, 2)])
def test_resume_with_another_world_size(tmp_path: Path, messages: Any, saved_p: int, new_p: int) -> None:
    dataset = make_dataset(48)
    torch.manual_seed(12)
    module = ToyRegressor(momentum=0.9)
    fit_fork(module, dataset, tmp_path / "first", p=saved_p, epochs=1, batch_size=4, enable_checkpointing=True,
             callbacks=[_checkpointing(tmp_path / "first")], strategy=EASGDStrategy(tau=2, start_method="fork"))
    path = tmp_path / "first" / "ckpt" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    messages()

    _, records = fit_fork(ToyRegressor(momentum=0.9), dataset, tmp_path / "second", p=new_p, epochs=2,
                          batch_size=4, ckpt_path=str(path), strategy=EASGDStrategy(tau=2, start_method="fork"))
    assert f"the checkpoint has {saved_p} workers and this run has {new_p}" in messages()
    center = dict(ckpt["state_dict"])
    saved = worker_states(path)
    for rank, rec in enumerate(records):
        assert rec["alpha"] == pytest.approx(0.9 / new_p)
        if rank < saved_p:
            assert_close(rec["start_state"], saved[rank]["state_dict"], 0.0, f"worker {rank}")
            momentum = {i: s["momentum_buffer"] for i, s in rec["start_optim"][0]["state"].items()}
            want = {i: s["momentum_buffer"] for i, s in saved[rank]["optimizer_states"][0]["state"].items()}
            assert want and set(momentum) == set(want), f"worker {rank} keeps its momentum"
            assert_close(momentum, want, 0.0, f"worker {rank} momentum")
        else:
            assert_close(rec["start_state"], center, 0.0, f"new worker {rank} starts from the center")
            assert not rec["start_optim"][0]["state"], "a new worker starts with no momentum"
            saved_lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
            assert rec["start_optim"][0]["param_groups"][0]["lr"] == saved_lr


def test_checkpoint_without_worker_states(tmp_path: Path, messages: Any) -> None:
    dataset = make_dataset(48)
    torch.manual_seed(13)
    fit_fork(ToyRegressor(), dataset, tmp_path / "first", p=2, epochs=1, batch_size=4, enable_checkpointing=True,
             callbacks=[_checkpointing(tmp_path / "first")],
             strategy=EASGDStrategy(tau=2, save_worker_states=False, start_method="fork"))
    path = tmp_path / "first" / "ckpt" / "last.ckpt"
    ckpt = torch.load(path, weights_only=True)
    assert "worker_files" not in ckpt["easgd"] and not path.with_name("last.ckpt.workers").exists()
    assert ckpt["optimizer_states"][0]["param_groups"], "the optimizer state stays in the checkpoint"
    messages()
    _, records = fit_fork(ToyRegressor(), dataset, tmp_path / "second", p=2, epochs=2, batch_size=4,
                          ckpt_path=str(path), strategy=EASGDStrategy(tau=2, start_method="fork"))
    assert "all 2 workers start from the center" in messages()
    for rec in records:
        assert_close(rec["start_state"], ckpt["state_dict"], 0.0, "worker starts from the center")


def test_unknown_checkpoint_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "easgd": {"format": 99}}, path)
    with pytest.raises(ValueError, match="unknown format"):
        EASGDStrategy().load_checkpoint(path)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_16_bit_weights_resume_bit_identically(tmp_path: Path, precision: str) -> None:
    """3 epochs straight == 1 epoch, then resume to 3: the float32 center comes back from the checkpoint, not from
    the module it was loaded into (which rounds it to 16 bits before the exchange is built)."""
    dataset = make_dataset(48, dtype=torch.float32)
    torch.manual_seed(5)
    init = ToyRegressor(momentum=0.9, dtype="float32").state_dict()

    def model() -> ToyRegressor:
        module = ToyRegressor(momentum=0.9, dtype="float32")
        module.load_state_dict(init)
        return module

    _, straight = fit_fork(model(), dataset, tmp_path / "straight", p=2, epochs=3, batch_size=4,
                           precision=precision, enable_checkpointing=True, callbacks=[_checkpointing(tmp_path)],
                           strategy=EASGDStrategy(tau=2, start_method="fork"))
    saved = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)["state_dict"]
    assert saved["net.0.weight"].dtype == torch.float32
    assert not torch.equal(saved["net.0.weight"], saved["net.0.weight"].to(torch.bfloat16).float()), (
        "the saved center must carry more than 16 bits, or this test proves nothing")
    _, resumed = fit_fork(model(), dataset, tmp_path / "resumed", p=2, epochs=3, batch_size=4, precision=precision,
                          ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"),
                          strategy=EASGDStrategy(tau=2, start_method="fork"))
    for rank in range(2):
        assert straight[rank]["local"]["net.0.weight"].dtype == {"bf16-true": torch.bfloat16}.get(precision,
                                                                                                  torch.float16)
        assert straight[rank]["center"]["net.0.weight"].dtype == torch.float32
        for what in ("center", "local"):
            for key, value in straight[rank][what].items():
                assert torch.equal(resumed[rank][what][key], value), f"rank {rank} {what} {key} after resume"
    assert not torch.equal(straight[0]["local"]["net.0.weight"], straight[1]["local"]["net.0.weight"])
