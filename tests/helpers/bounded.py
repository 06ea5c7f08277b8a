"""Run a command the way tests must: in its own session, its output collected, bounded in time.

A hung collective must fail a test, not CI: on timeout the whole process group (a launcher and every worker it
started) is killed and the test fails with the end of the output.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

import pytest

# Variables a Lightning launcher leaves behind that would make a child believe it is already a worker.
LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")
TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


def child_env() -> dict[str, str]:
    """This process's environment without launcher variables, with the checkout and tests/helpers importable (the
    scripts under tests/ import ``helpers`` as the tests do through pytest's pythonpath)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), str(REPO), env.get("PYTHONPATH")]))
    return env


@dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str  # stdout and stderr together
    pid: int  # also the id of the session and process group the command ran in


def run_bounded(command: list[str], *, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> Finished:
    """Run ``command`` to completion or kill its process group after ``timeout`` seconds and fail the test."""
    if env is None:
        env = child_env()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} hung for {timeout:g} s:\n{out[-3000:]}")
    return Finished(proc.returncode, out, proc.pid)


def call_in_fork(function: Callable[[], T], *, timeout: float) -> T:
    """Return ``function()`` computed in a forked child, killed after ``timeout`` seconds (failing the test).

    For code that leaves threads or communicators behind in the process that runs it (two threads driving gloo
    groups, say): run in this pytest process, such code has left later forks of it (Lightning's fork launcher)
    hanging or crashing inside torch ops. The child inherits everything set up before the call, monkeypatches
    included; its result comes back pickled, and an exception in it fails the test with the child's traceback.
    """
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_send_outcome, args=(function, send), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            pytest.fail(f"{function!r} did not finish within {timeout:g} s in a forked child")
        ok, value = receive.recv()
    except EOFError:
        child.join(timeout=10)
        pytest.fail(f"the forked child running {function!r} died with exit code {child.exitcode} before answering")
    finally:
        if child.is_alive():
            child.kill()
        child.join(timeout=10)
        receive.close()
    if not ok:
        pytest.fail(f"{function!r} raised in a forked child:\n{value}")
    return value


def _send_outcome(function: Callable[[], object], send: Connection) -> None:
    try:
        outcome = (True, function())
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test with it
        outcome = (False, traceback.format_exc())
    send.send(outcome)
    send.close()
