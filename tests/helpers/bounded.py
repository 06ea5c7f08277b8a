"""Run a command the way tests must: in its own session, its output collected, bounded in time.

A hung collective must fail a test, not CI: on timeout the whole process group (a launcher and every worker it
started) is killed and the test fails with the end of the output.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.queues import SimpleQueue
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


def fork_ranks(target: Callable[..., object], world: int, *args: object, timeout: float,
               wait_for: Sequence[int] | None = None) -> list[int | None]:
    """Run ``target(rank, *args)`` for every rank of ``world``, each in a forked child, and return their exit codes.

    The children find each other on their own (through a file store named in ``args``, say). The ranks in
    ``wait_for`` (all by default) share ``timeout`` seconds to end; then every child still running is killed and
    its exit code reported as None, so that a hung collective fails its test instead of CI. A rank that raises fails
    the test with its traceback (the lowest such rank's), whatever the others did.
    """
    context = multiprocessing.get_context("fork")
    raised = context.SimpleQueue()
    children = [context.Process(target=_run_rank, args=(target, rank, args, raised)) for rank in range(world)]
    for child in children:
        child.start()
    deadline = time.monotonic() + timeout
    for rank in range(world) if wait_for is None else wait_for:
        children[rank].join(max(0.0, deadline - time.monotonic()))
    exitcodes = [child.exitcode for child in children]
    for child in children:
        if child.is_alive():
            child.kill()
        child.join(timeout=10)
    errors = []
    while not raised.empty():
        errors.append(raised.get())
    if errors:
        rank, trace = min(errors)
        pytest.fail(f"rank {rank} of {world} raised:\n{trace}")
    return exitcodes


def _run_rank(target: Callable[..., object], rank: int, args: tuple[object, ...], raised: SimpleQueue) -> None:
    try:
        target(rank, *args)
    except BaseException:
        raised.put((rank, traceback.format_exc()))
        raise
