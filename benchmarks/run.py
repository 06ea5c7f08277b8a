"""EASGD against the peers, measured side by side in one run.

    python -m benchmarks.run --suite comm        # bandwidth-limited private network (root, iproute2)
    python -m benchmarks.run --suite overhead    # one process: EASGD's own cost against plain Lightning

``comm``: every worker runs in its own network namespace behind a link shaped with ``tc`` (tbf) to each
``--rates`` value (Mbit/s; 0 = unshaped), launched like Lightning's multi-node jobs (one process per "node",
NODE_RANK/WORLD_SIZE/MASTER_ADDR). Per method: throughput, its ratio to p independent workers that never
communicate, and the bytes each worker's interface sent per optimizer step (counted from the interface's own
counter). Methods: none, ddp (gradient all-reduce every step), average:τ (local SGD, periodic averaging), easgd:τ,
and with ``--with-async`` easgd_async:τ. Writes ``comm.csv`` and ``comm.png`` under ``--out``.

``overhead``: one process, EASGDStrategy(tau=1) against Lightning's default single-device training (the strategy's
own per-step cost, with no communication), plus the memory the center and exchange buffers take.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.procs import check_run_arguments, run_all


def _worker_command(method: str, args: argparse.Namespace, result: Path, interface: str, nodes: int) -> list[str]:
    return [sys.executable, "-m", "benchmarks.run", "--one", method, "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--batch-size", str(args.batch_size), "--nodes", str(nodes), "--interface",
            interface, "--result", str(result)]


def _comm(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.netlab import private_network

    methods = ["none", "ddp", *[f"average:{t}" for t in args.taus], *[f"easgd:{t}" for t in args.taus]]
    if args.with_async:
        methods += [f"easgd_async:{t}" for t in args.taus]
    tmp = args.out / "comm_runs"
    tmp.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    port = 29600
    for rate in args.rates:
        with private_network(args.processes, rate or None) as hosts:
            for round_ in range(args.rounds):
                for method in methods if round_ % 2 == 0 else methods[::-1]:
                    port += 1
                    commands, results = [], []
                    for rank, host in enumerate(hosts):
                        result = tmp / f"{rate}_{method.replace(':', '_')}_{round_}_{rank}.json"
                        nodes = 1 if method == "none" else args.processes
                        commands.append(host.command(_worker_command(method, args, result, host.interface, nodes)))
                        results.append(result)
                    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.processes)),
                           "PYTHONWARNINGS": "ignore", "MASTER_ADDR": hosts[0].address, "MASTER_PORT": str(port),
                           "WORLD_SIZE": str(args.processes)}
                    run_all([_with_rank(cmd, rank, method, host.interface)
                             for rank, (cmd, host) in enumerate(zip(commands, hosts))], env, args.timeout)
                    runs = [json.loads(r.read_text()) for r in results]
                    rows.append({
                        "rate_mbit": rate or "unshaped",
                        "method": method,
                        "round": round_,
                        "seconds_per_step": sum(r["seconds_per_step"] for r in runs) / len(runs),
                        "wire_bytes_per_step_per_worker": sum(r["tx_bytes_per_step"] for r in runs) / len(runs),
                        "payload_bytes_per_step": runs[0]["payload_bytes_per_step"],
                        "parameters": runs[0]["parameters"],
                    })
                    print(f"{rate or 'unshaped'} Mbit/s round {round_ + 1} {method}: "
                          f"{1000 * rows[-1]['seconds_per_step']:.0f} ms/step", file=sys.stderr)
    return rows


def _with_rank(command: list[str], rank: int, method: str, interface: str) -> list[str]:
    # `ip netns exec` keeps the environment; each worker's own rank and interface go in front of the python
    # command (gloo and TensorPipe would otherwise pick the address the hostname resolves to: the loopback).
    split = command.index(sys.executable)
    extra = [] if method == "none" else [f"NODE_RANK={rank}", "LOCAL_RANK=0", f"GLOO_SOCKET_IFNAME={interface}",
                                         f"TP_SOCKET_IFNAME={interface}"]
    return [*command[:split], "env", *extra, *command[split:]]


def _median_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["rate_mbit"], row["method"]), []).append(row)
    out = []
    for (rate, _), runs in groups.items():
        median = sorted(runs, key=lambda r: r["seconds_per_step"])[len(runs) // 2]
        base = sorted(groups[(rate, "none")], key=lambda r: r["seconds_per_step"])[len(groups[(rate, "none")]) // 2]
        ddp = sorted(groups[(rate, "ddp")], key=lambda r: r["seconds_per_step"])[len(groups[(rate, "ddp")]) // 2]
        wire = median["wire_bytes_per_step_per_worker"]
        out.append({**{k: v for k, v in median.items() if k != "round"},
                    "throughput_vs_none": base["seconds_per_step"] / median["seconds_per_step"],
                    "ddp_bytes_over_these": ddp["wire_bytes_per_step_per_worker"] / wire if wire else None})
    return out


def _table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"{args.processes} workers, one per network namespace, paper CIFAR-10 net ({rows[0]['parameters']:,} "
             f"parameters), batch {args.batch_size}, {args.steps} timed steps after {args.warmup}, median of "
             f"{args.rounds} rounds",
             f"{'link':>9} {'method':<15} {'ms/step':>8} {'img/s/worker':>12} {'vs none':>8} "
             f"{'wire B/step/worker':>19} {'DDP/this bytes':>15}"]
    for r in rows:
        ratio = "-" if r["ddp_bytes_over_these"] is None or r["method"] in ("none", "ddp") else (
            f"{r['ddp_bytes_over_these']:.2f}")
        seconds = r["seconds_per_step"]
        lines.append(f"{str(r['rate_mbit']):>9} {r['method']:<15} {1000 * seconds:>8.1f} "
                     f"{args.batch_size / seconds:>12.0f} {r['throughput_vs_none']:>8.3f} "
                     f"{r['wire_bytes_per_step_per_worker']:>19,.0f} {ratio:>15}")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate_mbit"] for r in rows))
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for family, marker in (("average", "s"), ("easgd", "o"), ("easgd_async", "^")):
            points = sorted((int(r["method"].split(":")[1]), r["throughput_vs_none"]) for r in rows
                            if r["rate_mbit"] == rate and r["method"].split(":")[0] == family)
            if points:
                ax.plot(*zip(*points), marker=marker, label=family)
        ddp = next(r["throughput_vs_none"] for r in rows if r["rate_mbit"] == rate and r["method"] == "ddp")
        ax.axhline(ddp, color="gray", linestyle="--", label="ddp")
        ax.axhline(1.0, color="black", linewidth=0.8, label="no communication")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("communication period τ (steps)")
        ax.set_ylabel("throughput / no-communication throughput")
        ax.set_title(f"link: {rate} Mbit/s" if rate != "unshaped" else "link: unshaped veth")
        ax.set_ylim(0, 1.1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _overhead(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = args.out / "overhead_runs"
    tmp.mkdir(parents=True, exist_ok=True)
    # The same single torch thread for all: Lightning's DDP-family strategies set the thread count themselves.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    # easgd:1 does the elastic arithmetic at every step; easgd:64 shows the strategy's own per-step cost.
    measured: dict[str, list[float]] = {"none": [], "easgd:1": [], "easgd:64": []}
    for round_ in range(args.rounds):
        for method in list(measured) if round_ % 2 == 0 else list(measured)[::-1]:
            result = tmp / f"{method.replace(':', '_')}_{round_}.json"
            run_all([_worker_command(method, args, result, "lo", 1)], env, args.timeout)
            measured[method].append(json.loads(result.read_text())["seconds_per_step"])
    from lightning_easgd.models import PaperCIFAR10Net

    model_bytes = sum(p.numel() * p.element_size() for p in PaperCIFAR10Net().parameters())
    medians = {m: sorted(v)[len(v) // 2] for m, v in measured.items()}
    # One worker keeps the center and d_i (two copies); with p > 1 a third buffer holds the all-reduce.
    rows = [{"method": m, "seconds_per_step": t, "relative": t / medians["none"],
             "extra_memory_bytes": 0 if m == "none" else 2 * model_bytes} for m, t in medians.items()]
    print(f"one process, paper CIFAR-10 net, batch {args.batch_size}, median of {args.rounds} rounds")
    for r in rows:
        print(f"{r['method']:<9} {1000 * r['seconds_per_step']:8.1f} ms/step  x{r['relative']:.3f}  extra memory "
              f"{r['extra_memory_bytes'] / 2**20:.2f} MiB (p > 1: {3 * model_bytes / 2**20:.2f} MiB)")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["comm", "overhead"], help="which measurement to run")
    parser.add_argument("--processes", type=int, default=2, help="workers (p), one namespace each")
    parser.add_argument("--rates", type=float, nargs="+", default=[1000, 100], help="link rates, Mbit/s (0: none)")
    parser.add_argument("--taus", type=int, nargs="+", default=[1, 4, 16, 64], help="communication periods")
    parser.add_argument("--steps", type=int, default=64, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=8, help="untimed optimizer steps first")
    parser.add_argument("--batch-size", type=int, default=128, help="per worker (the paper's value)")
    parser.add_argument("--rounds", type=int, default=1, help="repetitions; tables show each median")
    parser.add_argument("--with-async", action="store_true", help="also measure the asynchronous strategy")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a hung run is killed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="CSV and PNG go here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--interface", default="lo", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        from benchmarks.workload import train

        train(args.one, warmup=args.warmup, steps=args.steps, batch_size=args.batch_size, devices=1,
              num_nodes=args.nodes, interface=args.interface, result=args.result, all_ranks=True)
        return
    if args.suite is None:
        parser.error("--suite is required: choose comm or overhead")
    check_run_arguments(parser, args)
    if any(r < 0 for r in args.rates):
        parser.error(f"--rates {args.rates} is invalid: rates are Mbit/s >= 0 (0: unshaped)")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.suite == "overhead":
        rows = _overhead(args)
        name = "overhead"
    else:
        rows = _median_rows(_comm(args))
        print(_table(rows, args))
        _plot(rows, args.out / "comm.png")
        name = "comm"
    with open(args.out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"results: {args.out / name}.csv" + (f", {args.out / 'comm.png'}" if name == "comm" else ""),
          file=sys.stderr)


if __name__ == "__main__":
    main()
