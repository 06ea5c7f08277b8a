"""LightningCLI drives the strategy by its registered name or by class path with its own arguments (the `cli`
extra installs jsonargparse[signatures])."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.bounded import TESTS, run_bounded
from lightning_easgd import EASGDStrategy

SCRIPT = TESTS / "scripts" / "cli_fit.py"
sys.path.insert(0, str(SCRIPT.parent))
from cli_fit import main  # noqa: E402

CPU2 = ["--trainer.accelerator=cpu", "--trainer.devices=2"]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI(args=...) warns when sys.argv holds arguments too (pytest's here)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT)])


def test_registered_name_and_class_path_with_arguments_build_the_strategy() -> None:
    by_name = main([*CPU2, "--trainer.strategy=easgd_fork"], run=False).trainer.strategy
    assert isinstance(by_name, EASGDStrategy) and by_name.tau == 10 and by_name._start_method == "fork"
    by_class = main([*CPU2, "--trainer.strategy=lightning_easgd.EASGDStrategy", "--trainer.strategy.tau=4",
                     "--trainer.strategy.beta=0.5"], run=False).trainer.strategy
    assert isinstance(by_class, EASGDStrategy) and by_class.tau == 4 and by_class.beta == 0.5


def test_fit_through_the_cli_uses_the_given_tau_and_its_saved_config_round_trips(tmp_path: Path) -> None:
    command = [sys.executable, str(SCRIPT), "fit", *CPU2, "--trainer.strategy=lightning_easgd.EASGDStrategy",
               "--trainer.strategy.tau=3", "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
               f"--trainer.default_root_dir={tmp_path}"]
    done = run_bounded(command, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:]
    (version,) = (tmp_path / "lightning_logs").glob("version_*")
    (checkpoint,) = (version / "checkpoints").glob("*.ckpt")
    section = torch.load(checkpoint, weights_only=True)["easgd"]
    # 48 samples, 2 workers, batch 4: 6 steps per worker, so 2 exchanges at tau = 3.
    assert section["world_size"] == 2 and section["tau"] == 3 and section["clock"] == 6
    config = version / "config.yaml"
    saved = yaml.safe_load(config.read_text())["trainer"]["strategy"]
    assert saved["class_path"] == "lightning_easgd.EASGDStrategy" and saved["init_args"]["tau"] == 3
    printed = run_bounded([sys.executable, str(SCRIPT), "fit", f"--config={config}", "--print_config"], cwd=tmp_path,
                          timeout=120)
    assert printed.returncode == 0, printed.stdout[-3000:]
    assert yaml.safe_load(printed.stdout)["trainer"]["strategy"] == saved
