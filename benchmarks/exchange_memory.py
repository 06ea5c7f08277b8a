"""Memory the synchronous exchange holds per rank, for k = 1, 2, 4 ranks per worker, with and without a host center.

    python -m benchmarks.exchange_memory [--world 4] [--bucket-cap-mb 256]

Four CPU processes (gloo) build :class:`~lightning_easgd.core.ElasticAverager` over each model's parameters and
floating-point buffers as the strategy does, and rank 0 reports ``buffer_bytes`` (everything the exchange keeps) and
``device_buffer_bytes`` (the part on the parameters' device; with ``center_device="cpu"`` the rest is host memory).
The numbers are sizes, not timings, so the CPU measures what a GPU would hold with the same bucket cap (256 MB is
the CUDA default). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from lightning_easgd.core import ElasticAverager
from lightning_easgd.core.topology import worker_topology


def _models() -> dict[str, nn.Module]:
    import torchvision

    from lightning_easgd.recipes.models.paper import PaperCIFAR10Net, PaperImageNetNet

    return {"paper CIFAR-10 net": PaperCIFAR10Net(), "paper ImageNet net": PaperImageNetNet(),
            "ResNet-50": torchvision.models.resnet50()}


def _measure(rank: int, world: int, store: str, cap: float, results: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=5))
    for name, model in _models().items():
        elastic = [(k, t) for k, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()]
        for k in (1, 2, 4):
            if world % k:
                continue
            topo = worker_topology(k, world, rank)
            for center_device in (None, "cpu"):
                avg = ElasticAverager(elastic, tau=1, alpha=0.1, group=topo.column_group,
                                      worker_group=topo.worker_group, bucket_cap_mb=cap, center_device=center_device)
                if rank == 0:
                    results.put((name, k, center_device, avg.layout.nbytes, avg.buffer_bytes,
                                 avg.device_buffer_bytes, avg.bytes_per_exchange))
                del avg
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4, help="processes (k = 1, 2, 4 where they divide it)")
    parser.add_argument("--bucket-cap-mb", type=float, default=256.0, help="bucket cap (256 = the CUDA default)")
    args = parser.parse_args()
    if args.world < 1 or not args.bucket_cap_mb > 0:
        parser.error("--world must be >= 1 and --bucket-cap-mb > 0")
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = str(Path(tmp) / "store")
        procs = [ctx.Process(target=_measure, args=(r, args.world, store, args.bucket_cap_mb, results))
                 for r in range(args.world)]
        for proc in procs:
            proc.start()
        rows = []
        expected = 3 * sum(1 for k in (1, 2, 4) if args.world % k == 0) * 2
        for _ in range(expected):
            rows.append(results.get(timeout=600))
        for proc in procs:
            proc.join(timeout=60)
    mb = 1024**2
    print(f"world {args.world}, buckets of {args.bucket_cap_mb:g} MB\n")
    print("| model | averaged MB | k | center | exchange MB per rank | of it on the device | × model "
          "| sent per exchange MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, k, center, model, total, device, sent in rows:
        print(f"| {name} | {model / mb:.1f} | {k} | {center or 'device'} | {total / mb:.1f} | {device / mb:.1f} | "
              f"{total / model:.2f} | {sent / mb:.1f} |")

if __name__ == "__main__":
    main()
