"""The helpers that keep multi-process tests bounded: a hung or failing child must fail its test, quickly and with
what went wrong, not hang CI or pass."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from helpers.bounded import call_in_fork, fork_ranks


def _rank(rank: int, out: str, behaviour: dict[int, str]) -> None:
    action = behaviour.get(rank, "ok")
    if action == "hang":
        time.sleep(60)
    elif action == "raise":
        raise ValueError(f"rank {rank} gives up")
    elif action == "exit":
        os._exit(3)
    Path(out, f"rank{rank}").write_text(str(os.getpid()))


def test_fork_ranks_runs_every_rank_in_its_own_process(tmp_path: Path) -> None:
    assert fork_ranks(_rank, 3, str(tmp_path), {2: "exit"}, timeout=30) == [0, 0, 3]
    pids = {(tmp_path / f"rank{r}").read_text() for r in range(2)}
    assert len(pids) == 2 and str(os.getpid()) not in pids


def test_fork_ranks_kills_a_hung_rank_and_reports_it(tmp_path: Path) -> None:
    start = time.monotonic()
    assert fork_ranks(_rank, 2, str(tmp_path), {1: "hang"}, timeout=2) == [0, None]
    assert time.monotonic() - start < 20  # killed, not waited for


def test_fork_ranks_fails_the_test_with_a_ranks_traceback(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception, match=r"(?s)rank 1 of 3 raised:.*ValueError: rank 1 gives up"):
        fork_ranks(_rank, 3, str(tmp_path), {1: "raise", 2: "raise"}, timeout=30)


def test_fork_ranks_waits_only_for_the_ranks_named(tmp_path: Path) -> None:
    start = time.monotonic()
    assert fork_ranks(_rank, 2, str(tmp_path), {0: "hang"}, timeout=30, wait_for=[1]) == [None, 0]
    assert time.monotonic() - start < 20


def test_call_in_fork_returns_the_childs_value_or_fails() -> None:
    assert call_in_fork(lambda: os.getpid(), timeout=30) != os.getpid()
    with pytest.raises(pytest.fail.Exception, match=r"(?s)raised in a forked child:.*ZeroDivisionError"):
        call_in_fork(lambda: 1 / 0, timeout=30)
    with pytest.raises(pytest.fail.Exception, match=r"did not finish within 1 s"):
        call_in_fork(lambda: time.sleep(60), timeout=1)
