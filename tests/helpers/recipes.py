"""Helpers shared by the recipe tests: paths, data-presence markers and the recipe subprocess runner."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"
SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR10_DIR = SHARED_DATA / "cifar10"
IMAGENETTE_DIR = SHARED_DATA / "imagenette_subset"
IMAGENET_SAMPLE_DIR = SHARED_DATA / "imagenet_sample_1000"

# Variables a Lightning launcher or the parent conftest may have set; a recipe subprocess must start clean.
_LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED")

needs_cifar10 = pytest.mark.skipif(
    not (CIFAR10_DIR / "cifar-10-batches-py" / "data_batch_1").is_file(), reason=f"no CIFAR-10 copy in {CIFAR10_DIR}"
)
needs_imagenette = pytest.mark.skipif(
    not (IMAGENETTE_DIR / "train").is_dir(), reason=f"no ImageNet subset in {IMAGENETTE_DIR}"
)
needs_imagenet_sample = pytest.mark.skipif(
    not (IMAGENET_SAMPLE_DIR / "val").is_dir(), reason=f"no ImageNet sample in {IMAGENET_SAMPLE_DIR}"
)


def experiments() -> list[str]:
    """Every preset in conf/experiment/."""
    return sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))


def group_options(group: str) -> list[str]:
    """Every option of a config group."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def clean_env() -> dict[str, str]:
    """This process's environment without launcher variables, with the checkout and tests/helpers importable, one
    thread each."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _LAUNCH_ENV and not key.startswith(("SLURM_", "TORCHELASTIC_"))
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_recipe(recipe: str, args: list[str], cwd: Path, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    """Run ``recipes/<recipe>.py args...`` as a subprocess in its own session; kill its process group on timeout.

    The recipe's popen launcher starts further worker processes; a new session lets a timeout take them all.
    """
    env = clean_env()
    command = [sys.executable, str(REPO / "recipes" / f"{recipe}.py"), *args]
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"{' '.join(command)} timed out after {timeout}s\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
        )
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


# Keep each recipe run to a handful of steps on 2 CPU processes.
FAST = [
    "trainer=cpu",
    "trainer.devices=2",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "strategy.tau=2",
    "callbacks.progress_bar.refresh_rate=0",
]
