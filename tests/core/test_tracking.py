"""Distance statistics: whether they are measured per tensor is the exchange's configuration, the same on every
rank, so a rank that tracks and one that does not still run all-reduces of one size (issue #18 item 8)."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from helpers.bounded import fork_ranks
from lightning_easgd.core import ElasticAverager, ExchangeConfig


def _run(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    x = {"a": torch.zeros(3, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    avg = ElasticAverager(list(x.items()), ExchangeConfig(tau=2, alpha=0.25, per_tensor_distances=True,
                                                          timeout=timedelta(seconds=30)))
    if rank == 0:  # only rank 0 asks for statistics: a per-rank choice that used to change the all-reduce
        avg.track_distances()
    for _ in range(3):  # steps 0, 1, 2: the exchange at the start of step 2
        with avg.step():
            for value in x.values():
                value.add_(rank + 1.0)
    torch.save({"stats": avg.pop_stats(), "x": x, "center": [v.clone() for v in avg.center_values()]},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_ranks_that_track_and_ranks_that_do_not_exchange_alike(tmp_path: Path) -> None:
    assert fork_ranks(_run, 2, str(tmp_path / "store"), str(tmp_path), timeout=90) == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # At the exchange (clock 2) worker g is at 2(g+1) everywhere and the center at 0: d_g = 2(g+1) per element.
    (stats,) = ranks[0]["stats"]
    assert stats.step == 2
    assert stats.distances.tolist() == pytest.approx([2 * math.sqrt(5), 4 * math.sqrt(5)], rel=1e-12)
    assert stats.layer_distances.flatten().tolist() == pytest.approx(
        [2 * math.sqrt(3), 2 * math.sqrt(2), 4 * math.sqrt(3), 4 * math.sqrt(2)], rel=1e-12)
    assert ranks[1]["stats"] == []
    # The exchange itself: x̃ = α·(2 + 4) = 1.5; worker g: 2(g+1) + (g+1) − α·2(g+1) after its step 2.
    for g, rank in enumerate(ranks):
        assert [c.tolist() for c in rank["center"]] == [[1.5] * 3, [1.5] * 2]
        expected = 3.0 * (g + 1) - 0.25 * 2 * (g + 1)
        assert [v.tolist() for v in rank["x"].values()] == [[expected] * 3, [expected] * 2]


def test_per_tensor_is_the_configs_choice() -> None:
    averager = ElasticAverager([("w", torch.zeros(3))], tau=1, alpha=0.5)
    with pytest.raises(ValueError, match=r"track_distances\(per_tensor=True\) differs from this exchange's "
                                         r"per_tensor_distances=False: .* "
                                         r"\(EASGDStrategy\(per_tensor_distances=\.\.\.\)\)$"):
        averager.track_distances(per_tensor=True)
    averager.track_distances(per_tensor=False)  # agrees with the config: accepted
    with averager.step():
        pass
    with averager.step():  # clock 1: an exchange with itself
        pass
    (stats,) = averager.pop_stats()
    assert stats.layer_distances is None
