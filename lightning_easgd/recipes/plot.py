"""Draw the paper's figures for your own runs: ``python -m lightning_easgd.recipes.plot RUN_DIR [RUN_DIR ...]``.

Reads the CSV logs the recipes write (``<run dir>/csv/metrics.csv``) and saves three PNGs:

* ``error_vs_time.png``: the center's top-1 error (``1 - val/acc``) against training wall-clock time
  (``time/train_s``: seconds spent training, evaluation excluded), like the paper's Figures 2-5;
* ``error_vs_epoch.png``: the same error against epochs;
* ``distance_vs_step.png``: the mean (solid) and largest (dashed) worker-center distance against the optimizer
  step (``easgd/distance_mean``, ``easgd/distance_max``), for runs that logged an exchange; it is not drawn, and
  the command says so, when none did (not an EASGD run, or fewer steps than ``tau``).

Series of up to :data:`MARKERS_UP_TO` points get markers, so that a run with a single validation or exchange is
visible. A RUN_DIR may also be a multirun sweep directory: every ``metrics.csv`` below it is one curve. Curves are
labelled with the Hydra overrides that differ between the runs (from ``.hydra/overrides.yaml``, ``hydra.*`` left
out); a run that differs in none, e.g. a single run, with its strategy, tau, p and learning rate (from
``.hydra/config.yaml``); or with ``--labels``. Errors are one line on stderr and exit status 1.
With the recipes' default ``data.val_size=0`` the validation split *is* the test split, so the error curves are
the center's test error, as in the paper.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from omegaconf import OmegaConf

__all__ = ["MARKERS_UP_TO", "Run", "find_runs", "main", "plot_runs", "skipped"]

MARKERS_UP_TO = 50
"""Series with at most this many points are drawn with markers (a one-point line is otherwise invisible)."""


@dataclass
class Run:
    """The columns of one run's ``metrics.csv`` that the figures use."""

    label: str
    path: Path
    epoch: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    val_error: list[float] = field(default_factory=list)
    distance_step: list[float] = field(default_factory=list)
    distance_mean: list[float] = field(default_factory=list)
    distance_max: list[float] = field(default_factory=list)
    test_acc: float | None = None


def _float(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _overrides(metrics_csv: Path) -> list[str] | None:
    """The command-line overrides of the Hydra run that wrote ``metrics_csv``, if its ``.hydra/`` is found."""
    for parent in metrics_csv.parents:
        overrides = parent / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            # Hydra writes a YAML list of strings, one "- key=value" line per override.
            lines = overrides.read_text().splitlines()
            return [line[2:].strip().strip("'\"") for line in lines if line.startswith("- ")]
    return None


def _read(path: Path, label: str) -> Run:
    run = Run(label=label, path=path)
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            acc, step = _float(row.get("val/acc")), _float(row.get("step"))
            if acc is not None:
                epoch, train_s = _float(row.get("epoch")), _float(row.get("time/train_s"))
                run.val_error.append(100.0 * (1.0 - acc))
                run.epoch.append(math.nan if epoch is None else epoch + 1)
                run.train_s.append(math.nan if train_s is None else train_s)
            distance = _float(row.get("easgd/distance_mean"))
            if distance is not None and step is not None:
                largest = _float(row.get("easgd/distance_max"))
                run.distance_step.append(step)
                run.distance_mean.append(distance)
                run.distance_max.append(math.nan if largest is None else largest)
            test_acc = _float(row.get("test/acc"))
            if test_acc is not None:
                run.test_acc = test_acc
    return run


def find_runs(paths: Sequence[str | Path], labels: Sequence[str] | None = None) -> list[Run]:
    """Load every ``metrics.csv`` under ``paths`` (run or sweep directories, or CSV files).

    Args:
        paths: Run directories, multirun sweep directories, or ``metrics.csv`` files.
        labels: One label per run found, in order; by default the overrides that differ between runs.

    Raises:
        FileNotFoundError: a path does not exist or holds no ``metrics.csv``.
        ValueError: the number of labels does not match the number of runs.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
            continue
        if not path.is_dir():
            raise FileNotFoundError(f"{str(path)!r} does not exist; pass run directories written by the recipes")
        found = sorted(path.rglob("metrics.csv"))
        if not found:
            raise FileNotFoundError(
                f"no metrics.csv under {str(path)!r}; the recipes write <run dir>/csv/metrics.csv (logger=default "
                "or logger=csv)"
            )
        files.extend(found)
    if labels is not None and len(labels) != len(files):
        raise ValueError(f"got {len(labels)} labels for {len(files)} runs: {[str(f) for f in files]}")
    if labels is None:
        overrides = [[o for o in _overrides(f) or [] if not o.startswith("hydra.")] for f in files]
        common = set.intersection(*(set(o) for o in overrides)) if len(files) > 1 else set()
        labels = []
        for file, run_overrides in zip(files, overrides):
            distinct = [o for o in run_overrides if o not in common] if len(files) > 1 else []
            labels.append(" ".join(distinct) if distinct else _settings(file))
    return [_read(file, label) for file, label in zip(files, labels)]


def _run_dir(metrics_csv: Path) -> Path:
    return metrics_csv.parent.parent if metrics_csv.parent.name == "csv" else metrics_csv.parent


def _settings(metrics_csv: Path) -> str:
    """A label from the run's settings (``.hydra/config.yaml``): strategy, tau, p and learning rate; the run
    directory's name when there is no config (a CSV copied out of its run)."""
    config_file = next((parent / ".hydra" / "config.yaml" for parent in metrics_csv.parents
                        if (parent / ".hydra" / "config.yaml").is_file()), None)
    if config_file is None:
        return _run_dir(metrics_csv).name
    config = OmegaConf.load(config_file)

    def get(key: str) -> object:
        return OmegaConf.select(config, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)

    strategy = str(get("strategy._target_") or "").rpartition(".")[2]
    devices, nodes = get("trainer.devices"), get("trainer.num_nodes") or 1
    parts = [strategy.removesuffix("Strategy") or None,
             f"tau={get('strategy.tau')}" if get("strategy.tau") is not None else None,
             f"p={devices * nodes}" if isinstance(devices, int) and isinstance(nodes, int) else None,
             f"lr={get('optimizer.lr')}" if get("optimizer.lr") is not None else None]
    return " ".join(part for part in parts if part) or _run_dir(metrics_csv).name


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def _marker(points: int, marker: str) -> dict[str, object]:
    """Markers for a short series: a line through one point draws nothing."""
    return {"marker": marker, "markersize": 4} if points <= MARKERS_UP_TO else {}


def _finish(axes: Axes, x_label: str, y_label: str, title: str) -> None:
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")


def skipped(runs: Sequence[Run]) -> list[str]:
    """What the figures leave out, one line each: runs without validation, and the distance figure's runs without an
    exchange (or the whole figure when no run had one)."""
    lines = [f"{run.label} ({run.path}): no val/acc logged, left out of the error figures" for run in runs
             if not run.val_error]
    without = [run for run in runs if not run.distance_mean]
    if len(without) == len(runs):
        lines.append("distance_vs_step.png not drawn: no run logged easgd/distance_mean (not an EASGD run with "
                     "ElasticDistanceMonitor, or fewer optimizer steps than tau, so no exchange)")
    else:
        lines += [f"{run.label} ({run.path}): no exchange logged, left out of distance_vs_step.png" for run in without]
    return lines


def plot_runs(runs: Sequence[Run], out_dir: str | Path, title: str | None = None) -> list[Path]:
    """Draw the figures for ``runs`` into ``out_dir`` and return the files written (:func:`skipped` says what was
    left out).

    Raises:
        ValueError: no run logged ``val/acc`` (nothing to draw).
    """
    if not any(run.val_error for run in runs):
        raise ValueError(f"none of {[str(r.path) for r in runs]} logged val/acc; did validation run?")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for x_name, x_label, file_name in (
        ("train_s", "training wall-clock time (s, evaluation excluded)", "error_vs_time.png"),
        ("epoch", "epoch", "error_vs_epoch.png"),
    ):
        figure = Figure(figsize=(6.4, 4.4))
        axes = figure.add_subplot()
        for run in runs:
            if run.val_error:
                axes.plot(getattr(run, x_name), run.val_error, label=run.label, **_marker(len(run.val_error), "o"))
        _finish(axes, x_label, "center top-1 error (%)", title or "EASGD center error")
        written.append(_save(figure, out / file_name))
    with_distance = [run for run in runs if run.distance_mean]
    if with_distance:
        figure = Figure(figsize=(6.4, 4.4))
        axes = figure.add_subplot()
        for run in with_distance:
            points = len(run.distance_step)
            (line,) = axes.plot(run.distance_step, run.distance_mean, label=f"{run.label} (mean)",
                                **_marker(points, "o"))
            axes.plot(run.distance_step, run.distance_max, linestyle="--", linewidth=0.8, color=line.get_color(),
                      label=f"{run.label} (max)", **_marker(points, "^"))
        _finish(axes, "optimizer step", "worker-center distance ||x_i - center||",
                title or "EASGD worker-center distance")
        written.append(_save(figure, out / "distance_vs_step.png"))
    return written


def _summary(runs: Sequence[Run]) -> str:
    lines = []
    for run in runs:
        last_error = f"{run.val_error[-1]:.2f}%" if run.val_error else "n/a"
        test = f"{100 * run.test_acc:.2f}%" if run.test_acc is not None else "n/a"
        train_s = f"{run.train_s[-1]:.0f}s" if run.train_s and not math.isnan(run.train_s[-1]) else "n/a"
        lines.append(f"{run.label}: final center val error {last_error}, test acc {test}, training time {train_s}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Command-line entry point; returns the files written."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_easgd.recipes.plot", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("runs", nargs="+", help="run directories, multirun sweep directories or metrics.csv files")
    parser.add_argument("--out", help="directory for the PNGs (default: the first run directory)")
    parser.add_argument("--labels", nargs="+", help="one legend label per run found, in order")
    parser.add_argument("--title", help="figure title")
    args = parser.parse_args(argv)
    try:
        runs = find_runs(args.runs, args.labels)
        first = Path(args.runs[0])
        written = plot_runs(runs, args.out or (first.parent if first.is_file() else first), args.title)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{parser.prog}: error: {error}") from None
    print(_summary(runs))
    for line in skipped(runs):
        print(f"note: {line}")
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
