"""Pinned host buffers are page-locked to their exact size (whole pages), not to torch's next power of two, and
unlocked when the last tensor viewing them is freed. CUDA's registration calls are replaced by recorders here."""

from __future__ import annotations

import gc

import pytest
import torch

from lightning_easgd.core import ElasticAverager, pinned
from lightning_easgd.core.pinned import PAGE, pinned_empty, pinned_span


class _Registry:
    """Stands in for cudaHostRegister/cudaHostUnregister: which ranges are locked now."""

    def __init__(self) -> None:
        self.locked: dict[int, int] = {}
        self.total = 0

    def register(self, address: int, nbytes: int) -> None:
        assert address % PAGE == 0 and nbytes % PAGE == 0 and address not in self.locked
        self.locked[address] = nbytes
        self.total += nbytes

    def unregister(self, address: int) -> None:
        del self.locked[address]


@pytest.mark.parametrize(("numel", "dtype"), [(1, torch.float32), (1024, torch.float32), (1025, torch.float32),
                                              (5 * 2**20 // 4 + 1, torch.float32), (3, torch.bfloat16)])
def test_buffers_lock_their_size_rounded_to_pages_only(numel: int, dtype: torch.dtype) -> None:
    registry = _Registry()
    t = pinned_empty(numel, dtype, register=registry.register, unregister=registry.unregister)
    nbytes = numel * t.element_size()
    ((address, locked),) = registry.locked.items()
    assert t.dtype == dtype and t.shape == (numel,) and t.data_ptr() == address
    assert locked == pinned_span(numel, dtype) == -(-nbytes // PAGE) * PAGE < nbytes + PAGE
    if nbytes > 4 * PAGE:  # torch's caching host allocator would lock the next power of two
        assert locked < 1 << (nbytes - 1).bit_length()
    assert not t.any()
    t.fill_(1)  # writable
    view = t[1:]
    del t
    gc.collect()
    assert registry.locked, "a view still uses the pages"
    del view
    gc.collect()
    assert not registry.locked


def test_host_center_pins_exactly_its_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """center_device="cpu" with CUDA present: the center and d_i (one worker: no separate sum) are locked at their
    exact sizes, in whole pages, for 5 + 7 + 30 000 odd-sized float32 elements; 2^k rounding would lock 2× more."""
    registry = _Registry()
    monkeypatch.setattr(pinned, "_register", registry.register)
    monkeypatch.setattr(pinned, "_unregister", registry.unregister)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 5000))
    avg = ElasticAverager(list(model.named_parameters()), tau=1, alpha=0.5, center_device="cpu",
                          bucket_cap_mb=100_000 / 2**20)
    slices = [*avg._center, *avg._diff]
    assert all(registry.locked.get(s.data_ptr()) == pinned_span(s.numel(), s.dtype) for s in slices)
    assert registry.total == sum(pinned_span(s.numel(), s.dtype) for s in slices)
    assert registry.total < avg.buffer_bytes + len(slices) * PAGE
    with avg.step():
        pass
    with avg.step():  # an exchange through the locked host buffers
        pass
    del avg, slices
    gc.collect()
    assert not registry.locked
