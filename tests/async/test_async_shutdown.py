"""Clean shutdown of asynchronous EASGD with the popen launcher: at the end of fit, on an exception in either rank,
and on KeyboardInterrupt (SIGINT to the whole process group, as Ctrl+C sends). Each run is a subprocess in its own
session; a hung thread or process shows as a timeout, and no process of the session may outlive the run."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from helpers.bounded import Finished, run_bounded

REPO = Path(__file__).resolve().parents[2]
SCRIPT = "tests/async/scripts/async_fit.py"


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _run(tmp_path: Path, mode: str, timeout: float = 120) -> Finished:
    result = run_bounded([sys.executable, SCRIPT, str(tmp_path), mode], cwd=REPO, timeout=timeout)
    leftover = _session_members(result.pid)
    if leftover:
        os.killpg(result.pid, signal.SIGKILL)
    assert not leftover, f"{mode}: processes {leftover} outlived the run:\n{result.stdout[-3000:]}"
    return result


def test_fit_end_registered_name(tmp_path: Path) -> None:
    result = _run(tmp_path, "ok")
    assert result.returncode == 0, result.stdout[-3000:]
    for rank in (0, 1):
        assert f"THREADS rank{rank} ['MainThread'] RPC stopped" in result.stdout, result.stdout[-3000:]
    # Both ranks adopted the same consistent snapshot of the center at the end of fit.
    after = [torch.load(tmp_path / f"after_fit{r}.pt") for r in (0, 1)]
    for key, value in after[0].items():
        assert torch.equal(value, after[1][key]), key


@pytest.mark.parametrize("rank", [0, 1])
def test_exception_in_one_rank(tmp_path: Path, rank: int) -> None:
    result = _run(tmp_path, f"raise{rank}")
    assert result.returncode != 0
    assert f"planned failure on rank {rank}" in result.stdout, result.stdout[-3000:]
    if rank == 1:
        # Rank 0 learns of the dead peer at its next exchange, at once (not after the 60 s timeout).
        assert "ExchangeError: EASGD center: the exchange of worker 0" in result.stdout, result.stdout[-3000:]
    assert not list(tmp_path.glob("after_fit*.pt"))


def test_keyboard_interrupt(tmp_path: Path) -> None:
    result = _run(tmp_path, "sigint")
    assert result.returncode != 0
    assert "Detected KeyboardInterrupt" in result.stdout, result.stdout[-3000:]
    assert not list(tmp_path.glob("after_fit*.pt"))
