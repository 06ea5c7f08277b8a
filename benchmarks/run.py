"""EASGD against the peers, measured side by side in one run.

    python -m benchmarks.run --suite comm        # bandwidth-limited private network (root, iproute2)
    python -m benchmarks.run --suite accuracy    # CIFAR-10, p = 4: center test error against wall clock
    python -m benchmarks.run --suite overhead    # one process: EASGD's own cost against plain Lightning

``comm``: every "node" runs in its own network namespace behind links shaped with ``tc`` (tbf) to each
``--rates`` value (Mbit/s; 0 = unshaped), launched like Lightning's multi-node jobs (NODE_RANK/LOCAL_RANK/
WORLD_SIZE/MASTER_ADDR). With ``--ranks-per-node N`` (default 1) each node runs N processes, each with its own NIC
(rank j of every node on rail j, as multi-NIC GPU nodes have) and the node's loopback between them. Per method:
throughput, its ratio to the same processes training alone without communicating, and the bytes each process's NIC sent
per optimizer step (counted from the interface's own counter: inter-node traffic only). Methods: none, ddp (gradient
all-reduce every step), average:τ (local SGD, periodic averaging), easgd:τ (one EASGD worker per process), with N > 1
easgd_node:τ (one worker per node: ``ranks_per_worker="node"``), with ``--with-bf16`` easgd_bf16:τ (d_i sent in
bfloat16: half the bytes) and ddp_bf16 (DDP's gradients all-reduced in bfloat16 by PyTorch's ``bf16_compress_hook``, so
that both sides may halve their bytes), and with ``--with-async`` easgd_async:τ. Writes ``comm.csv``
and ``comm.png`` under ``--out``.

``accuracy``: each method of ``--methods`` trained by the CIFAR-10 recipe on the real data, its workers in the same
private network; the center's test error after ``--epochs`` and at a wall-clock budget, the bytes each worker sent,
and the paper's claims checked (see ``benchmarks/accuracy.py``). Writes ``accuracy.csv``, ``accuracy_curves.csv``
and ``accuracy.png``.

``overhead``: one process, EASGDStrategy(tau=1) against Lightning's default single-device training (the strategy's
own per-step cost, with no communication), plus the memory the center and exchange buffers take. Writes
``overhead.csv`` and ``overhead.png``.

Options a suite does not read are refused, not ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from benchmarks import accuracy
from benchmarks.procs import check_run_arguments, launch_env, node_env, run_all, write_csv


def _worker_command(method: str, args: argparse.Namespace, result: Path, interface: str, nodes: int,
                    devices: int = 1) -> list[str]:
    return [sys.executable, "-m", "benchmarks.run", "--one", method, "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--batch-size", str(args.batch_size), "--nodes", str(nodes), "--devices", str(devices),
            "--interface", interface, "--result", str(result)]


def _comm(args: argparse.Namespace) -> list[dict[str, Any]]:
    from benchmarks.netlab import private_cluster

    per_node = args.ranks_per_node
    nodes = args.processes // per_node
    methods = ["none", "ddp", *[f"average:{t}" for t in args.taus], *[f"easgd:{t}" for t in args.taus]]
    if per_node > 1:
        methods += [f"easgd_node:{t}" for t in args.taus]
    if args.with_bf16:
        methods.insert(2, "ddp_bf16")
        methods += [f"easgd_bf16:{t}" for t in args.taus]
    if args.with_async:
        methods += [f"easgd_async:{t}" for t in args.taus]
    tmp = args.out / "comm_runs"
    tmp.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    port = 29600
    for rate in args.rates:
        with private_cluster(nodes, per_node, rate or None) as cluster:
            hosts = [nic for node in cluster for nic in node]  # global rank order: node-major
            for round_ in range(args.rounds):
                for method in methods if round_ % 2 == 0 else methods[::-1]:
                    port += 1
                    commands, results = [], []
                    for rank, host in enumerate(hosts):
                        result = tmp / f"{rate}_{method.replace(':', '_')}_{round_}_{rank}.json"
                        if method == "none":  # every process alone: one node, one device, no peers
                            argv, rank_env = _worker_command(method, args, result, host.interface, 1), {}
                        else:
                            argv = _worker_command(method, args, result, host.interface, nodes, per_node)
                            rank_env = node_env(rank // per_node, host, rank % per_node)
                        commands.append(host.command(argv, rank_env))
                        results.append(result)
                    run_all(commands, launch_env(hosts, port, args.processes), args.timeout)
                    runs = [json.loads(r.read_text()) for r in results]
                    rows.append({
                        "rate_mbit": rate or "unshaped",
                        "method": method,
                        "round": round_,
                        "seconds_per_step": sum(r["seconds_per_step"] for r in runs) / len(runs),
                        "wire_bytes_per_step_per_worker": sum(r["tx_bytes_per_step"] for r in runs) / len(runs),
                        "wire_bytes_per_step_busiest": max(r["tx_bytes_per_step"] for r in runs),
                        "payload_bytes_per_step": runs[0]["payload_bytes_per_step"],
                        "exchange_buffer_bytes": runs[0]["exchange_buffer_bytes"],
                        "parameters": runs[0]["parameters"],
                    })
                    print(f"{rate or 'unshaped'} Mbit/s round {round_ + 1} {method}: "
                          f"{1000 * rows[-1]['seconds_per_step']:.0f} ms/step", file=sys.stderr)
    return rows


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
    layout = (f"{args.processes} workers, one per network namespace" if args.ranks_per_node == 1 else
              f"{args.processes // args.ranks_per_node} nodes x {args.ranks_per_node} processes, one NIC each")
    title = (f"{layout}, paper CIFAR-10 net ({rows[0]['parameters']:,} parameters), batch {args.batch_size}, "
             f"{args.steps} timed steps after {args.warmup}, median of {args.rounds} rounds")
    header = (f"{'link':>9} {'method':<15} {'ms/step':>8} {'img/s/worker':>12} {'vs none':>8} "
              f"{'wire B/step/rank':>19} {'busiest NIC B/step':>19} {'DDP/this bytes':>15}")
    lines = [title, header]
    for r in rows:
        ratio = "-" if r["ddp_bytes_over_these"] is None or r["method"] in ("none", "ddp") else (
            f"{r['ddp_bytes_over_these']:.2f}")
        seconds = r["seconds_per_step"]
        lines.append(f"{r['rate_mbit']!s:>9} {r['method']:<15} {1000 * seconds:>8.1f} "
                     f"{args.batch_size / seconds:>12.0f} {r['throughput_vs_none']:>8.3f} "
                     f"{r['wire_bytes_per_step_per_worker']:>19,.0f} {r['wire_bytes_per_step_busiest']:>19,.0f} "
                     f"{ratio:>15}")
    lines += [group_bytes_verdict(r, flat, args.ranks_per_node) for r, flat in _group_pairs(rows)]
    return "\n".join(lines)


def _group_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each easgd_node:τ row with the flat easgd:τ row of the same link."""
    flat = {(r["rate_mbit"], r["method"].split(":")[1]): r for r in rows if r["method"].startswith("easgd:")}
    return [(r, flat[(r["rate_mbit"], r["method"].split(":")[1])]) for r in rows
            if r["method"].startswith("easgd_node:") and (r["rate_mbit"], r["method"].split(":")[1]) in flat]


def group_bytes_verdict(grouped: dict[str, Any], flat: dict[str, Any], k: int) -> str:
    """The worker-groups target: a rank of a k-rank worker sends 1/k of flat EASGD's inter-node bytes (±5 %), on
    average over the NICs; also the busiest NIC's ratio (a flat ring loads some NICs more than others)."""
    ratio = grouped["wire_bytes_per_step_per_worker"] / flat["wire_bytes_per_step_per_worker"]
    met = abs(ratio * k - 1) <= 0.05
    busiest = grouped["wire_bytes_per_step_busiest"] / flat["wire_bytes_per_step_busiest"]
    return (f"{grouped['rate_mbit']!s:>9} {grouped['method']}: inter-node bytes per rank = {ratio:.3f} x flat "
            f"{flat['method']}'s (target 1/{k} = {1 / k:.3f} +-5 %: {'met' if met else 'NOT met'}); busiest NIC "
            f"{busiest:.3f} x flat's busiest")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate_mbit"] for r in rows))
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for family, marker in (("average", "s"), ("easgd", "o"), ("easgd_bf16", "v"), ("easgd_node", "D"),
                               ("easgd_async", "^")):
            points = sorted((int(r["method"].split(":")[1]), r["throughput_vs_none"]) for r in rows
                            if r["rate_mbit"] == rate and r["method"].split(":")[0] == family)
            if points:
                ax.plot(*zip(*points), marker=marker, label=family)
        for name, style in (("ddp", "--"), ("ddp_bf16", ":")):
            ddp = [r["throughput_vs_none"] for r in rows if r["rate_mbit"] == rate and r["method"] == name]
            if ddp:
                ax.axhline(ddp[0], color="gray", linestyle=style, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8, label="no communication")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("communication period τ (steps)")
        ax.set_ylabel("throughput / no-communication throughput")
        ax.set_title(f"link: {rate} Mbit/s" if rate != "unshaped" else "link: unshaped veth")
        ax.set_ylim(0, 1.1)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _accuracy(args: argparse.Namespace) -> list[accuracy.Result]:
    """Train every method on every link, after the ``--include``d runs; the CSVs are rewritten after each run, so
    that the runs already finished survive a suite that is stopped (they can be ``--include``d later)."""
    from benchmarks.netlab import private_network

    results: list[accuracy.Result] = list(args.included)
    port = 29700
    for index, rate in enumerate(args.rates):
        label = _link_label(rate)
        # A single worker never communicates: its curve does not depend on the link, so it runs once.
        methods = [m for m in args.methods if m.communicates or index == 0]
        if not methods:
            continue
        with private_network(args.processes, rate or None) as hosts:
            for method in methods:
                port += 1
                run_dir = args.out / "accuracy_runs" / f"{label}_{method.label.replace(':', '_')}"
                print(f"{accuracy.link_name(label)}, {method.label}: training {args.epochs} epochs ({run_dir})",
                      file=sys.stderr)
                result = accuracy.train_one(
                    method, hosts, rate=label, port=port, processes=args.processes, epochs=args.epochs,
                    run_dir=run_dir, timeout=args.timeout, evals_per_epoch=args.evals_per_epoch,
                    batch_size=args.batch_size, data_dir=args.data_dir, extra=args.override)
                results.append(result)
                _write_accuracy_csvs(args.out, results, args.budget_seconds)
                print(f"  test error {result.test_error:.2f}% after {result.curve.train_s[-1]:.0f} s of training",
                      file=sys.stderr)
    return results


def _write_accuracy_csvs(out: Path, results: list[accuracy.Result], budget: float | None) -> None:
    write_csv(out / "accuracy.csv", accuracy.summarize(results, budget)[0])
    write_csv(out / "accuracy_curves.csv", accuracy.curve_rows(results))


def _link_label(rate: float) -> str:
    """How results name a link: ``"100"`` (Mbit/s) or ``"unshaped"``."""
    return f"{rate:g}" if rate else "unshaped"


def _overhead(args: argparse.Namespace) -> list[dict[str, Any]]:
    tmp = args.out / "overhead_runs"
    tmp.mkdir(parents=True, exist_ok=True)
    # The same single torch thread for all: Lightning's DDP-family strategies set the thread count themselves.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    # easgd:1 does the elastic arithmetic at every step; easgd:64 shows the strategy's own per-step cost.
    measured: dict[str, list[float]] = {"none": [], "easgd:1": [], "easgd:64": []}
    buffers: dict[str, int] = {}
    for round_ in range(args.rounds):
        for method in list(measured) if round_ % 2 == 0 else list(measured)[::-1]:
            result = tmp / f"{method.replace(':', '_')}_{round_}.json"
            run_all([_worker_command(method, args, result, "lo", 1)], env, args.timeout)
            # The median step of the window: one step slowed by another process on the shared machine moves the
            # mean of 64 steps by more than the 2 % being resolved, the median hardly.
            run = json.loads(result.read_text())
            measured[method].append(run["median_step_seconds"])
            buffers[method] = run["exchange_buffer_bytes"] or 0
    medians = {m: sorted(v)[len(v) // 2] for m, v in measured.items()}
    rows = [{"method": m, "seconds_per_step": t, "relative": t / medians["none"], "extra_memory_bytes": buffers[m]}
            for m, t in medians.items()]
    print(f"one process, paper CIFAR-10 net, batch {args.batch_size}, median step time, median of {args.rounds} "
          "rounds")
    for r in rows:
        # Measured on the averager: the center and d_i; with p > 1 one more copy holds the all-reduce's sum.
        print(f"{r['method']:<9} {1000 * r['seconds_per_step']:8.1f} ms/step  x{r['relative']:.3f}  exchange buffers "
              f"{r['extra_memory_bytes'] / 2**20:.2f} MiB")
    return rows


def _plot_overhead(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([r["method"] for r in rows], [r["relative"] for r in rows], color=["gray", "tab:blue", "tab:blue"])
    for target in (0.98, 1.02):
        ax.axhline(target, color="black", linestyle=":", linewidth=0.8)
    ax.set_ylabel("step time / plain Lightning's")
    ax.set_title("one process: the strategy's own cost (±2 % dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# Options that only one suite reads; giving one to another suite is refused rather than ignored.
_SUITE_OPTIONS = {
    "comm": ("rates", "taus", "steps", "warmup", "rounds", "with_async", "with_bf16", "ranks_per_node"),
    "overhead": ("steps", "warmup", "rounds"),
    "accuracy": ("rates", "methods", "epochs", "evals_per_epoch", "budget_seconds", "data_dir", "override",
                 "include"),
}
_DEFAULTS: dict[str, Any] = {
    "taus": [1, 4, 16, 64], "steps": 64, "warmup": 8, "rounds": 1, "with_async": False, "with_bf16": False,
    "ranks_per_node": 1,
    "methods": list(accuracy.DEFAULT_METHODS), "epochs": 8, "evals_per_epoch": 4, "budget_seconds": None,
    "data_dir": accuracy.REPOSITORY.parent / "shared" / "data" / "cifar10", "override": [], "include": [],
}
_PROCESSES = {"comm": 2, "overhead": 1, "accuracy": 4}
_TIMEOUT = {"comm": 900.0, "overhead": 900.0, "accuracy": 7200.0}


def _resolve_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse options the chosen suite does not read, then fill in each suite's defaults."""
    foreign = [name for suite, names in _SUITE_OPTIONS.items() if suite != args.suite for name in names
               if name not in _SUITE_OPTIONS[args.suite] and getattr(args, name) is not None]
    if foreign:
        flags = ", ".join(sorted({"--" + name.replace("_", "-") for name in foreign}))
        parser.error(f"{flags} do not apply to --suite {args.suite}; its options are: "
                     f"{', '.join('--' + n.replace('_', '-') for n in _SUITE_OPTIONS[args.suite])}")
    if args.suite == "accuracy" and args.include and args.methods is None:
        args.methods = []  # --include alone reports the earlier runs without training anything
    for name in _SUITE_OPTIONS[args.suite]:
        if getattr(args, name) is None and name in _DEFAULTS:
            setattr(args, name, _DEFAULTS[name])
    if args.rates is None:
        args.rates = [0, 100] if args.suite == "accuracy" else [1000, 100]
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout={args.timeout} is invalid: it must be > 0 seconds")
    if args.suite == "overhead" and args.processes not in (None, 1):
        parser.error(f"--processes {args.processes} is invalid for --suite overhead: it measures one process")
    args.processes = args.processes or _PROCESSES[args.suite]
    args.timeout = args.timeout or _TIMEOUT[args.suite]
    check_run_arguments(parser, args)
    if args.suite == "comm" and (args.ranks_per_node < 1 or args.processes % args.ranks_per_node):
        parser.error(f"--ranks-per-node {args.ranks_per_node} is invalid for --processes {args.processes}: it must be "
                     ">= 1 and divide the number of processes")
    if any(r < 0 for r in args.rates):
        parser.error(f"--rates {args.rates} is invalid: rates are Mbit/s >= 0 (0: unshaped)")
    if args.suite == "accuracy":
        try:
            args.methods = [accuracy.Method.parse(m) for m in args.methods]
        except ValueError as error:
            parser.error(f"--methods: {error}")
        for name in ("epochs", "evals_per_epoch"):
            if getattr(args, name) < 1:
                parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: it must be >= 1")
        if args.budget_seconds is not None and args.budget_seconds <= 0:
            parser.error(f"--budget-seconds={args.budget_seconds} is invalid: it must be > 0")
        try:
            args.included = [result for directory in args.include for result in accuracy.load_results(directory)]
        except ValueError as error:
            parser.error(str(error))
        # A run is a method on a link for a number of epochs: a longer horizon of the same method is another run.
        planned = [(_link_label(rate) if m.communicates else "any", m.label, args.epochs)
                   for index, rate in enumerate(args.rates) for m in args.methods if m.communicates or index == 0]
        seen = [(r.rate, r.method.label, r.epochs) for r in args.included] + planned
        repeated = sorted({f"{label} ({rate}, epochs={epochs})" for rate, label, epochs in seen
                           if seen.count((rate, label, epochs)) > 1})
        if repeated:
            parser.error(f"--include/--methods name a run more than once: {', '.join(repeated)}; each run may "
                         "appear once (add :seedN for another seed)")
        if args.methods and not (args.data_dir / "cifar-10-batches-py").is_dir():
            parser.error(f"--data-dir {args.data_dir} is invalid: it must hold cifar-10-batches-py/ "
                         "(e.g. ../shared/data/cifar10)")
        args.data_dir = args.data_dir.resolve()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=list(_SUITE_OPTIONS), help="which measurement to run")
    parser.add_argument("--processes", type=int, help="workers p, one namespace each (comm: 2, accuracy: 4)")
    parser.add_argument("--rates", type=float, nargs="+",
                        help="link rates, Mbit/s, 0: unshaped (comm: 1000 100; accuracy: 0 100)")
    parser.add_argument("--batch-size", type=int, default=128, help="per worker (the paper's value)")
    parser.add_argument("--timeout", type=float, help="seconds before a hung run is killed (accuracy: 7200)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="CSV and PNG go here")
    comm = parser.add_argument_group("comm and overhead")
    comm.add_argument("--taus", type=int, nargs="+", help="communication periods (comm; default 1 4 16 64)")
    comm.add_argument("--steps", type=int, help="timed optimizer steps per run (default 64)")
    comm.add_argument("--warmup", type=int, help="untimed optimizer steps first (default 8)")
    comm.add_argument("--rounds", type=int, help="repetitions; tables show each median (default 1)")
    comm.add_argument("--with-async", action="store_true", default=None, help="also the asynchronous strategy")
    comm.add_argument("--with-bf16", action="store_true", default=None,
                      help="also EASGD with exchange_dtype=bfloat16 (easgd_bf16:TAU) and DDP with PyTorch's "
                           "bf16_compress_hook (ddp_bf16)")
    comm.add_argument("--ranks-per-node", type=int,
                      help="processes per node, each with its own NIC; > 1 adds easgd_node:TAU (comm; default 1)")
    acc = parser.add_argument_group("accuracy")
    acc.add_argument("--methods", nargs="+", help=f"default: {' '.join(accuracy.DEFAULT_METHODS)}")
    acc.add_argument("--epochs", type=int, help="epoch budget (default 8)")
    acc.add_argument("--evals-per-epoch", type=int, help="center evaluations on the test split per epoch (4)")
    acc.add_argument("--budget-seconds", type=float, help="wall-clock budget (default: the shortest run's time)")
    acc.add_argument("--data-dir", type=Path, help="holds cifar-10-batches-py/ (default ../shared/data/cifar10)")
    acc.add_argument("--override", nargs="+", help="extra Hydra overrides for every recipe run")
    acc.add_argument("--include", type=Path, nargs="+",
                     help="earlier accuracy --out folders whose runs join the table, checks and plot (alone: report "
                          "them without training)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--interface", default="lo", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        from benchmarks.workload import train

        train(args.one, warmup=args.warmup, steps=args.steps, batch_size=args.batch_size, devices=args.devices,
              num_nodes=args.nodes, interface=args.interface, result=args.result, all_ranks=True)
        return
    if args.suite is None:
        parser.error(f"--suite is required: choose {', '.join(_SUITE_OPTIONS)}")
    _resolve_options(parser, args)
    # `kill` of the benchmark must still delete the network namespaces it built (the `finally` blocks run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    written = [args.out / f"{args.suite}.csv"]
    if args.suite == "overhead":
        rows = _overhead(args)
        _plot_overhead(rows, args.out / "overhead.png")
        written.append(args.out / "overhead.png")
    elif args.suite == "comm":
        rows = _median_rows(_comm(args))
        print(_table(rows, args))
        _plot(rows, args.out / "comm.png")
        written.append(args.out / "comm.png")
    else:
        results = _accuracy(args)
        write_csv(args.out / "accuracy_curves.csv", accuracy.curve_rows(results))
        rows, budget = accuracy.summarize(results, args.budget_seconds)
        print(accuracy.table(rows, budget))
        print("\n".join(accuracy.claims(rows)))
        accuracy.plot(results, budget, args.out / "accuracy.png")
        written += [args.out / "accuracy_curves.csv", args.out / "accuracy.png"]
    write_csv(written[0], rows)
    print(f"results: {', '.join(str(path) for path in written)}", file=sys.stderr)


if __name__ == "__main__":
    main()
