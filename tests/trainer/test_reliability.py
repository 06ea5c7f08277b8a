"""Divergence guard, dead and stalled peers, atomic checkpoints, and refusal of broken checkpoints."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers.asserts import assert_close
from helpers.bounded import child_env, fork_ranks
from helpers.launch import SEED, fit_fork
from helpers.replay import replay_easgd
from helpers.toy import NaNLossRegressor, ToyRegressor, make_dataset, twins
from lightning_easgd import EASGDStrategy
from lightning_easgd.checkpoint.atomic_io import AtomicCheckpointIO
from lightning_easgd.core import ElasticAverager, ExchangeError

REPO = Path(__file__).resolve().parents[2]


def test_nan_loss_raises_on_every_rank_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    """Worker 1's loss turns NaN at step 7 (epoch 1); the exchange at step 8 stops the run."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1)
    with pytest.raises(Exception, match=r"worker\(s\) 1 of 2 have non-finite parameters or buffers at optimizer "
                                        r"step 8"):
        fit_fork(NaNLossRegressor(nan_rank=1, nan_step=7), make_dataset(48), tmp_path, p=2, epochs=2,
                 batch_size=4, enable_checkpointing=True, callbacks=[checkpoints],
                 strategy=EASGDStrategy(tau=2, start_method="fork"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0.ckpt", "epoch=0.ckpt.workers"]
    good = torch.load(tmp_path / "ckpt" / "epoch=0.ckpt", weights_only=True)
    assert all(v.isfinite().all() for v in good["state_dict"].values())


def test_reset_policy_drops_and_restarts_the_diverged_worker(tmp_path: Path, messages: Any) -> None:
    module, init = twins(NaNLossRegressor, 40, nan_rank=1, nan_step=3, momentum=0.9)
    dataset = make_dataset(48)
    _, records = fit_fork(module, dataset, tmp_path, p=2, epochs=1, batch_size=4,
                          strategy=EASGDStrategy(tau=2, on_nonfinite="reset", start_method="fork"))
    assert "worker(s) 1 had non-finite weights at optimizer step 4" in messages()
    expected = replay_easgd(init, dataset, p=2, tau=2, alpha=0.45, epochs=1, batch_size=4, seed=SEED,
                            reset_nonfinite=True)
    for rank, rec in enumerate(records):
        assert all(v.isfinite().all() for v in rec["local"].values())
        assert_close(rec["local"], expected.workers[rank], 1e-10, f"worker {rank}")
        assert_close(rec["center"], expected.center, 1e-10, "center")


def test_stalled_peer_fails_the_exchange_within_the_timeout(tmp_path: Path) -> None:
    class Stall(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_rank == 1 and trainer.global_step == 3:
                time.sleep(120)  # a stuck worker

    start = time.monotonic()
    expected = r"EASGD exchange at step 4 failed on rank 0: .*A peer may have died or stalled \(timeout 3 s\)"
    with pytest.raises(Exception, match=expected):
        fit_fork(ToyRegressor(), make_dataset(48), tmp_path, p=2, epochs=1, batch_size=4, callbacks=[Stall()],
                 strategy=EASGDStrategy(tau=2, timeout=timedelta(seconds=3), start_method="fork"))
    assert time.monotonic() - start < 60


def _exchange_with_dying_peer(rank: int, store: str, results: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    weight = torch.nn.Parameter(torch.ones(4))
    averager = ElasticAverager([("w", weight)], tau=1, alpha=0.4, timeout=timedelta(seconds=30))
    with averager.step():  # t = 0: no exchange
        pass
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    start = time.monotonic()
    try:
        with averager.step():
            pass
        results.put(("no error", 0.0))
    except ExchangeError as error:
        results.put((str(error), time.monotonic() - start))


def test_killed_peer_fails_the_exchange_with_a_clear_error(tmp_path: Path) -> None:
    results = mp.get_context("fork").SimpleQueue()
    exitcodes = fork_ranks(_exchange_with_dying_peer, 2, str(tmp_path / "store"), results, timeout=60)
    assert exitcodes == [0, -signal.SIGKILL], exitcodes
    message, waited = results.get()
    assert "EASGD exchange at step 1 failed on rank 0" in message and "A peer may have died" in message
    assert waited < 30  # a closed connection is noticed at once, well before the timeout


# ---------------------------------------------------------------------------------------------- checkpoints


def test_atomic_checkpoint_keeps_the_old_file_when_a_save_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)

    def broken_save(obj: Any, f: Any) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))


def test_atomic_checkpoint_survives_a_crash_during_save(tmp_path: Path) -> None:
    """The writing process dies in the middle of torch.save: the target never holds a partial file."""
    path = tmp_path / "last.ckpt"
    script = f"""
import os, torch
from lightning_easgd.checkpoint.atomic_io import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({{"state_dict": {{"w": torch.ones(3)}}}}, {str(path)!r})
def dying_save(obj, f):
    f.write(b"PK partial")
    f.flush()
    os._exit(9)
torch.save = dying_save
io.save_checkpoint({{"state_dict": {{"w": torch.zeros(3)}}}}, {str(path)!r})
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, timeout=120, capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))


def test_strategy_writes_checkpoints_atomically_by_default() -> None:
    assert isinstance(EASGDStrategy().checkpoint_io, AtomicCheckpointIO)


def test_corrupt_checkpoint_is_refused_clearly(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated.ckpt is not a readable checkpoint .*truncated or corrupt"):
        EASGDStrategy().load_checkpoint(truncated)
    other = tmp_path / "other.ckpt"
    torch.save({"weights": [1, 2]}, other)
    with pytest.raises(ValueError, match="other.ckpt is not a Lightning checkpoint: it has no 'state_dict'"):
        EASGDStrategy().load_checkpoint(other)


def test_checkpoint_of_another_model_is_refused_clearly() -> None:
    strategy = EASGDStrategy()
    strategy.connect(ToyRegressor())
    with pytest.raises(ValueError, match=r"(?s)do not fit this model \(ToyRegressor\).*Missing key"):
        strategy.load_model_state_dict({"state_dict": ToyRegressor(batchnorm=True).state_dict()})


def test_bad_reliability_parameters() -> None:
    with pytest.raises(ValueError, match="on_nonfinite='skip' is invalid: choose 'raise' or 'reset'"):
        EASGDStrategy(on_nonfinite="skip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout=5 is invalid: it must be a positive datetime.timedelta"):
        EASGDStrategy(timeout=5)  # type: ignore[arg-type]


def test_sigterm_to_every_rank_stops_training_without_a_per_step_broadcast(tmp_path: Path) -> None:
    """SIGTERM to the whole job (as SLURM and torchrun send it) stops every rank promptly, although each rank
    now checks its own flag instead of Lightning's per-batch broadcast of rank 0's flag."""
    proc = subprocess.Popen([sys.executable, "tests/scripts/long_fit.py", str(tmp_path)], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "training").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)
        start = time.monotonic()
        out, _ = proc.communicate(timeout=60)
        assert time.monotonic() - start < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    # Lightning ends a SIGTERMed fit like SystemExit (status 0); training must simply have stopped, on every rank
    # (communicate() returned, so no process holds the output pipe any more).
    assert "Received SIGTERM" in out, out[-3000:]
    assert not (tmp_path / "finished").exists()
