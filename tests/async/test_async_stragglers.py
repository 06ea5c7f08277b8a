"""One worker sleeps 3x its step time after every step: the asynchronous workers keep their pace, the synchronous
ones fall to the straggler's. benchmarks/stragglers.py measures the actual ratios; the bounds here are loose, and
the firm ones compare rank 0 with the straggler within one run, because the machine running the tests is shared
and small (rates of separate runs vary by 2x under load)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.stragglers import measure

SETTINGS = {"steps": 72, "warmup": 8, "tau": 8, "factor": 3.0, "width": 512, "batch_size": 64}
# How far a synchronous worker can run ahead of the straggler: it blocks at every exchange, waiting one step late
# (the all-reduce overlaps the next step), so it is at most tau + 1 steps ahead. Over a window of W steps its rate
# is then at most W / (W - tau - 1) times the straggler's (1.16 here; 1.39 with the earlier 32-step window, which
# made a fixed 1.25 bound fail now and then).
WINDOW = SETTINGS["steps"] - SETTINGS["warmup"]
SYNC_LEAD = WINDOW / (WINDOW - SETTINGS["tau"] - 1)


CONFIGS = [("easgd_async", False), ("easgd_async", True), ("easgd", False), ("easgd", True)]


def test_async_keeps_pace_sync_falls_to_straggler(tmp_path: Path) -> None:
    # Two interleaved rounds; per configuration the run in which rank 0 was fastest (load spikes from other users
    # only ever slow a run down, and interleaving keeps one spike from hitting both runs of a configuration).
    best: dict[tuple[str, bool], tuple[float, float]] = {}
    for i in range(2):
        for strategy, slowed in CONFIGS if i == 0 else reversed(CONFIGS):
            rates = measure(strategy, 2, slowed, out=tmp_path / f"{strategy}{slowed}{i}", **SETTINGS)
            best[(strategy, slowed)] = max(rates, best.get((strategy, slowed), rates))
    (async_fast, _), (async_slowed, async_straggler), (sync_fast, _), (sync_slowed, sync_straggler) = (
        best[c] for c in CONFIGS
    )
    report = (f"rank 0 steps/s: async {async_fast:.1f} -> {async_slowed:.1f} (straggler {async_straggler:.1f}); "
              f"sync {sync_fast:.1f} -> {sync_slowed:.1f} (straggler {sync_straggler:.1f})")
    print(report)
    # Within one run: the asynchronous worker outruns the straggler; the synchronous one is held to its pace.
    assert async_slowed >= 1.5 * async_straggler, report
    assert sync_slowed <= 1.1 * SYNC_LEAD * sync_straggler, report
    # Across runs (loose versions of ">= 90 %" and "falls to the straggler's pace").
    assert async_slowed >= 0.5 * async_fast, report
    assert sync_slowed <= 0.8 * sync_fast, report
