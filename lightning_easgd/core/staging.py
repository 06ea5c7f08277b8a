"""Copies between a worker's device buffers and the host buffers the asynchronous center's RPC sends and receives.

On CUDA the copies run on a side stream, ordered after the compute stream's work by an event, into and out of
pinned (page-locked) host memory, so that they are real DMA transfers: a download waits only for the copies and
the work queued before them (never a full device synchronisation, never work queued later), and an upload costs
the host no wait at all, the compute stream waiting on the device for the copies it needs. On the CPU they are
plain copies.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


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
        """A host buffer, pinned when the worker trains on CUDA (so that copies to and from it are asynchronous)."""
        return torch.empty(numel, dtype=dtype, pin_memory=self.pinned)

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
                events.append(stream.record_event())
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
                event = stream.record_event()
            current.wait_event(event)
            self._uploads.append(event)

    def release(self) -> None:
        """Wait until the last upload has read its host sources, so that they can be overwritten (usually long
        done: uploads are τ steps apart)."""
        for event in self._uploads:
            event.synchronize()
        self._uploads = []
