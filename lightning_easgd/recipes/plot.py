"""Draw the paper's figures for your own runs: ``python -m lightning_easgd.recipes.plot RUN_DIR [RUN_DIR ...]``.

Reads the CSV logs the recipes write (``<run dir>/csv/metrics.csv``) and saves three PNGs:

* ``error_vs_time.png``: the center's top-1 error (``1 - val/acc``) against training wall-clock time
  (``time/train_s``: seconds spent training, evaluation excluded), like the paper's Figures 2-5;
* ``error_vs_epoch.png``: the same error against epochs;
* ``distance_vs_step.png``: the mean (solid) and largest (dashed) worker-center distance against the optimizer
  step (``easgd/distance_mean``, ``easgd/distance_max``), for runs that used EASGD.

A RUN_DIR may also be a multirun sweep directory: every ``metrics.csv`` below it is one curve. Curves are labelled
with the Hydra overrides that differ between the runs (from ``.hydra/overrides.yaml``), or with ``--labels``.
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

from matplotlib.figure import Figure

__all__ = ["Run", "find_runs", "main", "plot_runs"]


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
        overrides = [_overrides(f) for f in files]
        common = set.intersection(*(set(o) for o in overrides)) if all(o is not None for o in overrides) else set()
        labels = []
        for file, run_overrides in zip(files, overrides):
            distinct = [o for o in run_overrides or [] if o not in common]
            run_dir = file.parent.parent if file.parent.name == "csv" else file.parent
            labels.append(" ".join(distinct) if distinct else run_dir.name)
    return [_read(file, label) for file, label in zip(files, labels)]


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def plot_runs(runs: Sequence[Run], out_dir: str | Path, title: str | None = None) -> list[Path]:
    """Draw the figures for ``runs`` into ``out_dir`` and return the files written.

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
                axes.plot(getattr(run, x_name), run.val_error, marker="o", markersize=3, label=run.label)
        axes.set_xlabel(x_label)
        axes.set_ylabel("center top-1 error (%)")
        axes.set_title(title or "EASGD center error")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
        written.append(_save(figure, out / file_name))
    with_distance = [run for run in runs if run.distance_mean]
    if with_distance:
        figure = Figure(figsize=(6.4, 4.4))
        axes = figure.add_subplot()
        for run in with_distance:
            (line,) = axes.plot(run.distance_step, run.distance_mean, label=f"{run.label} (mean)")
            axes.plot(run.distance_step, run.distance_max, linestyle="--", linewidth=0.8, color=line.get_color())
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("worker-center distance ||x_i - center||")
        axes.set_title(title or "EASGD worker-center distance")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
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
    runs = find_runs(args.runs, args.labels)
    first = Path(args.runs[0])
    written = plot_runs(runs, args.out or (first.parent if first.is_file() else first), args.title)
    print(_summary(runs))
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
