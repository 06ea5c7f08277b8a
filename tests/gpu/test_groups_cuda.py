"""The synchronous averager on a CUDA device (skipped without one): no host synchronisation outside the one read
of the statistics per exchange, and the same numbers as on the CPU, with the center on the device or the host."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from lightning_easgd.core import ElasticAverager

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@contextmanager
def _no_host_waits(strict: bool) -> Iterator[None]:
    torch.cuda.set_sync_debug_mode("error" if strict else "default")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _train(device: str, **options: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Any]]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)).to(device)
    avg = ElasticAverager(list(net.named_parameters()), tau=2, alpha=0.3, per_tensor_distances=True, **options)
    avg.track_distances(per_tensor=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 5, generator=g).to(device), torch.randn(4, 1, generator=g).to(device))
               for _ in range(7)]
    for x, y in batches:
        opt.zero_grad()
        exchange = avg.exchange_due
        # What `with avg.step()` does, with CUDA's sync debug mode raising on any host wait in a plain step and in
        # the start of an exchange (a host-resident center waits on its copies by design, so not there).
        with _no_host_waits(not exchange or "center_device" not in options):
            avg._begin()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        with _no_host_waits(not exchange):  # the end of an exchange reads the statistics once
            avg._end()
    return ([p.detach().cpu() for p in net.parameters()], [c.cpu() for c in avg.center_values()],
            avg.pop_stats())


@pytest.mark.parametrize("options", [{}, {"center_device": "cpu"}])
def test_cuda_exchange_equals_cpu_without_host_waits(options: dict[str, Any]) -> None:
    local, center, stats = _train("cuda", **options)
    local_cpu, center_cpu, stats_cpu = _train("cpu")
    for got, expected in zip([*local, *center], [*local_cpu, *center_cpu]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert [s.step for s in stats] == [s.step for s in stats_cpu] == [2, 4, 6]
    for got, expected in zip(stats, stats_cpu):
        torch.testing.assert_close(got.distances, expected.distances, rtol=1e-5, atol=0)
