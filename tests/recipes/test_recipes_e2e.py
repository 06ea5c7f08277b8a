"""Each recipe end to end as a subprocess with 2 CPU worker processes, plus readable CLI errors.

The recipes run with the popen launcher (they are already a subprocess of pytest), except the multirun test,
which needs fork workers. Two-node launches are simulated on this machine with torchrun and with SLURM's
variables, the way srun would start them.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.recipes import (
    CIFAR10_DIR,
    FAST,
    IMAGENETTE_DIR,
    REPO,
    clean_env,
    needs_cifar10,
    needs_imagenette,
    run_recipe,
)
from lightning_easgd.checkpoint.preflight import UnusableCheckpointError, check_checkpoint
from lightning_easgd.recipes.plot import find_runs
from lightning_easgd.recipes.plot import main as plot_main


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def _check_run(run_dir: Path, stdout: str) -> list[dict[str, str]]:
    """A finished 2-worker EASGD run: test metrics printed with the locations, checkpoint and logs complete."""
    assert "Center test metrics" in stdout and "test/acc = " in stdout
    assert f"Checkpoints: {run_dir / 'checkpoints'}" in stdout and f"Logs (CSVLogger): {run_dir / 'csv'}" in stdout
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["easgd"]["world_size"] == 2 and checkpoint["easgd"]["alpha"] == pytest.approx(0.45)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    rows = _rows(run_dir)
    columns = set(rows[0])
    assert {"train/loss_step", "val/acc", "val/acc_top5", "time/train_s", "test/acc", "easgd/distance_mean"} <= columns
    assert len([r for r in rows if r["val/acc"]]) == 2  # one center validation per epoch
    return rows


def test_cifar10_recipe_on_synthetic_data_then_plot(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_recipe("cifar10", ["data=synthetic", *FAST, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = _check_run(run_dir, result.stdout)
    # Both workers logged from rank 0 only: one row per step, not two.
    steps = [r["step"] for r in rows if r["train/loss_step"]]
    assert len(steps) == len(set(steps)) == 6
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1  # fit and test in one file
    last = run_dir / "checkpoints" / "last.ckpt"
    check_checkpoint(last, entries=("state_dict",))  # a real checkpoint passes the launch-time check ...
    next((run_dir / "checkpoints" / "last.ckpt.workers").rglob("worker_00001.pt")).unlink()
    with pytest.raises(UnusableCheckpointError, match="1 of its 2 worker files cannot be used: worker 1: "):
        check_checkpoint(last)  # ... and one without its worker 1 does not
    written = plot_main([str(run_dir)])
    assert {p.name for p in written} == {"error_vs_time.png", "error_vs_epoch.png", "distance_vs_step.png"}


def test_imagenet_recipe_on_synthetic_data(tmp_path: Path) -> None:
    # A small CIFAR ResNet keeps the ImageNet pipeline fast on CPU; the paper's 11-layer net is tested elsewhere.
    run_dir = tmp_path / "run"
    args = ["data=synthetic", "data.image_size=64", "model=resnet20", *FAST, f"hydra.run.dir={run_dir}"]
    result = run_recipe("imagenet", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = _check_run(run_dir, result.stdout)
    assert any(r.get("lr-SGD") for r in rows)  # the divide-on-plateau scheduler is stepped and monitored


def test_cifar10_recipe_with_asynchronous_eamsgd(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["data=synthetic", "strategy=eamsgd_async", *FAST, f"hydra.run.dir={run_dir}"]
    result = run_recipe("cifar10", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    _check_run(run_dir, result.stdout)


@needs_cifar10
def test_cifar10_recipe_on_the_shared_copy(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "experiment=cifar10_paper_eamsgd",
        f"data.data_dir={CIFAR10_DIR}",
        "data.verify_integrity=false",
        "data.num_workers=0",
        *FAST,
        f"hydra.run.dir={run_dir}",
    ]
    result = run_recipe("cifar10", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    _check_run(run_dir, result.stdout)


@needs_imagenette
def test_imagenet_recipe_on_the_imagenet_subset(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        f"data.data_dir={IMAGENETTE_DIR}",
        "data.num_classes=10",
        "data.resize=72",
        "data.crop_size=64",
        "data.batch_size=16",
        "data.num_workers=0",
        "model=resnet20",
        *FAST,
        f"hydra.run.dir={run_dir}",
    ]
    result = run_recipe("imagenet", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    _check_run(run_dir, result.stdout)


def test_multirun_sweep_with_fork_workers(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = ["-m", "data=synthetic", *FAST, "strategy.tau=1,3", "strategy.start_method=fork", f"hydra.sweep.dir={sweep}"]
    result = run_recipe("cifar10", args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for job in ("0", "1"):
        rows = _check_run(sweep / job, result.stdout)
        # fit ran in forked workers and test in new ones: the CSV keeps both.
        assert any(r["train/loss_step"] for r in rows) and any(r["test/acc"] for r in rows)
    assert [run.label for run in find_runs([sweep])] == ["strategy.tau=1", "strategy.tau=3"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=resnet9000"], ["Could not find 'model/resnet9000'", "paper_cifar10"]),
        (["data=synthetic", "strategy.tau=-1"], ["tau=-1"]),
        (["data.data_dir=/nonexistent/cifar"], ["/nonexistent/cifar", "cifar-10-batches-py/ with data_batch_1"]),
        (["-m", "data=synthetic", "trainer=cpu", "trainer.devices=2"], ["start_method=fork"]),
    ],
    ids=["unknown-model", "negative-tau", "missing-data-dir", "popen-in-multirun"],
)
def test_bad_overrides_fail_readably(args: list[str], expected: list[str], tmp_path: Path) -> None:
    outputs = [f"hydra.run.dir={tmp_path}/run", f"hydra.sweep.dir={tmp_path}/sweep"]
    result = run_recipe("cifar10", [*args, *outputs], cwd=tmp_path)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep" / "0").exists()  # no folder of a refused run


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_nodes(commands: list[list[str]], envs: list[dict[str, str]], cwd: Path, timeout: float) -> list[str]:
    """Start one process group per simulated node, wait for all, kill them all on timeout; return their stdout."""
    processes = [
        subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
        for command, env in zip(commands, envs)
    ]  # fmt: skip
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"simulated nodes timed out after {timeout}s")
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-4000:]
    return outputs


def _node_args(run_dir: Path) -> list[str]:
    # One worker per "node", two nodes: p = 2. Every node runs Hydra, so they share one explicit run directory.
    fast = [arg for arg in FAST if not arg.startswith("trainer.devices")]
    return ["data=synthetic", *fast, "trainer.devices=1", "trainer.num_nodes=2", f"hydra.run.dir={run_dir}"]


def test_two_nodes_with_torchrun(tmp_path: Path) -> None:
    """Two torchrun agents on this machine stand in for two nodes (TorchElasticEnvironment)."""
    run_dir, port = tmp_path / "run", _free_port()
    commands = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
         "--master-addr=127.0.0.1", f"--master-port={port}", str(REPO / "recipes" / "cifar10.py"), *_node_args(run_dir)]
        for rank in (0, 1)
    ]  # fmt: skip
    outputs = _launch_nodes(commands, [clean_env()] * 2, tmp_path, timeout=180)
    _check_run(run_dir, outputs[0])
    assert "Center test metrics" not in outputs[1]  # rank 1 reports nothing


def test_two_nodes_with_slurm_variables(tmp_path: Path) -> None:
    """Two processes with the variables srun sets for `--nodes=2 --ntasks-per-node=1` (SLURMEnvironment)."""
    run_dir, port = tmp_path / "run", _free_port()
    envs = []
    for rank in (0, 1):
        env = clean_env()
        env.update(
            SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="2", SLURM_PROCID=str(rank),
            SLURM_LOCALID="0", SLURM_NODEID=str(rank), SLURM_JOB_NAME="easgd-test", SLURM_JOB_ID="4242",
            SLURM_NODELIST="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        envs.append(env)
    command = [sys.executable, str(REPO / "recipes" / "cifar10.py"), *_node_args(run_dir)]
    outputs = _launch_nodes([command, command], envs, tmp_path, timeout=180)
    _check_run(run_dir, outputs[0])
    assert "Center test metrics" not in outputs[1]
