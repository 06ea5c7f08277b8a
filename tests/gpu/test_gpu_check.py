"""``python -m benchmarks.gpu_check`` rehearsed on the CPU: every check at tiny size (the numbers they compare and
that they can fail), the plan's budget, timeouts that kill a step's whole process group and leave the results
written so far, pytest steps and their fallback, the CLI's refusals and its output folder."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import device_checks
import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_check import FAIL, PASS, SKIP, Result, Step
from helpers.bounded import call_in_fork

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=240, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_cli_refuses_without_cuda_in_one_line() -> None:
    proc = _cli(env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [(
        "gpu_check: refused: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine "
        "with an NVIDIA GPU"
    )]
    assert proc.stdout == ""


def test_refuses_torch_older_than_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "__version__", "2.10.1+cu128")
    assert gpu_check.refusal("cpu") == ("gpu_check: refused: torch 2.10.1+cu128 is older than 2.11, the oldest "
                                        "version lightning-easgd supports (docs/gpu.md)")
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert gpu_check.refusal("cpu") is None


# ---------------------------------------------------------------------------------------------------- the checks


def _fake_world() -> Result:
    """Check (a) in a forked child: its two threads drive gloo groups, which must not happen in this process (later
    forks of it, Lightning's fork launcher in other tests, have hung or crashed after it)."""
    return call_in_fork(lambda: gpu_check.run_check("a_fake_world", CPU, "tiny"), timeout=240)


def test_fake_world_of_two_matches_the_replay(tmp_path: Path) -> None:
    # A fresh interpreter, not a fork of this one: a fork of a pytest process that has run other tests' threads once
    # died here with SIGSEGV before answering (CI, lowest versions, 2026-12-07); only the tests that need
    # monkeypatches to reach the child still fork.
    result = _run_fresh("a_fake_world", tmp_path)
    assert result.status == PASS, result.detail
    for variant in device_checks.FAKE_WORLD_VARIANTS:
        assert max(result.metrics[f"{variant}_{k}"] for k in ("worker0_max_diff", "worker1_max_diff",
                                                              "center_max_diff")) <= 1e-12
        assert result.metrics[f"{variant}_centers_max_diff_between_workers"] == 0.0


def test_fake_world_fails_when_the_collective_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """An all-reduce that forgets the other worker's part leaves the center off the replay."""
    def alone(self: Any, tensor: torch.Tensor, op: Any = None, group: Any = None, async_op: bool = False) -> Any:
        return self._real["all_reduce"](tensor, group=group, async_op=async_op)

    monkeypatch.setattr(device_checks.FakeTwoRanks, "_all_reduce", alone)
    result = _fake_world()
    assert result.status == FAIL and "device_center: weights differ from the replay" in result.detail


def test_fake_world_sees_the_bfloat16_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bfloat16 variant is compared with a replay that rounds like the exchange: one that does not, fails."""
    replay = device_checks._replay_fake_world
    monkeypatch.setattr(device_checks, "_replay_fake_world", lambda *a: replay(*a[:-1], None))
    result = _fake_world()
    assert result.status == FAIL and result.detail.startswith("bf16_exchange: weights differ from the replay")


def _run_fresh(name: str, tmp_path: Path) -> Result:
    """One check in a fresh interpreter, as the device check runs it (``--one``): these checks fork their workers."""
    out = tmp_path / f"{name}.json"
    proc = _cli("--one", name, "--device", "cpu", "--size", "tiny", "--result", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return Result(**json.loads(out.read_text()))


def test_shared_device_trainer_and_fabric_checks_run_tiny(tmp_path: Path) -> None:
    shared = _run_fresh("b_shared_gpu_gloo", tmp_path)
    assert shared.status == PASS, shared.detail
    for mode in ("sync", "async", "groups"):
        assert shared.metrics[f"{mode}_max_diff_vs_cpu"] == 0.0 and shared.metrics[f"{mode}_center_spread"] == 0.0
    trainer = _run_fresh("c_trainer_precisions", tmp_path)
    assert trainer.status == PASS, trainer.detail
    assert set(trainer.metrics) == {f"{p}_resume_max_diff" for p in device_checks.TINY.c_precisions}
    fabric = _run_fresh("f_fabric_bf16_resume", tmp_path)
    assert fabric.status == PASS, fabric.detail
    assert fabric.metrics["worker_spread"] > 0


def test_memory_check_exchanges_between_two_workers_with_host_centers() -> None:
    result = gpu_check.run_check("d_exchange_memory", CPU, "tiny")
    assert result.status == PASS, result.detail
    m = result.metrics
    assert m["parameters_per_worker"] == gpu_check.TINY.d_parameters
    assert m["all_reduces_paired"] == 2 * (m["buckets"] + 1)  # 2 exchanges x (the buckets + the statistics)
    assert m["host_buffer_bytes"] == 2 * 3 * m["model_bytes"]  # per worker: center, d_i and the sum, on the host
    assert m["device_buffer_bytes"] <= m["bucket_bytes"]
    assert 2 * 3 * 4 * gpu_check.FULL.d_parameters <= gpu_check.PINNED_LIMIT  # the full size pins at most 8 GiB


def test_overhead_check_reports_ratios_and_judges_them() -> None:
    result = gpu_check.run_check("e_resnet50_overhead", CPU, "tiny")
    assert result.status in (PASS, FAIL)
    assert {f"ratio_tau{t}" for t in gpu_check.TINY.e_taus} <= set(result.metrics)
    assert gpu_check.overhead_verdict({1: 1.19, 4: 1.09, 16: 1.04})[0] == PASS
    status, detail = gpu_check.overhead_verdict({1: 1.1, 8: 1.12, 16: 1.06})
    assert status == FAIL and "tau=8: 1.120 > 1.10" in detail and "tau=16: 1.060 > 1.05" in detail


def test_a_check_that_raises_is_a_fail_naming_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(device: torch.device, sizes: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access\nmore")

    monkeypatch.setitem(device_checks.CHECKS, "a_fake_world", broken)
    result = gpu_check.run_check("a_fake_world", CPU, "tiny")
    assert (result.status, result.detail) == (FAIL, "RuntimeError: CUDA error: an illegal memory access")


# ---------------------------------------------------------------------------------------------------- the plan

HANG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has exited (in a container nobody may reap it)


def test_plan_keeps_the_budget_kills_hung_steps_and_saves_after_each(tmp_path: Path) -> None:
    out = tmp_path / "out"
    pid_file = tmp_path / "grandchild.pid"
    steps = [
        *gpu_check.plan(["d_exchange_memory"], "cpu", "tiny", out, use_pytest=False),
        Step("hang", [sys.executable, "-c", HANG, str(pid_file)], need=0, cap=4),
        *gpu_check.plan(["async_staging_tests"], "cpu", "tiny", out, use_pytest=True),
        *gpu_check.plan(["gpu_tests"], "cpu", "tiny", out, use_pytest=False),
        Step("too_long", [sys.executable, "-c", "pass"], need=10_000, cap=10),
    ]
    seen: list[list[tuple[str, str]]] = []

    def report(result: Result) -> None:  # what a window cut short right now would bring back
        seen.append([(r["check"], r["status"]) for r in _rows(out / "gpu_check.csv")])

    results = gpu_check.run_plan(steps, budget=200, out=out, header="CPU rehearsal", report=report)
    statuses = [(r.check, r.status) for r in results]
    assert statuses == [("d_exchange_memory", PASS), ("hang", FAIL), ("async_staging_tests", SKIP),
                        ("gpu_tests", SKIP), ("too_long", SKIP)]
    assert seen == [statuses[: i + 1] for i in range(len(statuses))]
    assert results[1].detail == "did not finish within 4 s; killed with its process group"
    assert not _alive(int(pid_file.read_text())), "the hung step's grandchild survived"
    assert "2 skipped of 2 tests" in results[2].detail and "needs a CUDA device" in results[2].detail
    assert results[3].detail.startswith("pytest is not importable here")
    assert results[4].detail.startswith("needs about 10000 s, ")
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["environment"] == "CPU rehearsal" and [r["status"] for r in saved["results"]] == [
        s for _, s in statuses]
    assert json.loads(_rows(out / "gpu_check.csv")[0]["metrics"])["all_reduces_paired"] > 0


def test_cli_runs_tiny_into_out(tmp_path: Path) -> None:
    """``$OUT`` is the default output folder (a device window brings it back)."""
    proc = _cli("--device", "cpu", "--size", "tiny", "--only", "d_exchange_memory", env={"OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "1 PASS, 0 FAIL, 0 SKIP"
    rows = _rows(tmp_path / "gpu_check.csv")
    assert [(r["check"], r["status"]) for r in rows] == [("d_exchange_memory", PASS)]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["results"][0]["check"] == "d_exchange_memory"
