"""Per-step time and bytes on the wire on one machine: EASGD (τ = 1, 4, 16) against Lightning DDP and against p
processes that do not communicate at all, on the paper's CIFAR-10 7-layer net (REFERENCE.md §2).

    python -m benchmarks.step_time                      # 2 CPU processes, prints a table
    python -m benchmarks.step_time --taus 1 4 16 64 --steps 80 --rounds 3

Every configuration runs as its own subprocess, side by side in one run, in ``--rounds`` rounds whose order
alternates; the table reports each configuration's median round. Bytes are counted, not assumed: the benchmark
re-executes itself inside a private network namespace (``unshare -n``, root) whose loopback carries nothing but
the workers' traffic, and reads that interface's byte counter around the timed window. Without ``unshare`` the
byte column says "not measured". For bandwidth-limited links between separate hosts see ``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.procs import check_run_arguments, run_all, write_csv

NETNS_FLAG = "EASGD_BENCH_NETNS"


def _measure(method: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    threads = max(1, (os.cpu_count() or 1) // args.processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    base = [sys.executable, "-m", "benchmarks.step_time", "--one", method, "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--batch-size", str(args.batch_size), "--processes", str(args.processes)]
    # "none" is p independent single-process trainings at the same time; the others are one p-process job.
    copies = args.processes if method == "none" else 1
    results = [tmp / f"{method.replace(':', '_')}_{i}.json" for i in range(copies)]
    run_all([[*base, "--result", str(r)] for r in results], env, args.timeout)
    runs = [json.loads(r.read_text()) for r in results]
    wire = [r["tx_bytes_per_step"] for r in runs]
    return {
        "method": method,
        "seconds_per_step": sum(r["seconds_per_step"] for r in runs) / copies,
        # One loopback carries every worker's traffic; rank 0 read it for the whole job.
        "wire_bytes_per_step_per_worker": None if None in wire else sum(wire) / args.processes,
        "payload_bytes_per_step": runs[0]["payload_bytes_per_step"],
        "parameters": runs[0]["parameters"],
    }


def _fmt(value: float | None) -> str:
    return "not measured" if value is None else f"{value:,.0f}"


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    base = next(r for r in rows if r["method"] == "none")["seconds_per_step"]
    ddp_wire = next(r for r in rows if r["method"] == "ddp")["wire_bytes_per_step_per_worker"]
    lines = [
        (f"{args.processes} CPU processes, paper CIFAR-10 net ({rows[0]['parameters']:,} parameters), batch "
         f"{args.batch_size} per worker, {args.steps} timed steps after {args.warmup} warm-up, median of "
         f"{args.rounds} rounds"),
        (f"{'method':<9} {'ms/step':>8} {'img/s/worker':>12} {'vs none':>8} {'wire B/step/worker':>19} "
         f"{'payload B/step':>15} {'DDP/this bytes':>15}"),
    ]
    for r in rows:
        wire = r["wire_bytes_per_step_per_worker"]
        ratio = f"{ddp_wire / wire:.2f}" if wire and ddp_wire and r["method"].startswith("easgd") else "-"
        payload = "-" if r["payload_bytes_per_step"] is None else _fmt(r["payload_bytes_per_step"])
        seconds = r["seconds_per_step"]
        lines.append(
            f"{r['method']:<9} {1000 * seconds:>8.1f} {args.batch_size / seconds:>12.0f} {base / seconds:>8.3f} "
            f"{_fmt(wire):>19} {payload:>15} {ratio:>15}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2, help="worker processes (p)")
    parser.add_argument("--taus", type=int, nargs="+", default=[1, 4, 16], help="EASGD communication periods")
    parser.add_argument("--steps", type=int, default=64, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=16, help="untimed optimizer steps first")
    parser.add_argument("--batch-size", type=int, default=128, help="per worker (the paper's value)")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions; the table shows each median")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a hung run is killed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="where the CSV goes")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_run_arguments(parser, args)
    if args.one:
        from benchmarks.workload import train

        devices = 1 if args.one == "none" else args.processes
        train(args.one, warmup=args.warmup, steps=args.steps, batch_size=args.batch_size, devices=devices,
              num_nodes=1, interface="lo", result=args.result, all_ranks=False, start_method="fork")
        return
    if os.environ.get(NETNS_FLAG) != "1" and shutil.which("unshare") and os.geteuid() == 0:
        # Re-run inside a private network namespace whose loopback only the benchmark uses.
        cmd = ["unshare", "-n", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, "-m",
               "benchmarks.step_time", *(argv if argv is not None else sys.argv[1:])]
        raise SystemExit(subprocess.call(cmd, env={**os.environ, NETNS_FLAG: "1"}))

    methods = ["none", "ddp", *[f"easgd:{t}" for t in args.taus]]
    tmp = args.out / "step_time_runs"
    tmp.mkdir(parents=True, exist_ok=True)
    measured: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for round_ in range(args.rounds):
        for method in methods if round_ % 2 == 0 else methods[::-1]:
            measured[method].append(_measure(method, args, tmp))
            print(f"round {round_ + 1}/{args.rounds} {method}: "
                  f"{1000 * measured[method][-1]['seconds_per_step']:.1f} ms/step", file=sys.stderr)
    rows = [sorted(runs, key=lambda r: r["seconds_per_step"])[len(runs) // 2] for runs in measured.values()]
    print(_table(rows, args))
    write_csv(args.out / "step_time.csv", rows)
    print(f"CSV: {args.out / 'step_time.csv'}", file=sys.stderr)


if __name__ == "__main__":
    main()
