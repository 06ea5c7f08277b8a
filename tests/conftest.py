"""Fixtures every test gets: a clean environment (Lightning's launchers leave variables behind) and a reader of the
strategy's warnings that also sees forked workers. Shared helpers live in tests/helpers (on pytest's pythonpath)."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

import lightning_easgd  # noqa: F401  (registers the strategy names)
from helpers.launch import SEED


@pytest.fixture(autouse=True)
def _clean_env() -> Any:
    saved = dict(os.environ)
    os.environ["PL_GLOBAL_SEED"] = str(SEED)  # the DistributedSampler's seed, which the replay mirrors
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def messages(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> Any:
    """Read what the strategy logs or warns, also from forked workers (their log handlers and warning recorders
    live in the child, so the messages are printed to the inherited stderr instead)."""
    for module in ("adapter.layout", "checkpoint.routines"):
        monkeypatch.setattr(f"lightning_easgd.{module}.rank_zero_warn",
                            lambda msg, *a, **k: print(msg, file=sys.stderr))
    capfd.readouterr()
    return lambda: capfd.readouterr().err
