"""Run a command the way tests must: in its own session, its output collected, bounded in time.

A hung collective must fail a test, not CI: on timeout the whole process group (a launcher and every worker it
started) is killed and the test fails with the end of the output.
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

# Variables a Lightning launcher leaves behind that would make a child believe it is already a worker.
LAUNCHER_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
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
