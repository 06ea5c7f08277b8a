"""Run benchmark worker processes side by side, bounded in time, killing whole process groups on a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import time


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
