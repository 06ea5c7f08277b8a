"""The classifier, the divide-on-plateau scheduler, the progress bar, the wall-clock logger and the plot command."""

from __future__ import annotations

import csv
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_easgd.recipes import plot as plot_module
from lightning_easgd.recipes.classifier import ImageClassifier, LRSchedulerSpec
from lightning_easgd.recipes.data import SyntheticDataModule
from lightning_easgd.recipes.loggers import TensorBoardLogger
from lightning_easgd.recipes.models import PaperCIFAR10Net
from lightning_easgd.recipes.plot import find_runs
from lightning_easgd.recipes.plot import main as plot_main
from lightning_easgd.recipes.progress import MetricsProgressBar
from lightning_easgd.recipes.schedulers import DivideOnPlateau
from lightning_easgd.recipes.wallclock import WallClockLogger


def _optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_divide_on_plateau_divides_by_5_then_2_then_stops() -> None:
    optimizer = _optimizer(0.1)
    scheduler = DivideOnPlateau(optimizer, divisors=(5, 2), patience=0)
    lrs = []
    for _ in range(4):
        scheduler.step(1.0)  # the loss never improves after the first step
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.1, 0.02, 0.01, 0.01])


def test_divide_on_plateau_state_round_trips(tmp_path: Path) -> None:
    optimizer = _optimizer(0.1)
    scheduler = DivideOnPlateau(optimizer, patience=0)
    scheduler.step(1.0)
    scheduler.step(1.0)
    state = scheduler.state_dict()
    assert state["num_divisions"] == 1 and state["divisors"] == [5.0, 2.0]
    restored = DivideOnPlateau(_optimizer(0.02), patience=0)
    torch.save(state, tmp_path / "scheduler.pt")
    restored.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))  # plain types only
    restored.step(1.0)  # the second plateau divides by 2, not by 5 again
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_divide_on_plateau_rejects_bad_divisors() -> None:
    with pytest.raises(ValueError, match="divisors must be a non-empty list of numbers > 1"):
        DivideOnPlateau(_optimizer(), divisors=(5, 0.5))


def test_scheduler_spec_needs_a_monitor_exactly_for_plateau_schedulers() -> None:
    with pytest.raises(ValueError, match="plateau schedulers need the name of a logged metric"):
        LRSchedulerSpec(partial(DivideOnPlateau)).build(_optimizer())
    with pytest.raises(ValueError, match="monitor='train/loss_epoch' does not fit StepLR"):
        LRSchedulerSpec(partial(torch.optim.lr_scheduler.StepLR, step_size=1), monitor="train/loss_epoch").build(
            _optimizer()
        )
    with pytest.raises(ValueError, match="interval must be 'epoch' or 'step'"):
        LRSchedulerSpec(partial(torch.optim.lr_scheduler.StepLR, step_size=1), interval="batch")  # type: ignore[arg-type]


def test_classifier_trains_with_the_plateau_schedule_and_logs_time(tmp_path: Path) -> None:
    """One process, a few epochs: the scheduler sees train/loss_epoch, and the clocks are logged with val/acc."""
    # threshold_mode="abs" with a huge threshold: no epoch counts as an improvement, so every epoch is a plateau.
    spec = LRSchedulerSpec(
        partial(DivideOnPlateau, patience=0, threshold=1e9, threshold_mode="abs"), monitor="train/loss_epoch"
    )
    module = ImageClassifier(PaperCIFAR10Net(), partial(torch.optim.SGD, lr=0.01), num_classes=10, lr_scheduler=spec)
    data = SyntheticDataModule(train_size=64, val_size=32, test_size=32, batch_size=16)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=4,
        log_every_n_steps=1,
        logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=""),
        callbacks=[WallClockLogger()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=data)
    # Epoch 1 ends: the first "best" is recorded. Epochs 2 and 3 are plateaus: / 5, then / 2. Epoch 4: no more.
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.001)
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    timed = [r for r in rows if r.get("val/acc")]
    assert len(timed) == 4
    train_s = [float(r["time/train_s"]) for r in timed]
    elapsed = [float(r["time/elapsed_s"]) for r in timed]
    assert all(0 < t <= e for t, e in zip(train_s, elapsed)) and train_s == sorted(train_s)
    assert {"val/acc_top5", "val/loss", "train/loss_epoch", "train/acc_step"} <= set(rows[0])
    results = trainer.test(module, datamodule=data, verbose=False)
    assert set(results[0]) == {"test/acc", "test/acc_top5", "test/loss"}


# The aten ops that make the host wait for a GPU: .item(), bool(), float() of a tensor (all _local_scalar_dense),
# and ops whose output size depends on the data.
_HOST_WAITS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "bincount"}


class _HostWaits(TorchDispatchMode):
    """Counts, per training batch, the ops that would make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.batch: int | None = None
        self.per_batch: Counter[int] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.batch is not None and func.overloadpacket.__name__ in _HOST_WAITS:
            self.per_batch[self.batch] += 1
        return func(*args, **(kwargs or {}))


class _TagBatches(pl.Callback):
    """A batch lasts from its on_train_batch_start to the next one's, so that Lightning's logging after the batch's
    callbacks counts too; validation is not counted."""

    def __init__(self, waits: _HostWaits) -> None:
        self.waits = waits

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.waits.batch = args[-1]

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.waits.batch = None


def test_training_steps_wait_for_the_device_only_to_log_or_redraw_the_bar(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    module = ImageClassifier(net, partial(torch.optim.SGD, lr=0.1), num_classes=10)
    data = SyntheticDataModule(image_size=8, train_size=12 * 16, val_size=16, test_size=16, batch_size=16)
    waits = _HostWaits()
    bar = MetricsProgressBar(["train/loss_step", "train/loss_epoch"], refresh_rate=4)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        log_every_n_steps=5,
        logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=""),
        callbacks=[bar, _TagBatches(waits)],
        num_sanity_val_steps=0,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with waits:
        trainer.fit(module, datamodule=data)
    # Batch 11, the last, also creates the validation loader's iterator (a seed read), so it is left out. Lightning
    # writes the logs after batches 4 and 9 and the bar redraws after batches 3 and 7; every other step runs free.
    assert {batch for batch in waits.per_batch if batch != 11} == {3, 4, 7, 9}, waits.per_batch
    # Nothing logged is lost: step and epoch values in the CSV, the loss in the bar.
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"train/loss_step", "train/acc_step", "train/loss_epoch", "train/acc_epoch", "val/acc"} <= logged
    shown = bar.get_metrics(trainer, module)
    assert {"train/loss_step", "train/loss_epoch", "val/acc"} <= set(shown)
    assert all(isinstance(shown[key], float) for key in ("train/loss_step", "train/loss_epoch"))


def test_metrics_progress_bar_wants_a_list_of_names() -> None:
    with pytest.raises(TypeError, match="metrics must be a sequence of metric names, got the string 'train/loss'"):
        MetricsProgressBar("train/loss")

def test_wall_clock_logger_state_round_trips() -> None:
    clock = WallClockLogger()
    clock.load_state_dict({"train_s": 12.5, "elapsed_s": 20.0})
    assert clock.state_dict() == {"train_s": 12.5, "elapsed_s": 20.0}


def _fake_run(run_dir: Path, tau: int, with_distance: bool = True) -> Path:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(f"- experiment=cifar10_paper_eamsgd\n- strategy.tau={tau}\n")
    (run_dir / "csv").mkdir()
    fields = ["epoch", "step", "val/acc", "time/train_s", "easgd/distance_mean", "easgd/distance_max", "test/acc"]
    with (run_dir / "csv" / "metrics.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        for epoch in range(3):
            if with_distance:
                writer.writerow({"step": 10 * epoch + 5, "easgd/distance_mean": 0.1 * tau, "easgd/distance_max": 0.2})
            writer.writerow(
                {"epoch": epoch, "step": 10 * epoch + 9, "val/acc": 0.3 + 0.1 * epoch, "time/train_s": 5 * epoch + 5}
            )
        writer.writerow({"epoch": 0, "step": 0, "test/acc": 0.55})
    return run_dir


def test_plot_draws_the_three_figures_with_distinct_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0", tau=1)
    _fake_run(sweep / "1", tau=4)
    out = tmp_path / "plots"
    written = plot_main([str(sweep), "--out", str(out)])
    assert sorted(p.name for p in written) == ["distance_vs_step.png", "error_vs_epoch.png", "error_vs_time.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)
    runs = find_runs([sweep])
    assert [r.label for r in runs] == ["strategy.tau=1", "strategy.tau=4"]  # the common override is dropped
    assert runs[0].val_error == pytest.approx([70.0, 60.0, 50.0]) and runs[0].epoch == [1, 2, 3]
    assert runs[0].train_s == [5, 10, 15] and runs[0].test_acc == pytest.approx(0.55)
    assert (
        "strategy.tau=4: final center val error 50.00%, test acc 55.00%, training time 15s" in capsys.readouterr().out
    )


def test_plot_without_distances_skips_that_figure(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "ddp", tau=1, with_distance=False)
    written = plot_main([str(run), "--labels", "DDP"])
    assert sorted(p.name for p in written) == ["error_vs_epoch.png", "error_vs_time.png"]
    assert all(p.parent == run for p in written)


def test_plot_errors_are_readable(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_runs([tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="no metrics.csv under"):
        find_runs([tmp_path])
    run = _fake_run(tmp_path / "run", tau=1)
    with pytest.raises(ValueError, match="got 2 labels for 1 runs"):
        find_runs([run], labels=["a", "b"])


@pytest.mark.parametrize(("args", "expected"), [
    (["{tmp}/empty"], "no metrics.csv under '{tmp}/empty'; the recipes write <run dir>/csv/metrics.csv"),
    (["{tmp}/nowhere"], "'{tmp}/nowhere' does not exist"),
    (["{tmp}/run", "--labels", "a", "b"], "got 2 labels for 1 runs"),
], ids=["no-csv", "missing", "labels"])
def test_the_plot_command_fails_in_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _fake_run(tmp_path / "run", tau=1)
    with pytest.raises(SystemExit) as exited:
        plot_main([arg.format(tmp=tmp_path) for arg in args])
    message = str(exited.value.code)
    assert message.startswith("python -m lightning_easgd.recipes.plot: error: ") and "\n" not in message
    assert expected.format(tmp=tmp_path) in message


def _captured_figures(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The figures the plot command saves, by file name."""
    figures: dict[str, Any] = {}
    save = plot_module._save

    def capture(figure: Any, path: Path) -> Path:
        figures[path.name] = figure
        return save(figure, path)

    monkeypatch.setattr(plot_module, "_save", capture)
    return figures


def test_one_exchange_is_drawn_with_markers_and_every_line_style_has_a_legend_entry(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    (run / "csv").mkdir(parents=True)
    (run / "csv" / "metrics.csv").write_text("epoch,step,val/acc,time/train_s,easgd/distance_mean,easgd/distance_max\n"
                                             ",3,,,0.25,0.5\n0,5,0.4,2.0,,\n")
    figures = _captured_figures(monkeypatch)
    plot_main([str(run), "--labels", "tau=3"])
    assert "note:" not in capsys.readouterr().out
    distance = figures["distance_vs_step.png"].axes[0]
    lines = {line.get_label(): line for line in distance.get_lines()}
    assert set(lines) == {"tau=3 (mean)", "tau=3 (max)"}
    assert [text.get_text() for text in distance.get_legend().get_texts()] == ["tau=3 (mean)", "tau=3 (max)"]
    assert lines["tau=3 (max)"].get_linestyle() == "--" and lines["tau=3 (mean)"].get_linestyle() == "-"
    assert lines["tau=3 (mean)"].get_marker() == "o" and lines["tau=3 (max)"].get_marker() == "^"
    assert list(lines["tau=3 (max)"].get_ydata()) == [0.5]
    (error,) = figures["error_vs_epoch.png"].axes[0].get_lines()
    assert error.get_marker() == "o" and list(error.get_xdata()) == [1.0]
    long = plot_module.Run("long", run, distance_step=list(range(51)), distance_mean=[1.0] * 51,
                           distance_max=[2.0] * 51, epoch=[1.0], train_s=[1.0], val_error=[50.0])
    plot_module.plot_runs([long], tmp_path / "long")
    assert {line.get_marker() for line in figures["distance_vs_step.png"].axes[0].get_lines()} == {"None"}


def test_a_run_without_exchanges_is_reported_not_silently_dropped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = plot_main([str(_fake_run(tmp_path / "run", tau=1, with_distance=False)), "--labels", "DDP"])
    assert "distance_vs_step.png" not in {path.name for path in written}
    assert ("note: distance_vs_step.png not drawn: no run logged easgd/distance_mean (not an EASGD run with "
            "ElasticDistanceMonitor, or fewer optimizer steps than tau, so no exchange)") in capsys.readouterr().out
    _fake_run(tmp_path / "sweep" / "0", tau=2)
    _fake_run(tmp_path / "sweep" / "1", tau=8, with_distance=False)
    written = plot_main([str(tmp_path / "sweep")])
    assert "distance_vs_step.png" in {path.name for path in written}
    assert (f"note: strategy.tau=8 ({tmp_path / 'sweep' / '1' / 'csv' / 'metrics.csv'}): no exchange logged, left "
            "out of distance_vs_step.png") in capsys.readouterr().out


def test_a_single_run_is_labelled_with_its_settings(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "2026-01-01_12-00-00", tau=4)
    (run / ".hydra" / "config.yaml").write_text(
        "strategy:\n  _target_: lightning_easgd.EASGDStrategy\n  tau: 4\noptimizer:\n  lr: 0.005\n"
        "trainer:\n  devices: 2\n  num_nodes: 2\n")
    assert [r.label for r in find_runs([run])] == ["EASGD tau=4 p=4 lr=0.005"]
    (run / ".hydra" / "config.yaml").unlink()
    assert [r.label for r in find_runs([run])] == ["2026-01-01_12-00-00"]  # no settings to read: its folder
    # Runs started separately differ in hydra.run.dir, which is where they went, not a setting.
    (tmp_path / "a" / ".hydra").mkdir(parents=True)
    (tmp_path / "a" / ".hydra" / "overrides.yaml").write_text("- strategy.tau=4\n- hydra.run.dir=a\n")
    (tmp_path / "a" / "metrics.csv").write_text((run / "csv" / "metrics.csv").read_text())
    (run / ".hydra" / "overrides.yaml").write_text("- strategy.tau=1\n- hydra.run.dir=b\n")
    assert [r.label for r in find_runs([run, tmp_path / "a"])] == ["strategy.tau=1", "strategy.tau=4"]


def test_tensorboard_logger_writes_fit_and_test_into_one_event_file(tmp_path: Path) -> None:
    """Lightning's logger closes its writer at the end of fit, and test's metrics then start a second file."""
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tensorboard", version="", default_hp_metric=False)
    data = SyntheticDataModule(num_classes=4, image_size=8, train_size=32, val_size=16, test_size=16, batch_size=8)
    module = ImageClassifier(net=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 4)),
                             optimizer=partial(torch.optim.SGD, lr=0.1), num_classes=4, top_k=None)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=logger, log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data, verbose=False)
    (events,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert "train/loss_step" in tags and "val/acc" in tags and "test/acc" in tags
    assert (tmp_path / "tensorboard" / "hparams.yaml").is_file()
