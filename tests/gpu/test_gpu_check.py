"""``python -m benchmarks.gpu_check``: tiny versions of every check on the CPU (the numbers they compare, the
PASS/FAIL logic), the table and CSV, the per-check subprocess, and the refusal where no CUDA device is visible."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # benchmarks/ is not part of the installed package

from benchmarks import gpu_check  # noqa: E402
from benchmarks.gpu_check import FAIL, PASS, SKIP, TINY, Result  # noqa: E402

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_cli_refuses_without_cuda_in_one_line() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu_check: refused: no CUDA device is visible (torch.cuda.is_available() is False); run it on a machine "
        "with an NVIDIA GPU"
    ]
    assert proc.stdout == ""


def test_fake_world_of_two_matches_the_replay() -> None:
    result = gpu_check.run_check("a_fake_world", CPU, TINY)
    assert result.status == PASS, result.detail
    assert max(result.metrics[k] for k in ("worker0_max_diff", "worker1_max_diff", "center_max_diff")) <= 1e-12
    assert result.metrics["centers_max_diff_between_workers"] == 0.0


def test_fake_world_fails_when_the_collective_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: an all-reduce that forgets the other worker's part leaves the center off the replay."""
    def alone(self: Any, tensor: torch.Tensor, op: Any = None, group: Any = None, async_op: bool = False) -> Any:
        return self._real["all_reduce"](tensor, group=group, async_op=async_op)

    monkeypatch.setattr(gpu_check.FakeTwoRanks, "_all_reduce", alone)
    result = gpu_check.run_check("a_fake_world", CPU, TINY)
    assert result.status == FAIL and "differ from the CPU replay" in result.detail


def test_shared_device_and_precision_checks_run_tiny_on_the_cpu() -> None:
    shared = gpu_check.run_check("b_shared_gpu_gloo", CPU, TINY)
    assert shared.status == PASS, shared.detail
    assert shared.metrics["sync_center_max_diff"] == 0.0 and shared.metrics["async_center_max_diff"] == 0.0
    precisions = gpu_check.run_check("c_lightning_precisions", CPU, TINY)
    assert precisions.status == PASS, precisions.detail
    assert set(precisions.metrics) == {f"{p}_resume_max_diff" for p in TINY.c_precisions}


def test_memory_check_runs_with_the_center_on_the_host() -> None:
    result = gpu_check.run_check("d_exchange_memory", CPU, TINY)
    assert result.status == PASS and result.metrics["parameters"] == TINY.d_parameters
    # The center and d_i live on the host; the device holds one bucket-sized staging buffer.
    assert result.metrics["device_buffer_bytes"] <= result.metrics["bucket_bytes"] < result.metrics["buffer_bytes"]


def test_overhead_check_reports_ratios_and_judges_them() -> None:
    result = gpu_check.run_check("e_resnet50_overhead", CPU, TINY)
    assert result.status in (PASS, FAIL)
    assert {f"ratio_tau{t}" for t in TINY.e_taus} <= set(result.metrics)
    assert gpu_check.overhead_verdict({1: 1.19, 4: 1.09, 16: 1.04})[0] == PASS
    status, detail = gpu_check.overhead_verdict({1: 1.1, 8: 1.12, 16: 1.06})
    assert status == FAIL and "tau=8: 1.120 > 1.10" in detail and "tau=16: 1.060 > 1.05" in detail


def test_a_check_that_raises_is_a_fail_naming_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(device: torch.device, sizes: Any) -> Result:
        raise RuntimeError("CUDA error: an illegal memory access\nmore")

    monkeypatch.setitem(gpu_check.CHECKS, "a_fake_world", broken)
    result = gpu_check.run_check("a_fake_world", CPU, TINY)
    assert (result.status, result.detail) == (FAIL, "RuntimeError: CUDA error: an illegal memory access")


def test_isolated_runs_table_and_csv(tmp_path: Path) -> None:
    isolated = gpu_check.run_isolated("d_exchange_memory", "cpu", "tiny", timeout=120)
    direct = gpu_check.run_check("d_exchange_memory", CPU, TINY)
    assert (isolated.check, isolated.status, isolated.detail) == (direct.check, direct.status, direct.detail)
    assert isolated.status == PASS
    skipped = Result("b_shared_gpu", SKIP, "needs two processes", {}, 0.0)
    hung = gpu_check.run_isolated("a_fake_world", "cpu", "tiny", timeout=0.01)
    assert hung.status == FAIL and hung.detail == "did not finish within --timeout 0.01 s"
    results = [isolated, skipped, hung, Result("e_resnet50_overhead", PASS, "ratios", {"ratio_tau1": 1.01}, 3.0)]
    text = gpu_check.table(results)
    assert text.splitlines()[-1] == "2 PASS, 1 FAIL, 1 SKIP"
    assert any(line.startswith("a_fake_world") and " FAIL " in line for line in text.splitlines())
    gpu_check.save_csv(results, tmp_path / "out" / "gpu_check.csv")
    rows = list(csv.DictReader(open(tmp_path / "out" / "gpu_check.csv")))
    assert [(r["check"], r["status"]) for r in rows] == [(r.check, r.status) for r in results]
    assert rows[3]["metrics"] == '{"ratio_tau1": 1.01}'


@pytest.mark.cuda
@needs_cuda
def test_tiny_checks_pass_on_cuda() -> None:
    for name in ("a_fake_world", "b_shared_gpu_gloo", "c_lightning_precisions"):
        result = gpu_check.run_check(name, torch.device("cuda"), TINY)
        assert result.status == PASS, f"{name}: {result.detail}"
