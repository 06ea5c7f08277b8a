"""Copies between a worker's device buffers and the host buffers the asynchronous center's RPC sends and receives.

On CUDA the copies run on a side stream, ordered after the compute stream's work by an event, into and out of
pinned (page-locked) host memory, so that they are real DMA transfers: a download waits only for the copies and
the work queued before them (never a full device synchronisation, never work queued later), and an upload costs
the host no wait at all, the compute stream waiting on the device for the copies it needs. On the CPU they are
plain copies.

Every event the host waits on is created with ``blocking=True``: its ``synchronize()`` puts the host thread to sleep
until the device signals it, instead of spinning a CPU core that the data loader and other ranks need.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_easgd.core.pinned import pinned_empty


def blocking_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """An event recorded on ``stream`` now, whose ``synchronize()`` sleeps instead of busy-waiting on the host."""
    event = torch.cuda.Event(blocking=True)
    event.record(stream)
    return event


def copy_to_host(dst: Tensor, src: Tensor) -> Tensor:
    """Copy the CUDA tensor ``src`` into the pinned host tensor ``dst`` and return ``dst`` once the values are there.

    The copy is queued on ``src``'s device's current stream (where torch runs a copy out of that device, also when
    another device is current), so the event it waits on is recorded on that stream: recorded on the current
    device's stream instead, it would fire without waiting for the copy, and ``dst`` would be read stale.
    """
    dst.copy_(src, non_blocking=True)
    blocking_event(torch.cuda.current_stream(src.device)).synchronize()
    return dst


class HostStaging:
    """Moves slices of device tensors to and from host buffers for one worker.

    Args:
        devices: the devices of the worker's flat buffers; CUDA ones get a side stream each, and host buffers are
            pinned when any is a CUDA device.
    """

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self._streams = {d: torch.cuda.Stream(d) for d in dict.fromkeys(devices) if d.type == "cuda"}
        self.pinned = bool(self._streams)
        self._uploads: list[torch.cuda.Event] = []  # the host sources of the last upload are read until these fire

    def empty(self, numel: int, dtype: torch.dtype) -> Tensor:
        """A zero-filled host buffer, pinned (to its exact size) when the worker trains on CUDA, so that copies to and
        from it are asynchronous."""
        return pinned_empty(numel, dtype) if self.pinned else torch.zeros(numel, dtype=dtype)

    def download(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Copy every ``(host, device)`` pair's device tensor into its host tensor; return when all are there.

        The copies follow everything already queued on the current stream (which wrote the device values).
        """
        on_cuda = [(dst, src) for dst, src in pairs if src.device in self._streams]
        for dst, src in pairs:
            if src.device not in self._streams:
                dst.copy_(src)
        events = []
        for device, stream in self._streams.items():
            mine = [(dst, src) for dst, src in on_cuda if src.device == device]
            if not mine:
                continue
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for dst, src in mine:
                    dst.copy_(src, non_blocking=True)
                events.append(blocking_event(stream))
        for event in events:
            event.synchronize()

    def upload(self, pairs: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Copy every ``(device, host)`` pair's host tensor into its device tensor without waiting on the host.

        The current stream waits (on the device) for the copies, so work queued after this call sees the values;
        the host sources must stay untouched until :meth:`release` (the copies may still be reading them).
        """
        self.release()
        on_cuda = [(dst, src) for dst, src in pairs if dst.device in self._streams]
        for dst, src in pairs:
            if dst.device not in self._streams:
                dst.copy_(src)
        for device, stream in self._streams.items():
            mine = [(dst, src) for dst, src in on_cuda if dst.device == device]
            if not mine:
                continue
            current = torch.cuda.current_stream(device)
            stream.wait_stream(current)  # earlier readers of the destinations finish first
            with torch.cuda.stream(stream):
                for dst, src in mine:
                    dst.copy_(src, non_blocking=True)
                event = blocking_event(stream)
            current.wait_event(event)
            self._uploads.append(event)

    def release(self) -> None:
        """Wait until the last upload has read its host sources, so that they can be overwritten (usually long
        done: uploads are τ steps apart)."""
        for event in self._uploads:
            event.synchronize()
        self._uploads = []
