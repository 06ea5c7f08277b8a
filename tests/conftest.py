"""Shared fixtures: in-process multi-worker training with the fork launcher, compared against tests/toy.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))

from toy import Recorder  # noqa: E402

import lightning_easgd  # noqa: E402,F401  (registers the strategy names)
from lightning_easgd import EASGDStrategy  # noqa: E402

SEED = 7
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Lightning's launchers leave these behind; every test gets the environment it started with.
_DIST_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")


@pytest.fixture(autouse=True)
def _clean_env() -> Any:
    saved = dict(os.environ)
    os.environ["PL_GLOBAL_SEED"] = str(SEED)  # the DistributedSampler's seed, which the replay mirrors
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def messages(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> Any:
    """Read what the strategy logs or warns, also from forked workers (their log handlers and warning recorders
    live in the child, so the messages are printed to the inherited stderr instead)."""
    for module in ("layout", "checkpointing"):
        monkeypatch.setattr(f"lightning_easgd.{module}.rank_zero_warn",
                            lambda msg, *a, **k: print(msg, file=sys.stderr))
    capfd.readouterr()
    return lambda: capfd.readouterr().err


def loaders(dataset: Any, batch_size: int) -> tuple[DataLoader, DataLoader]:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True), DataLoader(dataset, batch_size=batch_size)


def fit_fork(
    module: L.LightningModule,
    dataset: Any,
    out: Path,
    *,
    p: int,
    epochs: int,
    batch_size: int,
    strategy: EASGDStrategy | None = None,
    callbacks: list[L.Callback] | None = None,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[L.Trainer, list[dict[str, Any]]]:
    """Fit with ``p`` forked CPU workers; returns the trainer and every rank's Recorder record."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.pt"):
        old.unlink()
    trainer_kwargs.setdefault("logger", False)
    trainer_kwargs.setdefault("enable_checkpointing", False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=p,
        strategy=strategy or EASGDStrategy(start_method="fork"),
        max_epochs=epochs,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
        callbacks=[Recorder(out), *(callbacks or [])],
        **trainer_kwargs,
    )
    train, val = loaders(dataset, batch_size)
    trainer.fit(module, train, val, ckpt_path=ckpt_path)
    records = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(p)]
    return trainer, records


def assert_matches_replay(records: list[dict[str, Any]], expected: Any, atol: float, k: int = 1) -> None:
    """Every rank's local weights are its worker's in the replay (``expected``, workers of ``k`` ranks) and its
    center is the replay's; the center is bit-identical on every rank, the local weights within a worker."""
    for rank, rec in enumerate(records):
        worker = rank // k
        assert_close(rec["local"], expected.workers[worker], atol, f"rank {rank} (worker {worker}) local weights")
        assert_close(rec["center"], expected.center, atol, f"rank {rank} center")
        for name, value in rec["center"].items():
            assert torch.equal(value, records[0]["center"][name]), f"center {name} differs between ranks"
        for name, value in rec["local"].items():
            assert torch.equal(value, records[worker * k]["local"][name]), f"rank {rank}: {name} differs in its worker"


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float, what: str) -> None:
    for key, value in expected.items():
        assert key in actual, f"{what}: missing {key}"
        err = (actual[key].double() - value.double()).abs().max().item()
        assert err <= atol, f"{what}: {key} differs by {err:.3g} (tolerance {atol:g})"
