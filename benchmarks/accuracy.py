"""The accuracy suite: the center's test error against training wall-clock time, for EASGD/EAMSGD and the methods
users would pick instead, trained by the CIFAR-10 recipe on real data.

Every method is one run of ``recipes/cifar10.py`` (the paper's 7-layer net, 28×28 crops, batch 128 per worker,
constant learning rate, the presets in ``conf/experiment/``). Its p workers are launched as p one-process "nodes",
each in its own network namespace behind a link shaped to the given rate (``benchmarks/netlab.py``). The center is
evaluated on the test split several times per epoch (``data.val_size=0``), and the recipe's ``WallClockLogger``
stamps each result with the training time spent so far, evaluation excluded. One run per method gives both budgets:

* fixed epochs: the center's test error after ``epochs`` epochs (the recipe's final test of its last checkpoint);
* fixed wall clock: the error at the last evaluation within ``budget`` seconds of training. The learning rate is
  constant and nothing else in training depends on the budget, so this is what a run stopped at that time would
  have reported at its last evaluation.
* time to DDP's final error: the training seconds at which a setting's curve (the mean over its seeds) first
  reaches the final error of the best DDP setting on the same link after the same epochs (issue #19's target (b)).

Methods (``--methods``): ``msgd`` (one worker, the paper's MSGD preset), ``ddp`` (Lightning DDP: gradients
all-reduced every step), ``average:τ`` (local SGD with periodic model averaging, ``benchmarks/baselines.py``),
``easgd:τ`` and ``eamsgd:τ`` (the paper presets with period τ), ``easgd_async:τ`` and ``eamsgd_async:τ``, and the
reset rule's family members (docs/family.md) ``localsgd:τ`` (EASGDStrategy's own periodic averaging, reported beside
``average:τ``, the independent implementation), ``slowmo:τ`` and ``diloco:τ`` (the Hydra presets of those names).
DDP, periodic averaging and the reset family use EAMSGD's local optimizer (Nesterov momentum 0.99, lr 0.01), so that
only the communication scheme differs; ``msgd`` never communicates, so it runs once, at the first rate. Checkpoints (one
per evaluation, for the final test) hold the center only for every method.

Options follow, each after a colon (``eamsgd:16:cm0.5:warm500:lr0.01:seed1``): ``lrη`` (the learning rate) and
``seedN`` (the recipe's seed) for every method; ``cmμ`` / ``cnμ`` (center momentum μ in (0, 1), heavy ball /
Nesterov; docs/center_momentum.md) for ``easgd``, ``eamsgd`` and the reset family; ``warmW`` (exchange at every step
during the first W optimizer steps, then every τ) for the elastic methods; ``syncN`` (a synchronous start: the
first N optimizer steps average gradients as DDP does, then local steps; not with ``warmW``) for the synchronous
EASGDStrategy methods; ``bf16`` (``exchange_dtype=bfloat16``: the exchanges send d_i in bfloat16, half the bytes;
the synchronous start's gradients stay float32) for the same methods, and for ``ddp`` (every step's gradients
all-reduced in bfloat16 by PyTorch's ``bf16_compress_hook``, half DDP's bytes: ``benchmarks/baselines.py``).
"""

from __future__ import annotations

import csv
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.procs import launch_env, node_env, run_all

REPOSITORY = Path(__file__).resolve().parent.parent
RECIPE = REPOSITORY / "recipes" / "cifar10.py"
DEFAULT_METHODS = ("msgd", "ddp", "average:16", "easgd:16", "eamsgd:4", "eamsgd:16", "eamsgd:64")

# The Hydra overrides that select each method; τ is added to those that take one.
_METHODS: dict[str, tuple[str, ...]] = {
    "msgd": ("experiment=cifar10_paper_msgd",),
    "ddp": ("experiment=cifar10_paper_eamsgd", "strategy=ddp"),
    "average": ("experiment=cifar10_paper_eamsgd", "strategy=ddp",
                "strategy._target_=benchmarks.baselines.PeriodicAveragingStrategy"),
    "easgd": ("experiment=cifar10_paper_easgd",),
    "eamsgd": ("experiment=cifar10_paper_eamsgd",),
    "easgd_async": ("experiment=cifar10_paper_easgd", "strategy=easgd_async"),
    "eamsgd_async": ("experiment=cifar10_paper_eamsgd", "strategy=eamsgd_async"),
    "localsgd": ("experiment=cifar10_paper_eamsgd", "strategy=local_sgd"),
    "slowmo": ("experiment=cifar10_paper_eamsgd", "strategy=slowmo"),
    "diloco": ("experiment=cifar10_paper_eamsgd", "strategy=diloco"),
}
_WITHOUT_PERIOD = ("msgd", "ddp")
_RESET = ("localsgd", "slowmo", "diloco")
_ELASTIC = ("easgd", "eamsgd", "easgd_async", "eamsgd_async", *_RESET)


_CENTER_MOMENTUM = ("easgd", "eamsgd", *_RESET)  # the asynchronous strategy refuses center momentum
_SYNC_START = _CENTER_MOMENTUM  # and a synchronous start
_BF16 = ("ddp", *_SYNC_START)  # DDP by PyTorch's bfloat16 compression hook, the others by exchange_dtype
_OPTIONS = ("lrETA, seedN, cmMU or cnMU (easgd, eamsgd, localsgd, slowmo, diloco; 0 < MU < 1), warmW (elastic "
            "methods; W >= 1), syncN (easgd, eamsgd, localsgd, slowmo, diloco; N >= 1; not with warmW), bf16 "
            "(ddp, easgd, eamsgd, localsgd, slowmo, diloco)")


@dataclass(frozen=True)
class Method:
    """One training method of the comparison, e.g. ``Method("eamsgd", 16)`` or, with options,
    ``Method("eamsgd", 16, center_momentum=0.5, warmup_steps=500)``."""

    name: str
    tau: int | None = None
    center_momentum: float = 0.0
    center_nesterov: bool = False
    warmup_steps: int = 0
    lr: float | None = None
    seed: int | None = None
    sync_steps: int = 0
    exchange_bf16: bool = False

    @classmethod
    def parse(cls, text: str) -> Method:
        """``"eamsgd:16:cm0.5"`` -> ``Method("eamsgd", 16, center_momentum=0.5)``; raises ValueError naming what is
        allowed."""
        name, *tokens = text.split(":")
        periodic = name in _METHODS and name not in _WITHOUT_PERIOD
        tau = None
        if periodic and tokens and tokens[0].isdigit() and int(tokens[0]) >= 1:
            tau = int(tokens.pop(0))
        options = [_option(name, token) for token in tokens]
        keys = [key for option in options if option for key in option if key != "center_nesterov"]
        both_starts = {"warmup_steps", "sync_steps"} <= set(keys)  # the strategy refuses the combination
        if (name in _METHODS and periodic == (tau is not None) and all(options) and len(keys) == len(set(keys))
                and not both_starts):
            return cls(name, tau, **{k: v for option in options for k, v in option.items()})  # type: ignore[union-attr]
        periodic_names = ", ".join(f"{m}:TAU" for m in _METHODS if m not in _WITHOUT_PERIOD)
        raise ValueError(f"method={text!r} is invalid: use {', '.join(_WITHOUT_PERIOD)}, or {periodic_names} with "
                         f"TAU >= 1, each followed by options :OPTION, at most one of each kind: {_OPTIONS}")

    @property
    def label(self) -> str:
        tokens = [self.name] + ([] if self.tau is None else [str(self.tau)])
        if self.center_momentum:
            tokens.append(f"{'cn' if self.center_nesterov else 'cm'}{self.center_momentum!r}")
        if self.warmup_steps:
            tokens.append(f"warm{self.warmup_steps}")
        if self.sync_steps:
            tokens.append(f"sync{self.sync_steps}")
        if self.exchange_bf16:
            tokens.append("bf16")
        if self.lr is not None:
            tokens.append(f"lr{self.lr!r}")
        if self.seed is not None:
            tokens.append(f"seed{self.seed}")
        return ":".join(tokens)

    @property
    def seedless(self) -> Method:
        """The same method with the recipe's default seed: runs that differ only in the seed are one setting."""
        return replace(self, seed=None)

    @property
    def plain(self) -> bool:
        """Whether this is the method's preset as it is, without options."""
        return self == Method(self.name, self.tau)

    @property
    def communicates(self) -> bool:
        return self.name != "msgd"

    def workers(self, processes: int) -> int:
        return processes if self.communicates else 1

    def overrides(self) -> list[str]:
        """The recipe overrides that select this method."""
        selected = list(_METHODS[self.name])
        if self.name in _ELASTIC:
            # Checkpoints keep the center only, as the baselines' do: every worker's state would add a gather to
            # rank 0 per checkpoint (one per evaluation here) to the traffic and the training time measured.
            selected.append("strategy.save_worker_states=false")
        if self.name == "average":
            selected.append(f"+strategy.period={self.tau}")
        elif self.tau is not None:
            selected.append(f"strategy.tau={self.tau}")
        if self.center_momentum:
            selected += [f"strategy.center_momentum={self.center_momentum!r}",
                         f"strategy.center_nesterov={str(self.center_nesterov).lower()}"]
        if self.warmup_steps:
            selected += [f"strategy.warmup_steps={self.warmup_steps}", "strategy.warmup_tau=1"]
        if self.sync_steps:
            selected.append(f"strategy.sync_steps={self.sync_steps}")
        if self.exchange_bf16:  # not in the presets: their defaults exchange in float32
            selected.append("strategy._target_=benchmarks.baselines.BF16CompressedDDPStrategy" if self.name == "ddp"
                            else "+strategy.exchange_dtype=bfloat16")
        if self.lr is not None:
            selected.append(f"optimizer.lr={self.lr!r}")
        if self.seed is not None:
            selected.append(f"seed={self.seed}")
        return selected


def _option(name: str, token: str) -> dict[str, float | int | bool] | None:
    """One ``:OPTION`` of a method, as Method fields, or None if ``name`` does not take it (or it is malformed)."""
    if token == "bf16":
        return {"exchange_bf16": True} if name in _BF16 else None
    for prefix, value_type in (("cm", float), ("cn", float), ("warm", int), ("sync", int), ("lr", float),
                               ("seed", int)):
        if token.startswith(prefix):
            try:
                value = value_type(token[len(prefix):])
            except ValueError:
                return None
            break
    else:
        return None
    if prefix in ("cm", "cn"):
        ok = name in _CENTER_MOMENTUM and 0.0 < value < 1.0
        return {"center_momentum": value, "center_nesterov": prefix == "cn"} if ok else None
    if prefix == "warm":
        return {"warmup_steps": value} if name in _ELASTIC and value >= 1 else None
    if prefix == "sync":
        return {"sync_steps": value} if name in _SYNC_START and value >= 1 else None
    if prefix == "lr":
        return {"lr": value} if math.isfinite(value) and value > 0 else None
    return {"seed": value} if value >= 0 else None


@dataclass
class Curve:
    """The center's test error (%) at each evaluation of one run, against epochs and training seconds."""

    epoch: list[float]
    train_s: list[float]
    error: list[float]

    def error_within(self, seconds: float) -> float | None:
        """Error at the last evaluation with at most ``seconds`` of training; None if there was none yet."""
        within = [e for t, e in zip(self.train_s, self.error) if t <= seconds]
        return within[-1] if within else None

    def seconds_to(self, error: float) -> float | None:
        """Training seconds at the first evaluation at or below ``error``; None if the run never got there."""
        return next((t for t, e in zip(self.train_s, self.error) if e <= error), None)

    @classmethod
    def mean(cls, curves: Sequence[Curve]) -> Curve:
        """The pointwise mean of runs that differ only in the seed (the same evaluation schedule): a setting's
        time to an error is read from it, so that a mean over seeds is judged as one curve, not as the slowest
        seed. Seeds stopped at different points are averaged over the evaluations all of them reached."""
        length = min(len(c.error) for c in curves)
        columns = [(c.epoch[:length], c.train_s[:length], c.error[:length]) for c in curves]
        return cls(*([sum(values) / len(curves) for values in zip(*field)] for field in zip(*columns)))


def recipe_command(method: Method, *, processes: int, epochs: int, evals_per_epoch: int, batch_size: int,
                   data_dir: Path, run_dir: Path, extra: Sequence[str]) -> list[str]:
    """The recipe command line one worker of ``method`` runs."""
    workers = method.workers(processes)
    return [
        sys.executable, str(RECIPE), *method.overrides(), "trainer=cpu", "trainer.devices=1",
        f"trainer.num_nodes={workers}", f"trainer.max_epochs={epochs}",
        f"trainer.val_check_interval={1 / evals_per_epoch}", f"data.batch_size={batch_size}",
        f"data.data_dir={data_dir}", "data.verify_integrity=false", "data.num_workers=0", "logger=csv",
        "callbacks.progress_bar=null", "ckpt_path=null", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


@dataclass
class Result:
    """One finished run: which method on which link, its curve, its final test error (%), the wall-clock seconds
    the whole run took (start-up and evaluation included) and the megabytes each worker's interface sent."""

    rate: str
    method: Method
    workers: int
    epochs: int
    curve: Curve
    test_error: float
    wall_seconds: float
    sent_mb: float


def train_one(method: Method, hosts: Sequence[Any], *, rate: str, port: int, processes: int, epochs: int,
              run_dir: Path, timeout: float, **recipe: Any) -> Result:
    """Run ``method`` to completion on ``hosts`` (:class:`benchmarks.netlab.Host`, the first p are used)."""
    from lightning_easgd.recipes.plot import find_runs

    workers = method.workers(processes)
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a stale metrics.csv would mix two runs' curves
    command = recipe_command(method, processes=processes, epochs=epochs, run_dir=run_dir, **recipe)
    used = list(hosts[:workers])
    commands = [host.command(command, node_env(rank, host) if workers > 1 else {}) for rank, host in enumerate(used)]
    sent_before = [host.tx_bytes() for host in used]
    start = time.perf_counter()
    run_all(commands, {**launch_env(used, port, workers), "PYTHONPATH": str(REPOSITORY)}, timeout)
    wall = time.perf_counter() - start
    sent = [host.tx_bytes() - before for host, before in zip(used, sent_before)]
    run = find_runs([run_dir / "csv" / "metrics.csv"], [method.label])[0]
    if run.test_acc is None or not run.val_error:
        raise RuntimeError(f"{method.label}: {run_dir / 'csv' / 'metrics.csv'} holds no val/acc or test/acc")
    return Result(rate=rate if method.communicates else "any", method=method, workers=workers, epochs=epochs,
                  curve=Curve(epoch=run.epoch, train_s=run.train_s, error=run.val_error),
                  test_error=100.0 * (1.0 - run.test_acc), wall_seconds=wall, sent_mb=sum(sent) / len(sent) / 1e6)


def load_results(directory: Path) -> list[Result]:
    """The runs an earlier accuracy suite wrote to ``directory`` (its ``accuracy.csv`` and ``accuracy_curves.csv``),
    so that a comparison run in several sittings (a learning-rate grid, a second seed) is reported as one."""
    try:
        with open(directory / "accuracy.csv", newline="") as runs_file, \
                open(directory / "accuracy_curves.csv", newline="") as curves_file:
            runs, points = list(csv.DictReader(runs_file)), list(csv.DictReader(curves_file))
    except (FileNotFoundError, NotADirectoryError) as error:
        raise ValueError(f"--include {directory} is invalid: it must be a directory holding the accuracy.csv and "
                         f"accuracy_curves.csv of an accuracy suite run ({error.filename} is missing)") from None
    # A report over several horizons holds one method's curve once per horizon: the key carries the run's epochs
    # (curves written before they did are keyed without them).
    curves: dict[tuple[str, str, str | None], Curve] = {}
    for point in points:
        curve = curves.setdefault((point["rate_mbit"], point["method"], point.get("epochs")), Curve([], [], []))
        curve.epoch.append(float(point["epoch"]))
        curve.train_s.append(float(point["train_seconds"]))
        curve.error.append(float(point["error"]))
    dated = bool(points) and "epochs" in points[0]
    return [Result(rate=run["rate_mbit"], method=Method.parse(run["method"]), workers=int(run["workers"]),
                   epochs=int(run["epochs"]),
                   curve=curves[run["rate_mbit"], run["method"], run["epochs"] if dated else None],
                   test_error=float(run["test_error_after_epochs"]), wall_seconds=float(run["wall_seconds"]),
                   sent_mb=float(run["sent_mb_per_worker"])) for run in runs]


def summarize(results: list[Result], budget: float | None) -> tuple[list[dict[str, Any]], float]:
    """Table rows with the error at the wall-clock budget and the time to DDP's final error; the budget defaults to
    the shortest run's training time (so that every method is compared at a time all of them reached).

    ``ddp_error`` is the lowest final error (mean over seeds) of the DDP settings on the same link after the same
    epochs, and ``seconds_to_ddp_error`` the training time at which a setting's seed-mean curve first reaches it:
    the same for every seed of a setting, NaN where the setting never got there or no DDP run is comparable."""
    if budget is None:
        budget = min(r.curve.train_s[-1] for r in results)
    settings: dict[tuple[str, str, int], list[Result]] = {}
    for r in results:
        settings.setdefault(_setting_of(r), []).append(r)
    targets: dict[tuple[str, int], float] = {}
    for (rate, label, epochs), runs in settings.items():
        if Method.parse(label).name == "ddp":
            mean_error = sum(r.test_error for r in runs) / len(runs)
            targets[rate, epochs] = min(mean_error, targets.get((rate, epochs), math.inf))
    reached: dict[tuple[str, str, int], float | None] = {
        key: Curve.mean([r.curve for r in runs]).seconds_to(targets[key[0], key[2]])
        for key, runs in settings.items() if (key[0], key[2]) in targets}
    rows = []
    for r in results:
        at_budget = r.curve.error_within(budget)
        seconds_to_ddp = reached.get(_setting_of(r))
        rows.append({
            "rate_mbit": r.rate, "method": r.method.label, "workers": r.workers, "epochs": r.epochs,
            "train_seconds": r.curve.train_s[-1], "wall_seconds": r.wall_seconds,
            "test_error_after_epochs": r.test_error,
            "error_at_budget": math.nan if at_budget is None else at_budget, "budget_seconds": budget,
            "best_error": min(r.curve.error), "sent_mb_per_worker": r.sent_mb,
            "ddp_error": targets.get((r.rate, r.epochs), math.nan),
            "seconds_to_ddp_error": math.nan if seconds_to_ddp is None else seconds_to_ddp,
        })  # fmt: skip
    return rows, budget


def _setting_of(result: Result) -> tuple[str, str, int]:
    """Runs that differ only in the seed are one setting: the same method on the same link for the same epochs."""
    return result.rate, result.method.seedless.label, result.epochs


def seed_means(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per setting (link, method without its seed, epochs): the runs of ``rows`` that differ only in the
    seed, averaged.

    The issue's targets are judged on means over seeds; ``errors_after_epochs`` keeps each seed's value so that a
    mean is never reported without them. An error at the budget that one seed did not reach makes the mean NaN."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["rate_mbit"], Method.parse(row["method"]).seedless.label, row["epochs"]), []).append(row)
    means = []
    for (rate, label, _), runs in groups.items():
        mean = {key: sum(r[key] for r in runs) / len(runs) for key in _AVERAGED if key in runs[0]}
        means.append({**runs[0], **mean, "rate_mbit": rate, "method": label, "seeds": len(runs),
                      "errors_after_epochs": [r["test_error_after_epochs"] for r in runs]})
    return means


_AVERAGED = ("train_seconds", "wall_seconds", "test_error_after_epochs", "error_at_budget", "best_error",
             "sent_mb_per_worker")


def curve_rows(results: list[Result]) -> list[dict[str, Any]]:
    """Every evaluation of every run, one row each (``accuracy_curves.csv``)."""
    return [{"rate_mbit": r.rate, "method": r.method.label, "epochs": r.epochs, "epoch": epoch,
             "train_seconds": seconds, "error": error}
            for r in results for epoch, seconds, error in zip(r.curve.epoch, r.curve.train_s, r.curve.error)]


def table(rows: list[dict[str, Any]], budget: float) -> str:
    """One line per run, then one per setting run with several seeds (their mean, method labelled ``mean of N``)."""
    rows = rows + [{**r, "method": f"{r['method']} (mean of {r['seeds']})"} for r in seed_means(rows) if r["seeds"] > 1]
    width = max([15] + [len(r["method"]) for r in rows])
    header = (f"{'link':>9} {'method':<{width}} {'p':>2} {'epochs':>6} {'train s':>8} {'err @ epochs':>12} "
              f"{f'err @ {budget:.0f} s':>12} {'best err':>8} {'MB sent/worker':>14} {'s to DDP err':>12}")
    lines = [header]
    for r in rows:
        at_budget = "-" if math.isnan(r["error_at_budget"]) else f"{r['error_at_budget']:.2f}"
        to_ddp = "-" if math.isnan(r["seconds_to_ddp_error"]) else f"{r['seconds_to_ddp_error']:.0f}"
        lines.append(f"{r['rate_mbit']!s:>9} {r['method']:<{width}} {r['workers']:>2} {r['epochs']:>6} "
                     f"{r['train_seconds']:>8.0f} {r['test_error_after_epochs']:>12.2f} {at_budget:>12} "
                     f"{r['best_error']:>8.2f} {r['sent_mb_per_worker']:>14.1f} {to_ddp:>12}")
    return "\n".join(lines)


def claims(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's qualitative claims and the issues' targets, checked per link rate and horizon (epochs); the
    horizon is named only where a link was run for several. Runs that differ only in the seed count as one setting,
    their mean."""
    out = []
    rows = seed_means(rows)
    horizons = {(r["rate_mbit"], r["epochs"]) for r in rows}
    for rate, epochs in dict.fromkeys((r["rate_mbit"], r["epochs"]) for r in rows):
        here = {r["method"]: r for r in rows if (r["rate_mbit"], r["epochs"]) == (rate, epochs)}
        several = sum(1 for link, _ in horizons if link == rate) > 1
        link = f"{link_name(rate)}, {epochs} epochs" if several else link_name(rate)
        out += [f"{link}: {claim}" for claim in _paper_claims(here) + _issue_targets(here)]
    return out


def _paper_claims(here: dict[str, dict[str, Any]]) -> list[str]:
    """At the wall-clock budget, on the presets without options: EAMSGD beats DDP and periodic averaging, and a
    larger τ costs little accuracy for τ-fold less traffic."""
    out = []
    methods = {m: Method.parse(m) for m in here}
    eamsgd = {methods[m].tau: r for m, r in here.items() if methods[m].name == "eamsgd" and methods[m].plain}
    baselines = {m: r for m, r in here.items() if methods[m].name in ("ddp", "average") and methods[m].plain}
    if eamsgd and baselines:
        tau, best = min(eamsgd.items(), key=lambda item: _at_budget(item[1]))
        name, rival = min(baselines.items(), key=lambda item: _at_budget(item[1]))
        verdict = "holds" if _at_budget(best) < _at_budget(rival) else "does not hold"
        out.append(f"EAMSGD beats the synchronous and averaging baselines at the budget: {verdict} "
                   f"(EAMSGD τ={tau} {_at_budget(best):.2f}% vs best baseline {name} {_at_budget(rival):.2f}%)")
    if len(eamsgd) > 1:
        small, large = min(eamsgd), max(eamsgd)
        cost = _at_budget(eamsgd[large]) - _at_budget(eamsgd[small])
        traffic = _fewer_bytes(eamsgd[small], eamsgd[large])
        out.append(f"EAMSGD τ={large} vs τ={small}: {cost:+.2f} points of error at the budget, "
                   f"{traffic:.1f}x less traffic (τ ratio {large / small:.0f})")
    return out


def _issue_targets(here: dict[str, dict[str, Any]]) -> list[str]:
    """The targets for the best EASGD-family setting with τ ≥ 16 (options included) against the best DDP setting.

    Issue #12: within 1 point after the epochs while sending at least 16x fewer bytes, and below every DDP and
    periodic-averaging setting at the budget. Issue #19: within 0.5 points (a mean of at least 2 seeds on both
    sides) while sending at most 1/8 of DDP's bytes, and, on a shaped link, at DDP's final error in at most 0.75x
    the training time DDP took to get there."""
    out = []
    methods = {m: Method.parse(m) for m in here}
    family = {m: r for m, r in here.items() if methods[m].name in _ELASTIC and (methods[m].tau or 0) >= 16}
    ddps = {m: r for m, r in here.items() if methods[m].name == "ddp"}
    averages = {m: r for m, r in here.items() if methods[m].name == "average"}
    if not (family and ddps):
        return out
    ddp_name, ddp = min(ddps.items(), key=lambda item: item[1]["test_error_after_epochs"])
    name, best = min(family.items(), key=lambda item: item[1]["test_error_after_epochs"])
    gap = best["test_error_after_epochs"] - ddp["test_error_after_epochs"]
    fewer = _fewer_bytes(ddp, best)
    verdict = "holds" if gap <= 1.0 and fewer >= 16.0 else "does not hold"
    out.append(f"best EASGD-family setting with τ >= 16 within 1 point of DDP after {best['epochs']} epochs, "
               f"sending >= 16x fewer bytes: {verdict} ({name} {_after_epochs(best)} vs {ddp_name} "
               f"{_after_epochs(ddp)}, {gap:+.2f} points, {fewer:.1f}x fewer bytes)")
    if averages:
        name, best = min(family.items(), key=lambda item: _at_budget(item[1]))
        rival_name, rival = min({**ddps, **averages}.items(), key=lambda item: _at_budget(item[1]))
        verdict = "holds" if _at_budget(best) < _at_budget(rival) else "does not hold"
        out.append(f"best EASGD-family setting with τ >= 16 beats DDP and periodic averaging at the budget: "
                   f"{verdict} ({name} {_at_budget(best):.2f}% vs {rival_name} {_at_budget(rival):.2f}%)")
    frugal = {m: r for m, r in family.items() if 8 * r["sent_mb_per_worker"] <= ddp["sent_mb_per_worker"]}
    if not frugal:
        return out
    # Judged on settings run with 2 seeds or more; a lucky single seed is reported, never judged.
    seeded = {m: r for m, r in frugal.items() if r["seeds"] >= 2}
    name, best = min((seeded or frugal).items(), key=lambda item: item[1]["test_error_after_epochs"])
    gap = best["test_error_after_epochs"] - ddp["test_error_after_epochs"]
    judged = best["seeds"] >= 2 and ddp["seeds"] >= 2
    verdict = "not judged, fewer than 2 seeds" if not judged else "holds" if gap <= 0.5 else "does not hold"
    out.append(f"best EASGD-family setting with τ >= 16 sending <= 1/8 of DDP's bytes within 0.5 points of DDP "
               f"after {best['epochs']} epochs: {verdict} ({name} {_after_epochs(best)} vs {ddp_name} "
               f"{_after_epochs(ddp)}, {gap:+.2f} points, {_fewer_bytes(ddp, best):.1f}x fewer bytes)")
    if ddp["rate_mbit"] != "unshaped" and math.isfinite(_to_ddp(ddp)):
        name, best = min(frugal.items(), key=lambda item: _to_ddp(item[1]))
        ratio = _to_ddp(best) / _to_ddp(ddp)
        verdict = "holds" if ratio <= 0.75 else "does not hold"
        reached = "never" if math.isinf(ratio) else f"in {best['seconds_to_ddp_error']:.0f} s"
        out.append(f"fastest EASGD-family setting with τ >= 16 sending <= 1/8 of DDP's bytes at DDP's final error "
                   f"({ddp['test_error_after_epochs']:.2f}%) in <= 0.75x DDP's time: {verdict} ({name} {reached} "
                   f"vs {ddp_name} in {_to_ddp(ddp):.0f} s of training, ratio {ratio:.2f})")
    return out


def _after_epochs(row: dict[str, Any]) -> str:
    """``"40.12%"``, or ``"40.12% (mean of 2 seeds: 40.00, 40.24)"``."""
    if row["seeds"] == 1:
        return f"{row['test_error_after_epochs']:.2f}%"
    values = ", ".join(f"{e:.2f}" for e in row["errors_after_epochs"])
    return f"{row['test_error_after_epochs']:.2f}% (mean of {row['seeds']} seeds: {values})"


def link_name(label: str) -> str:
    """``"100"`` -> ``"100 Mbit/s"``; ``"unshaped"`` -> ``"unshaped link"``."""
    return "unshaped link" if label == "unshaped" else f"{label} Mbit/s"


def _at_budget(row: dict[str, Any]) -> float:
    return math.inf if math.isnan(row["error_at_budget"]) else row["error_at_budget"]


def _fewer_bytes(reference: dict[str, Any], row: dict[str, Any]) -> float:
    """How many times fewer bytes per worker ``row`` sent than ``reference`` (a run that sent none counts as
    1e-9 MB)."""
    return reference["sent_mb_per_worker"] / max(row["sent_mb_per_worker"], 1e-9)


def _to_ddp(row: dict[str, Any]) -> float:
    return math.inf if math.isnan(row["seconds_to_ddp_error"]) else row["seconds_to_ddp_error"]


def plot(results: list[Result], budget: float, path: Path) -> None:
    """Center test error against training time, one panel per link rate (the single worker drawn in each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r.rate for r in results if r.method.communicates))
    single = [r for r in results if not r.method.communicates]
    fig, axes = plt.subplots(1, max(1, len(rates)), figsize=(6 * max(1, len(rates)), 4.5), squeeze=False)
    for ax, rate in zip(axes[0], rates or [None]):
        for r in single + [r for r in results if r.rate == rate and r.method.communicates]:
            ax.plot(r.curve.train_s, r.curve.error, marker="o", markersize=2, label=r.method.label)
        ax.axvline(budget, color="gray", linestyle=":", label=f"budget {budget:.0f} s")
        ax.set_xlabel("training wall-clock time (s, evaluation excluded)")
        ax.set_ylabel("center test error (%)")
        ax.set_title("link: unshaped veth" if rate in (None, "unshaped") else f"link: {rate} Mbit/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
