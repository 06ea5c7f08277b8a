"""An unusable ckpt_path is refused in the launching process, in one line, before any worker starts.

The checkpoints here are written by hand in the on-disk layout (format 2: the center in the checkpoint file, each
worker's state in ``<name>.workers/<save id>/worker_<g>.pt``), independently of the strategies that write it; a
real one is checked in tests/recipes/test_recipes_e2e.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from helpers.recipes import run_recipe
from lightning_easgd.checkpoint.preflight import UnusableCheckpointError, check_checkpoint

SAVE_ID = "000000004-0123abcd"


def _write_checkpoint(directory: Path, workers: int = 2) -> Path:
    """A format-2 checkpoint ``last.ckpt`` with ``workers`` worker files."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"last.ckpt.workers/{SAVE_ID}/worker_{g:05d}.pt" for g in range(workers)]
    section = {"format": 2, "world_size": workers, "num_workers": workers, "ranks_per_worker": 1, "tau": 2,
               "alpha": 0.9 / workers, "clock": 4, "save_id": SAVE_ID, "worker_files": names}
    path = directory / "last.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 4, "easgd": section}, path)
    for g, name in enumerate(names):
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": 2, "save_id": SAVE_ID, "worker": g, "state_dict": {"w": torch.full((3,), g)}},
                   directory / name)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _missing(tmp: Path) -> Path:
    return tmp / "nowhere" / "last.ckpt"


def _empty(tmp: Path) -> Path:
    path = tmp / "empty.ckpt"
    path.write_bytes(b"")
    return path


def _truncated(tmp: Path) -> Path:
    path = _write_checkpoint(tmp / "ckpts")
    _truncate(path)
    return path


def _missing_worker_file(tmp: Path) -> Path:
    path = _write_checkpoint(tmp / "ckpts")
    (tmp / "ckpts" / "last.ckpt.workers" / SAVE_ID / "worker_00001.pt").unlink()
    return path


# (how to make the bad checkpoint, what the one-line message must say)
BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (_missing, "does not exist"),
    "empty": (_empty, "is empty (0 bytes)"),
    "truncated": (_truncated, "cannot be loaded, it may be truncated or corrupt"),
    "missing-worker-file": (_missing_worker_file, "1 of its 2 worker files cannot be used: worker 1: worker file"),
}


def test_a_complete_checkpoint_passes(tmp_path: Path) -> None:
    check_checkpoint(_write_checkpoint(tmp_path), entries=("state_dict",))


@pytest.mark.parametrize("case", sorted(BAD))
def test_an_unusable_checkpoint_is_refused_in_one_line_naming_the_file(case: str, tmp_path: Path) -> None:
    make, expected = BAD[case]
    path = make(tmp_path)
    with pytest.raises(UnusableCheckpointError) as refused:
        check_checkpoint(path, entries=("state_dict",))
    message = str(refused.value)
    assert message.startswith(f"ckpt_path {path}") and expected in message and "\n" not in message, message


def test_worker_file_problems_name_each_file(tmp_path: Path) -> None:
    path = _write_checkpoint(tmp_path, workers=3)
    workers = tmp_path / "last.ckpt.workers" / SAVE_ID
    _truncate(workers / "worker_00000.pt")
    (workers / "worker_00002.pt").write_bytes((workers / "worker_00001.pt").read_bytes())  # worker 1's state
    with pytest.raises(UnusableCheckpointError) as refused:
        check_checkpoint(path)
    message = str(refused.value)
    assert "2 of its 3 worker files cannot be used" in message and "\n" not in message
    assert f"worker 0: worker file {workers / 'worker_00000.pt'} cannot be loaded" in message
    assert (f"worker 2: worker file {workers / 'worker_00002.pt'} does not belong to this checkpoint (it is save "
            f"'{SAVE_ID}', worker 1; expected save '{SAVE_ID}', worker 2)") in message
    assert "worker 1:" not in message


def test_a_damaged_section_or_a_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {}, "easgd": {"format": 7}}, path)
    with pytest.raises(UnusableCheckpointError, match=r"^ckpt_path .*x\.ckpt: the checkpoint's 'easgd' section has an "
                       "unknown format"):
        check_checkpoint(path)
    torch.save({"model": {}}, path)
    check_checkpoint(path)  # a Fabric checkpoint holds what fabric.save was given
    with pytest.raises(UnusableCheckpointError, match="is not a Lightning checkpoint: it has no 'state_dict' entry"):
        check_checkpoint(path, entries=("state_dict",))
    torch.save([1, 2], path)
    with pytest.raises(UnusableCheckpointError, match="holds a list, not a dictionary"):
        check_checkpoint(path)
    with pytest.raises(UnusableCheckpointError, match="is a directory, not a checkpoint file"):
        check_checkpoint(tmp_path)


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_recipe_refuses_before_launching_and_leaves_no_run_dir(case: str, tmp_path: Path) -> None:
    make, expected = BAD[case]
    path = make(tmp_path)
    run_dir = tmp_path / "run"
    args = ["data=synthetic", "trainer=cpu", "trainer.devices=2", f"ckpt_path={path}", f"hydra.run.dir={run_dir}"]
    result = run_recipe("cifar10", args, cwd=tmp_path, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    lines = [line for line in output.splitlines() if f"ckpt_path {path}" in line]
    assert len(lines) == 1 and expected in lines[0], output[-3000:]
    assert "UnusableCheckpointError" in lines[0]
    assert "Starting with 2 processes" not in output and "distributed_backend" not in output  # no worker started
    assert not run_dir.exists()
