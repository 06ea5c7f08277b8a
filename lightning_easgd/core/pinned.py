"""Page-locked (pinned) host buffers of exactly the size asked for.

``torch.empty(..., pin_memory=True)`` goes through torch's caching host allocator, which rounds every request up to
the next power of two so that freed blocks can be reused: a 5 GiB center slice pins 8 GiB, and the exchange's host
buffers could take up to twice the memory its documentation promises. These buffers are used for the whole run, so
reuse buys nothing. Instead we map anonymous memory of the size rounded up to whole pages only, page-lock it with
``cudaHostRegister`` and wrap it in a tensor without copying; the registration is undone when the last tensor
viewing it is freed, just before the pages are unmapped.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable

import torch
from torch import Tensor

PAGE = mmap.PAGESIZE
"""Granularity of the buffers: the OS pins whole pages, so a buffer occupies its size rounded up to a page."""


def _register(address: int, nbytes: int) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(address, nbytes, 0))


def _unregister(address: int) -> None:
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(address))


def pinned_span(numel: int, dtype: torch.dtype) -> int:
    """Bytes of host memory :func:`pinned_empty` page-locks for ``numel`` elements of ``dtype``."""
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return -(-nbytes // PAGE) * PAGE


def pinned_empty(numel: int, dtype: torch.dtype, *, register: Callable[[int, int], None] | None = None,
                 unregister: Callable[[int], None] | None = None) -> Tensor:
    """A zero-filled, page-locked 1-D host tensor of ``numel`` elements occupying :func:`pinned_span` bytes.

    Args:
        numel: number of elements.
        dtype: their dtype.
        register, unregister: how the pages are locked and unlocked (default ``cudaHostRegister`` and
            ``cudaHostUnregister``); tests pass recorders.
    """
    register = register or _register
    unregister = unregister or _unregister
    span = pinned_span(numel, dtype)
    if span == 0:
        return torch.zeros(0, dtype=dtype)
    pages = mmap.mmap(-1, span)  # anonymous, page-aligned and zero-filled by the OS

    class _LockedPages(ctypes.c_uint8 * span):  # type: ignore[misc,valid-type]
        """The mapping's bytes; kept alive by the tensor's storage, and unlocked before the mapping closes."""

        def __del__(self) -> None:
            unregister(ctypes.addressof(self))

    block = _LockedPages.from_buffer(pages)  # holds the mapping until the block itself goes
    register(ctypes.addressof(block), span)
    flat = torch.frombuffer(block, dtype=torch.uint8)  # the storage keeps the block alive
    itemsize = torch.empty((), dtype=dtype).element_size()
    return flat[: numel * itemsize].view(dtype)


__all__ = ["PAGE", "pinned_empty", "pinned_span"]
