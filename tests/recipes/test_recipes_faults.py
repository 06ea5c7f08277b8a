"""Recovery end to end under torchrun: a killed worker, and resuming with another number of workers.

The recipe resumes on its own (``ckpt_path=auto``) from its run directory's ``last.ckpt``; nothing passes a path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from helpers.bounded import run_bounded
from helpers.recipes import FAST, REPO, clean_env

RECIPE = str(REPO / "recipes" / "cifar10.py")


def _torchrun(workers: int, args: list[str], cwd: Path, max_restarts: int = 0, timeout: float = 240) -> str:
    env = clean_env()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               f"--max-restarts={max_restarts}", RECIPE, *args]
    result = run_bounded(command, cwd=cwd, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def _args(run_dir: Path, workers: int, epochs: int, batches: int = 3) -> list[str]:
    fast = [a for a in FAST if not a.startswith(("trainer.devices", "trainer.max_epochs", "trainer.limit_train"))]
    return ["data=synthetic", *fast, f"trainer.devices={workers}", f"trainer.max_epochs={epochs}",
            f"trainer.limit_train_batches={batches}", f"hydra.run.dir={run_dir}"]


def _center(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]


def test_killed_worker_restarts_and_resumes_to_the_uninterrupted_center(tmp_path: Path) -> None:
    _torchrun(2, _args(tmp_path / "straight", 2, 3), tmp_path)
    # Rank 1 dies before step 4 (epoch 1 of 3, 3 steps per epoch); torchrun restarts both workers.
    output = _torchrun(2, [*_args(tmp_path / "crashed", 2, 3),
                           "+callbacks.kill._target_=helpers.fault_injection.KillOnce",
                           "+callbacks.kill.rank=1", "+callbacks.kill.step=4"], tmp_path, max_restarts=1)
    # (Whether rank 0 reports the broken exchange or torchrun stops it first is a race; tests/test_reliability.py
    # checks the survivor's error deterministically.)
    assert f"Resuming from {tmp_path / 'crashed' / 'checkpoints' / 'last.ckpt'}" in output
    straight, crashed = _center(tmp_path / "straight"), _center(tmp_path / "crashed")
    for key, value in straight.items():
        assert torch.allclose(crashed[key].float(), value.float(), atol=1e-6), key
    assert torch.load(tmp_path / "crashed" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 2


def test_resume_with_more_workers_starts_the_new_one_from_the_center(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _torchrun(2, _args(run_dir, 2, 1), tmp_path)
    before = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    output = _torchrun(3, _args(run_dir, 3, 2), tmp_path)
    assert "the checkpoint has 2 workers and this run has 3" in output
    assert "starting from the center: worker 2" in output
    after = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert before["easgd"]["world_size"] == 2 and after["easgd"]["world_size"] == 3
    assert after["easgd"]["alpha"] == pytest.approx(0.3) and len(after["easgd"]["worker_files"]) == 3
    assert after["epoch"] == 1 and after["global_step"] > before["global_step"]


# Two classes of nearly noiseless templates: the center's val/acc is 1.0 after the first epoch and cannot improve.
PLATEAU = ["data.noise=0.05", "data.num_classes=2", "module.top_k=null", "optimizer.lr=0.05"]
KILL_AT_STEP_10 = ["+callbacks.kill._target_=helpers.fault_injection.KillOnce", "+callbacks.kill.rank=1",
                   "+callbacks.kill.step=10", "+callbacks.start._target_=helpers.fault_injection.ReportStart"]


def _killed_on_a_plateau(run_dir: Path, cwd: Path, extra: list[str]) -> tuple[str, dict]:
    """4 epochs of 4 steps; rank 1 dies before step 10 (epoch 2) and torchrun restarts both workers."""
    output = _torchrun(2, [*_args(run_dir, 2, 4, batches=4), *PLATEAU, *KILL_AT_STEP_10, *extra], cwd, max_restarts=1)
    assert "fit starts at epoch 0, step 0" in output
    assert f"Resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in output
    checkpoints = run_dir / "checkpoints"
    # val/acc reached 1.0 in epoch 0 and never improved: the best checkpoint is still epoch 0's (each checkpoint
    # with its workers' files beside it) ...
    assert sorted(path.name for path in checkpoints.iterdir()) == [
        "epoch_000.ckpt", "epoch_000.ckpt.workers", "last.ckpt", "last.ckpt.workers"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")
    best = next(state for key, state in last["callbacks"].items() if "val/acc" in key)
    assert best["best_model_score"] == 1.0 and best["best_model_path"].endswith("epoch_000.ckpt")
    # ... while last.ckpt is the end of training, which test_ckpt=last tested.
    assert (last["epoch"], last["global_step"]) == (3, 16)
    assert f"Center test metrics (checkpoint {checkpoints / 'last.ckpt'})" in output
    return output, last


def test_last_ckpt_is_the_newest_epoch_end_on_a_plateau_and_a_restart_resumes_from_it(tmp_path: Path) -> None:
    # Lightning's save_last on the val/acc checkpoint would have left last.ckpt at epoch 0 (step 4).
    output, _ = _killed_on_a_plateau(tmp_path / "run", tmp_path, [])
    assert "fit starts at epoch 2, step 8" in output  # the end of epoch 1: the 2 steps since then are lost


def test_last_ckpt_every_n_steps_loses_at_most_n_steps(tmp_path: Path) -> None:
    output, _ = _killed_on_a_plateau(
        tmp_path / "run", tmp_path, ["callbacks.last_checkpoint_steps.every_n_train_steps=3"]
    )
    assert "fit starts at epoch 2, step 9" in output  # step 9, written mid-epoch: 1 step lost
