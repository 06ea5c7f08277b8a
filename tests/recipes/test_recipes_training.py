"""The classifier, the divide-on-plateau scheduler, the wall-clock logger and the plot command."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_easgd.recipes.classifier import ImageClassifier, LRSchedulerSpec
from lightning_easgd.recipes.data import SyntheticDataModule
from lightning_easgd.recipes.models import PaperCIFAR10Net
from lightning_easgd.recipes.plot import find_runs
from lightning_easgd.recipes.plot import main as plot_main
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
