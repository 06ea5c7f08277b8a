"""Comparisons of a run's weights with an independent computation, with messages that name what differs."""

from __future__ import annotations

from typing import Any

import torch


def assert_matches_replay(records: list[dict[str, Any]], expected: Any, atol: float, k: int = 1) -> None:
    """Every rank's local weights are its worker's in the replay (``expected``, workers of ``k`` ranks) and its
    center is the replay's; the center is bit-identical on every rank, the local weights within a worker."""
    for rank, rec in enumerate(records):
        worker = rank // k
        assert_close(rec["local"], expected.workers[worker], atol, f"rank {rank} (worker {worker}) local weights")
        assert_close(rec["center"], expected.center, atol, f"rank {rank} center")
        for name, value in rec["center"].items():
            assert torch.equal(value, records[0]["center"][name]), f"center {name} differs between ranks"
        for name, value in rec["local"].items():
            assert torch.equal(value, records[worker * k]["local"][name]), f"rank {rank}: {name} differs in its worker"


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float, what: str) -> None:
    for key, value in expected.items():
        assert key in actual, f"{what}: missing {key}"
        err = (actual[key].double() - value.double()).abs().max().item()
        assert err <= atol, f"{what}: {key} differs by {err:.3g} (tolerance {atol:g})"
