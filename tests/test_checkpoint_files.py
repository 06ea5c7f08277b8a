"""Checkpoints that scale: every worker's state in its own file, written by that worker; old checkpoints load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from conftest import assert_close, fit_fork
from toy import ToyRegressor, make_dataset

from lightning_easgd import EASGDStrategy

FIXTURES = Path(__file__).parent / "fixtures"


def test_format_1_checkpoint_resumes_exactly(tmp_path: Path, messages: Any) -> None:
    """A checkpoint with the workers embedded (made by the code before worker files; see
    fixtures/make_legacy_checkpoint.py) resumes to what the uninterrupted run of that code gave."""
    expected = torch.load(FIXTURES / "legacy_format1_expected.pt", weights_only=True)
    resumed = ToyRegressor(lr=0.05, momentum=0.9, nesterov=True, dropout=0.2)
    _, records = fit_fork(resumed, make_dataset(24), tmp_path, p=2, epochs=2, batch_size=4,
                          ckpt_path=str(FIXTURES / "legacy_format1.ckpt"),
                          strategy=EASGDStrategy(tau=2, start_method="fork"))
    for rank, rec in enumerate(records):
        assert_close(rec["local"], expected["local"][rank], 1e-10, f"worker {rank} after resume")
        assert_close(rec["center"], expected["center"], 1e-10, "center after resume")
        momentum = [s["momentum_buffer"] for s in rec["optim"][0]["state"].values()]
        assert_close(dict(enumerate(momentum)), dict(enumerate(expected["momentum"][rank])), 1e-10, "momentum")
    assert not torch.equal(expected["local"][0]["net.0.weight"], expected["local"][1]["net.0.weight"])
