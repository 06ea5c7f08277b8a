"""How much the bfloat16 exchange (``exchange_dtype=torch.bfloat16``) perturbs the center's update, for p workers.

    PYTHONPATH=. python -m benchmarks.bf16_exchange_error                   # p = 2 ... 64, 1 M elements, markdown

The averager rounds each worker's float32 difference d_i to bfloat16 and all-reduces the p of them in bfloat16; a
ring all-reduce (NCCL, gloo) adds them one after the other, rounding every partial sum to bfloat16. This replays
that on the CPU and compares Σ_i d_i with the float32 sum (accumulated in float64): the relative error
‖Σ_bf16 − Σ‖ / ‖Σ‖ of the center's increment α·Σ_i d_i, for two kinds of differences:

- ``independent``: d_i ~ N(0, 1), unrelated between workers (their sum grows like √p);
- ``shared``: d_i = g + 0.1·N(0, 1) with one g ~ N(0, 1) for all workers (workers drifting the same way; the sum
  grows like p, so late partial sums are large and each addition loses more of the small next term).

``inputs only`` is the part due to rounding each d_i once (summed exactly); the rest comes from the bfloat16 sums.
"""

from __future__ import annotations

import argparse

import torch


def ring_sum_bf16(diffs: torch.Tensor) -> torch.Tensor:
    """Σ over the first axis as a ring all-reduce in bfloat16 does it: inputs rounded, every partial sum rounded."""
    total = diffs[0].to(torch.bfloat16)
    for d in diffs[1:]:
        total = (total.float() + d.to(torch.bfloat16).float()).to(torch.bfloat16)
    return total.float()


def relative_errors(p: int, numel: int, kind: str, seed: int = 0) -> tuple[float, float]:
    """(error of the bfloat16 ring sum, error of rounding the inputs only), relative to the exact float32 sum."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(p, numel, generator=g)
    diffs = noise if kind == "independent" else torch.randn(numel, generator=g) + 0.1 * noise
    exact = diffs.double().sum(0)
    inputs_only = diffs.to(torch.bfloat16).double().sum(0)
    ring = ring_sum_bf16(diffs).double()
    scale = float(exact.norm())
    return float((ring - exact).norm()) / scale, float((inputs_only - exact).norm()) / scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bf16_exchange_error",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64], help="values of p")
    parser.add_argument("--numel", type=int, default=1_000_000, help="elements per difference vector")
    args = parser.parse_args(argv)
    if any(p < 2 for p in args.workers) or args.numel < 1:
        parser.error(f"--workers {args.workers} --numel {args.numel} is invalid: every p must be >= 2, numel >= 1")
    print("| p | independent: bf16 sum | inputs only | shared direction: bf16 sum | inputs only |")
    print("|---|---|---|---|---|")
    for p in args.workers:
        ind = relative_errors(p, args.numel, "independent")
        shared = relative_errors(p, args.numel, "shared")
        print(f"| {p} | {ind[0]:.2e} | {ind[1]:.2e} | {shared[0]:.2e} | {shared[1]:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
