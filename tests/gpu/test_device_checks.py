"""The device check's correctness checks on CUDA at full size (``cuda`` marker; skipped without a device).
``python -m benchmarks.gpu_check`` runs each as its own bounded pytest step; the CPU rehearsal of the same
functions at tiny size is in test_gpu_check.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from device_checks import CHECKS, FULL, CheckFailed

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", list(CHECKS))
def test_device_check(name: str) -> None:
    try:
        detail, metrics = CHECKS[name](torch.device("cuda"), FULL)
    except CheckFailed as failed:
        detail, metrics = failed.detail, failed.metrics
        _keep(name, metrics)
        pytest.fail(detail, pytrace=False)
    _keep(name, metrics)
    print(detail)


def _keep(name: str, metrics: dict[str, object]) -> None:
    """Hand the metrics to the device check's runner, which names the folder (pytest reports only pass or fail)."""
    folder = os.environ.get("EASGD_GPU_CHECK_METRICS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{name}.json").write_text(json.dumps(metrics, default=str))
