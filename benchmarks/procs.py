"""Run benchmark worker processes side by side, bounded in time, killing whole process groups on a hang."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from benchmarks.netlab import Host


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse counts below 1 and periods that do not divide the timed window (it must hold whole periods).
    Options left at None are not used by the command and not checked."""
    for name in ("processes", "steps", "warmup", "batch_size", "rounds"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value} is invalid: it must be >= 1")
    if getattr(args, "taus", None) is not None and any(t < 1 or args.steps % t for t in args.taus):
        parser.error(f"--taus {args.taus} is invalid for --steps {args.steps}: every tau must be >= 1 and divide the "
                     "number of timed steps, so that each window holds whole communication periods")


def run_all(commands: list[list[str]], env: dict[str, str], timeout: float) -> None:
    """Start every command at once and wait for all; raise SystemExit with the output of one that fails."""
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
        for cmd in commands
    ]
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise SystemExit(f"benchmark process failed ({' '.join(proc.args)}):\n{out[-4000:]}")
    except subprocess.TimeoutExpired:
        raise SystemExit(f"a benchmark process hung for {timeout:.0f} s and was killed") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_bounded(command: list[str], timeout: float, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> tuple[int | None, str]:
    """Run ``command`` in a session (so a process group) of its own for at most ``timeout`` seconds.

    Returns its exit status and output (stdout and stderr together), or ``None`` and what it printed so far when it
    ran out of time: then the whole group is killed, grandchildren included. The group is also killed when this
    process is interrupted while waiting (SIGINT, or SIGTERM turned into SystemExit by the caller).
    """
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(0.01, timeout))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out or ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # what the group left running after its leader exited


def launch_env(hosts: list[Host], port: int, processes: int) -> dict[str, str]:
    """The environment every worker of a multi-"node" launch shares: rendezvous on the first host, one thread
    per worker's share of the cores, quiet warnings."""
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes)),
            "PYTHONWARNINGS": "ignore", "MASTER_ADDR": hosts[0].address, "MASTER_PORT": str(port),
            "WORLD_SIZE": str(processes)}


def node_env(node_rank: int, host: Host, local_rank: int = 0) -> dict[str, str]:
    """What one worker needs on top of :func:`launch_env`: its node and local rank, and its own interface for gloo
    and TensorPipe (they would otherwise pick the address the hostname resolves to: the loopback)."""
    return {"NODE_RANK": str(node_rank), "LOCAL_RANK": str(local_rank), "GLOO_SOCKET_IFNAME": host.interface,
            "TP_SOCKET_IFNAME": host.interface}


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per dict, the first row's keys as the header."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
