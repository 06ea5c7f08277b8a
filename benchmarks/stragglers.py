"""Throughput of the unslowed workers when one worker straggles: synchronous against asynchronous EASGD.

    python -m benchmarks.stragglers                    # p = 2, the last worker sleeps 3x its step time
    python -m benchmarks.stragglers --workers 2 3 --steps 80 --rounds 3 --factor 3
    python -m benchmarks.stragglers --straggle busy   # the straggler computes instead of sleeping

For each strategy (``easgd``, ``easgd_async``) and each p, the same fit runs twice with p forked CPU workers (one
torch thread each): once as is, once with the last rank sleeping ``factor`` times its own step time after every
step. The measured number is rank 0's optimizer steps per second after a warm-up; the table gives the median over
``--rounds`` rounds (the order of configurations alternates between rounds) and the ratio slowed/unslowed. The
asynchronous worker never waits for the straggler; the synchronous one meets it at every exchange's all-reduce.

``--straggle sleep`` (default) is the plain definition, but a sleeping straggler frees its CPU core, which on a
machine with fewer cores than workers speeds the others up by itself. ``--straggle busy`` keeps the straggler
computing (matrix products, which release the GIL so that its center shard is still served) for the same time, so
the CPU load is the same with and without the straggler and the ratio shows only the waiting.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

STRATEGIES = ("easgd", "easgd_async")


def measure(strategy: str, p: int, slowed: bool, *, steps: int = 60, warmup: int = 10, tau: int = 4,
            factor: float = 3.0, straggle: str = "sleep", batch_size: int = 64, width: int = 512,
            out: Path | None = None) -> tuple[float, float]:
    """Fit once and return the optimizer steps per second of rank 0 and of rank p − 1 (the straggler when
    ``slowed``), each over its steps ``warmup`` .. ``steps``.

    Args:
        strategy: ``"easgd"`` (synchronous) or ``"easgd_async"``.
        p: number of forked CPU workers.
        slowed: whether rank p − 1 sleeps ``factor`` times its step time after each step.
        steps: optimizer steps per worker.
        warmup: steps left out of the measurement.
        tau: communication period.
        factor: the straggler's extra time per step, in multiples of its own step time.
        straggle: ``"sleep"``: the straggler sleeps; ``"busy"``: it multiplies matrices for that long.
        batch_size: samples per step and worker.
        width: hidden width of the MLP (sets the step time).
        out: where the workers write their timings (a temporary directory by default).
    """
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_easgd import EASGDStrategy
    from lightning_easgd.trainer.async_strategy import AsyncEASGDStrategy

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is invalid: choose one of {', '.join(STRATEGIES)}")
    if straggle not in ("sleep", "busy"):
        raise ValueError(f"straggle={straggle!r} is invalid: choose 'sleep' or 'busy'")
    if not 0 <= warmup < steps - 1:
        raise ValueError(f"warmup={warmup!r} is invalid: it must lie in [0, steps - 1) = [0, {steps - 1})")

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                     nn.Linear(width, 10))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Clock(L.Callback):
        """One torch thread per worker; the straggler's sleep; rank 0's step end times."""

        def __init__(self, directory: Path) -> None:
            self.directory = directory
            self.ends: list[float] = []
            self.start = 0.0

        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            torch.set_num_threads(1)

        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            now = time.perf_counter()
            if slowed and trainer.global_rank == trainer.world_size - 1:
                until = now + factor * (now - self.start)
                if straggle == "sleep":
                    time.sleep(until - now)
                else:
                    a = torch.ones(256, 256)  # ~1 ms per product: the GIL is free most of the time
                    while time.perf_counter() < until:
                        a @ a
            self.ends.append(time.perf_counter())

        def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if trainer.global_rank in (0, trainer.world_size - 1):
                (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.ends))

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(out or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        n = p * steps * batch_size
        data = TensorDataset(torch.randn(n, 256, generator=g), torch.randint(0, 10, (n,), generator=g))
        cls = AsyncEASGDStrategy if strategy == "easgd_async" else EASGDStrategy
        trainer = L.Trainer(accelerator="cpu", devices=p, strategy=cls(tau=tau, start_method="fork"), max_epochs=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[Clock(directory)],
                            default_root_dir=str(directory))
        trainer.fit(MLP(), DataLoader(data, batch_size=batch_size))
        ends = [json.loads((directory / f"rank{r}.json").read_text()) for r in (0, p - 1)]
    rates = [(len(e[warmup:]) - 1) / (e[-1] - e[warmup]) for e in ends]
    return rates[0], rates[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="values of p")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per worker and run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--tau", type=int, default=4)
    parser.add_argument("--factor", type=float, default=3.0, help="the straggler sleeps factor x its step time")
    parser.add_argument("--straggle", choices=("sleep", "busy"), default="sleep",
                        help="what the straggler does with its extra time")
    parser.add_argument("--width", type=int, default=512, help="hidden width of the MLP")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; the table shows medians")
    args = parser.parse_args(argv)
    import lightning_easgd  # noqa: F401  (registers the strategy names)

    configs = [(s, p, slowed) for p in args.workers for s in STRATEGIES for slowed in (False, True)]
    rates: dict[tuple[str, int, bool], list[tuple[float, float]]] = {c: [] for c in configs}
    for r in range(args.rounds):
        for config in configs if r % 2 == 0 else reversed(configs):
            strategy, p, slowed = config
            rates[config].append(measure(strategy, p, slowed, steps=args.steps, warmup=args.warmup, tau=args.tau,
                                         factor=args.factor, straggle=args.straggle, batch_size=args.batch_size,
                                         width=args.width))
    action = "sleeps" if args.straggle == "sleep" else "multiplies matrices for"
    print(f"\nrank 0 optimizer steps/s, median of {args.rounds}; straggler: rank p-1 {action} {args.factor:g}x its "
          f"step time after each step; tau={args.tau}, batch {args.batch_size}, MLP width {args.width}, 1 thread per "
          "worker")
    print("rank 0 without and with the straggler, their ratio, and the straggler's own rate in the slowed run\n")
    print(f"{'strategy':<12} {'p':>3} {'unslowed':>10} {'slowed':>10} {'ratio':>7} {'straggler':>10}")
    for p in args.workers:
        for strategy in STRATEGIES:
            fast = statistics.median(r[0] for r in rates[(strategy, p, False)])
            slow = statistics.median(r[0] for r in rates[(strategy, p, True)])
            straggler = statistics.median(r[1] for r in rates[(strategy, p, True)])
            print(f"{strategy:<12} {p:>3} {fast:>10.1f} {slow:>10.1f} {slow / fast:>7.2f} {straggler:>10.1f}")


if __name__ == "__main__":
    main()
