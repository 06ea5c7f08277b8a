"""Host waits on CUDA work, checked on the CPU with stand-ins for torch.cuda's events and streams: which stream an
event is recorded on, and that the host sleeps rather than spins while it waits."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from lightning_easgd.core import staging


class _Event:
    """Records how it was made, where it was recorded and whether the host waited on it."""

    made: ClassVar[list[_Event]] = []

    def __init__(self, blocking: bool = False, **_: Any) -> None:
        self.blocking = blocking
        self.stream: object = None
        self.waited = False
        _Event.made.append(self)

    def record(self, stream: object = None) -> None:
        self.stream = stream

    def synchronize(self) -> None:
        self.waited = True


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[_Event]:
    _Event.made = []
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"current stream of {device}")
    return _Event.made


def test_blocking_event_sleeps_on_the_given_stream(fake_cuda: list[_Event]) -> None:
    event = staging.blocking_event("side stream")  # type: ignore[arg-type]
    assert fake_cuda == [event] and event.blocking and event.stream == "side stream"


def test_copy_to_host_waits_on_the_source_devices_stream(fake_cuda: list[_Event]) -> None:
    """A model on cuda:1 while cuda:0 is current: the copy runs on cuda:1's stream, so the wait must be there."""
    log: list[str] = []
    dst = SimpleNamespace(copy_=lambda src, non_blocking: log.append(f"copy non_blocking={non_blocking}"))
    src = SimpleNamespace(device=torch.device("cuda", 1))
    assert staging.copy_to_host(dst, src) is dst  # type: ignore[arg-type]
    (event,) = fake_cuda
    assert log == ["copy non_blocking=True"]
    assert event.stream == "current stream of cuda:1" and event.blocking and event.waited
