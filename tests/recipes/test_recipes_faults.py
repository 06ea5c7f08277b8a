"""Recovery end to end under torchrun: a killed worker, and resuming with another number of workers.

The recipe resumes on its own (``ckpt_path=auto``) from its run directory's ``last.ckpt``; nothing passes a path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from bounded import run_bounded
from recipe_helpers import FAST, REPO, clean_env

RECIPE = str(REPO / "recipes" / "cifar10.py")


def _torchrun(workers: int, args: list[str], cwd: Path, max_restarts: int = 0, timeout: float = 240) -> str:
    env = clean_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env["PYTHONPATH"]])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
               f"--max-restarts={max_restarts}", RECIPE, *args]
    result = run_bounded(command, cwd=cwd, env=env, timeout=timeout)
    assert result.returncode == 0, result.stdout[-4000:]
    return result.stdout


def _args(run_dir: Path, workers: int, epochs: int) -> list[str]:
    fast = [a for a in FAST if not a.startswith(("trainer.devices", "trainer.max_epochs"))]
    return ["data=synthetic", *fast, f"trainer.devices={workers}", f"trainer.max_epochs={epochs}",
            f"hydra.run.dir={run_dir}"]


def _center(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]


def test_killed_worker_restarts_and_resumes_to_the_uninterrupted_center(tmp_path: Path) -> None:
    _torchrun(2, _args(tmp_path / "straight", 2, 3), tmp_path)
    # Rank 1 dies before step 4 (epoch 1 of 3, 3 steps per epoch); torchrun restarts both workers.
    output = _torchrun(2, [*_args(tmp_path / "crashed", 2, 3), "+callbacks.kill._target_=fault_injection.KillOnce",
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
