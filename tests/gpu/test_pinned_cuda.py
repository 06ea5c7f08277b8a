"""Exactly sized pinned buffers and the statistics' host wait on a CUDA device (``cuda`` marker; skipped without
one): the pages are really page-locked, asynchronous copies into them land before the wait returns, and a buffer
is unlocked when freed (its address can be locked again)."""

from __future__ import annotations

import gc

import pytest
import torch

from lightning_easgd.core.pinned import pinned_empty, pinned_span
from lightning_easgd.core.staging import copy_to_host

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_pinned_buffers_are_page_locked_and_copies_land_before_the_wait() -> None:
    n = 3 * 2**20 + 5  # 12 MiB + 20 bytes: the caching host allocator would lock 16 MiB
    host = pinned_empty(n, torch.float32)
    assert host.is_pinned() and pinned_span(n, torch.float32) < 16 * 2**20
    src = torch.arange(n, device="cuda", dtype=torch.float32)
    for _ in range(20):  # queue enough work that an early return would read stale values
        src = src * 1.0 + 1.0
    assert torch.equal(copy_to_host(host, src), torch.arange(n, dtype=torch.float32) + 20.0)


def test_freed_buffers_are_unlocked() -> None:
    host = pinned_empty(1000, torch.float64)
    view = host[10:20]
    del host
    gc.collect()
    assert view.is_pinned(), "a view keeps the pages locked"
    del view
    gc.collect()
    # The pages are unmapped after unlocking; a mapping of the same size usually lands at the same address, where
    # locking again would fail (cudaErrorHostMemoryAlreadyRegistered) had the first buffer not been unlocked.
    for _ in range(3):
        again = pinned_empty(1000, torch.float64)  # raises if cudaHostRegister fails
        assert again.is_pinned()
        del again
        gc.collect()
