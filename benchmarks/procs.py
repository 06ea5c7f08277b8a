"""Run benchmark worker processes side by side, bounded in time, killing whole process groups on a hang."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse counts below 1 and periods that do not divide the timed window (it must hold whole periods)."""
    for name in ("processes", "steps", "warmup", "batch_size", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: it must be >= 1")
    if any(t < 1 or args.steps % t for t in args.taus):
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
