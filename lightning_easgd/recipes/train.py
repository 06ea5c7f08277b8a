"""The one training function behind ``recipes/cifar10.py`` and ``recipes/imagenet.py``.

It only instantiates what the Hydra config describes, so it works unchanged with your own ``model``, ``data``,
``module`` or ``strategy`` configs (add a config directory with ``hydra.searchpath`` or ``--config-dir``).
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from lightning_easgd.checkpoint.preflight import check_checkpoint

__all__ = ["train"]

_TEST_CKPT_CHOICES = ("last", "best")
AUTO_RESUME = "auto"
# ckpt_path values that Lightning resolves itself ("registry" also with a suffix): there is no file to check yet.
_LIGHTNING_CKPT_NAMES = ("last", "best", "hpc")


def _instantiate_named(cfg: DictConfig | None, kind: str) -> list[Any]:
    """Instantiate a ``{name: {_target_: ...}}`` mapping (callbacks, loggers); ``null`` entries are disabled."""
    if cfg is None:
        return []
    if not isinstance(cfg, Mapping):
        raise TypeError(f"{kind} must be a mapping of name -> config with _target_, got {type(cfg).__name__}")
    objects = []
    for name, node in cfg.items():
        if node is None:
            continue
        if not isinstance(node, Mapping) or "_target_" not in node:
            raise ValueError(f"{kind}.{name} must be a config with a _target_ (or null to disable it), got {node!r}")
        objects.append(instantiate(node))
    return objects


@contextmanager
def _refusals_leave_no_run_dir() -> Iterator[None]:
    """Remove the run directory Hydra made for a run refused before training (a bad option, an unusable
    ``ckpt_path``), so that failed attempts leave no folders holding only a config and an empty log.

    A directory holding anything else, e.g. the checkpoints of a run being resumed, is kept. The error itself goes on
    to Hydra, which prints it.
    """
    try:
        yield
    except Exception:
        if HydraConfig.initialized():
            _remove_hydra_only_run_dir(HydraConfig.get())
        raise


def _remove_hydra_only_run_dir(hydra: DictConfig) -> None:
    """Remove Hydra's run directory if it holds only what Hydra wrote there: its ``output_subdir`` and the job log."""
    run_dir = Path(hydra.runtime.output_dir)
    if not run_dir.is_dir():
        return
    own = {hydra.output_subdir, f"{OmegaConf.select(hydra, 'job.name', throw_on_missing=False)}.log"}
    if {entry.name for entry in run_dir.iterdir()} <= own:
        shutil.rmtree(run_dir, ignore_errors=True)  # other ranks of a torchrun job may remove it too


def _check_devices(cfg: DictConfig) -> None:
    """Refuse a number of devices below 1 with the values allowed (Lightning's message names none)."""
    devices = cfg.trainer.get("devices", "auto")
    text = str(devices).strip()
    if not isinstance(devices, (int, str)) or isinstance(devices, bool) or not text.lstrip("-").isdigit():
        return  # "auto", a list of GPU indices or "0,1": Lightning checks these
    if int(text) < 1 and int(text) != -1:
        raise ValueError(
            f"trainer.devices={devices!r} is invalid: give the number of devices per node (an integer >= 1; on CPU "
            "each is one worker process), -1 or 'auto' for all of a node's GPUs, or a list of GPU indices such as "
            "[0,1]. The number of EASGD workers is p = trainer.devices x trainer.num_nodes."
        )


def _check_launch(cfg: DictConfig, trainer: pl.Trainer) -> None:
    """Refuse combinations that would silently do something else than asked."""
    if (
        HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
        and isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher)
    ):
        raise ValueError(
            "strategy.start_method='popen' does not work in a Hydra multirun (-m): it re-runs the command line, "
            "sweep included, in every worker. Add strategy.start_method=fork (or spawn) to the command."
        )
    devices = cfg.trainer.get("devices", 1)
    if isinstance(trainer.strategy, SingleDeviceStrategy) and devices not in (1, "1", "auto"):
        raise ValueError(
            f"trainer.devices={devices} but strategy {type(trainer.strategy).__name__} runs one worker; "
            "set trainer.devices=1 or choose a multi-worker strategy (easgd, eamsgd, ddp)"
        )


def _open_csv_logs(loggers: list[Logger]) -> None:
    """Create the CSV writers in this process now, while their ``metrics.csv`` does not exist yet.

    Lightning's CSV writer deletes an existing ``metrics.csv`` when it is created. With the fork/spawn
    launchers, ``fit`` and ``test`` each run in fresh worker processes that copy this process's loggers; if the
    writer were first created inside ``test``'s workers it would delete what ``fit``'s workers logged.
    """
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            logger.experiment  # noqa: B018  (creating the writer is the point)


def _continue_csv_logs(trainer: pl.Trainer) -> None:
    """Teach this process's CSV writers the columns that ``fit``'s worker processes wrote.

    Without this, the test rows of a fork/spawn run would be written with a header that lacks the training
    columns. With popen or torchrun this process did the logging itself and nothing changes. Only global rank 0
    has real writers.
    """
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger):
            continue
        writer = logger.experiment
        path = Path(writer.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as file:
                header = next(csv.reader(file), [])
            writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))


def _check_checkpoints(trainer: pl.Trainer, test_ckpt: str) -> None:
    """Refuse, before fitting, callbacks that cannot write the checkpoint ``test_ckpt`` names."""
    if test_ckpt == "last" and not any(_writes_last(callback) for callback in _model_checkpoints(trainer)):
        raise TypeError(
            "test_ckpt=last needs a ModelCheckpoint that writes last.ckpt; keep callbacks.last_checkpoint "
            "(callbacks=default)"
        )
    if test_ckpt == "best" and _best_checkpoint(trainer) is None:
        raise TypeError(
            "test_ckpt=best needs a ModelCheckpoint with a monitor; keep callbacks.model_checkpoint (callbacks=default)"
        )
    for callback in _model_checkpoints(trainer):
        if callback.monitor and callback.save_last:
            rank_zero_warn(
                f"A ModelCheckpoint monitoring {callback.monitor!r} has save_last={callback.save_last!r}: Lightning "
                "rewrites its last.ckpt only when the metric improves, so ckpt_path=auto and test_ckpt=last may use "
                "an old epoch. Set save_last: false there and keep callbacks.last_checkpoint."
            )


def _model_checkpoints(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    return [callback for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)]


def _writes_last(callback: ModelCheckpoint) -> bool:
    """Whether ``callback`` writes ``last.ckpt``: named ``last`` (``callbacks.last_checkpoint``) or ``save_last``."""
    return callback.filename == ModelCheckpoint.CHECKPOINT_NAME_LAST or bool(callback.save_last)


def _last_checkpoint(trainer: pl.Trainer) -> Path | None:
    """Where this run's ``last.ckpt`` is written: by a ``ModelCheckpoint`` named ``last`` or with ``save_last``.

    The recipes' ``callbacks.last_checkpoint`` rewrites it after every validation (see
    ``conf/callbacks/last_checkpoint.yaml``). ``None`` when no callback writes one or its directory is only
    resolved when ``fit`` starts.
    """
    name = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    for callback in _model_checkpoints(trainer):
        if _writes_last(callback) and callback.dirpath is not None:
            return Path(callback.dirpath) / name
    return None


def _best_checkpoint(trainer: pl.Trainer) -> ModelCheckpoint | None:
    """The ``ModelCheckpoint`` that keeps the best monitored checkpoint (``callbacks.model_checkpoint``)."""
    return next((callback for callback in _model_checkpoints(trainer) if callback.monitor), None)


def _test_checkpoint(trainer: pl.Trainer, which: str) -> str:
    """Path of the checkpoint to test; it holds the center's weights under EASGD.

    ``last.ckpt`` is looked up on disk: with fork/spawn launchers only ``best_model_path`` travels back to this
    process.
    """
    if which == "best":
        best = _best_checkpoint(trainer)
        path = best.best_model_path if best is not None else ""
        hint = "Check that validation ran and logged the monitored metric (callbacks.model_checkpoint.monitor)."
    else:
        last = _last_checkpoint(trainer)
        path = str(last) if last is not None else ""
        hint = "Keep callbacks.last_checkpoint (callbacks=default) for test_ckpt=last."
    if not path or not Path(path).is_file():
        raise FileNotFoundError(f"test_ckpt={which!r}: no such checkpoint was written ({path or 'no path'}). {hint}")
    return path


def _resume_path(cfg: DictConfig, trainer: pl.Trainer) -> str | None:
    """The checkpoint ``fit`` resumes from: ``ckpt_path=auto`` picks this run's ``last.ckpt`` when there is one.

    A restarted job (torchrun ``--max-restarts``, a SLURM requeue) re-runs the same command with the same run
    directory, so it continues from its latest checkpoint without anyone passing a path.
    """
    ckpt_path = cfg.get("ckpt_path", AUTO_RESUME)
    if ckpt_path != AUTO_RESUME:
        return ckpt_path
    last = _last_checkpoint(trainer)
    if last is None or not last.is_file():
        return None
    if rank_zero_only.rank == 0:
        print(f"Resuming from {last} (ckpt_path=auto)", flush=True)
    return str(last)


def _report(trainer: pl.Trainer, tested: str, metrics: Mapping[str, float]) -> None:
    """Print, on global rank 0, the center's test metrics and where checkpoints and logs went."""
    if not trainer.is_global_zero:
        return
    lines = ["", "Center test metrics (checkpoint " + tested + "):"]
    lines += [f"  {key} = {value:.4f}" for key, value in sorted(metrics.items())]
    checkpoint = trainer.checkpoint_callback
    if isinstance(checkpoint, ModelCheckpoint):
        lines.append(f"Checkpoints: {Path(checkpoint.dirpath).resolve() if checkpoint.dirpath else '(none)'}")
        if checkpoint.best_model_path:
            lines.append(f"  best ({checkpoint.monitor}): {checkpoint.best_model_path}")
    for logger in trainer.loggers:
        location = logger.log_dir or logger.save_dir
        lines.append(f"Logs ({type(logger).__name__}): {Path(location).resolve() if location else '(none)'}")
    if HydraConfig.initialized():
        lines.append(f"Run directory (config in .hydra/): {HydraConfig.get().runtime.output_dir}")
    print("\n".join(lines), flush=True)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured module with the configured strategy, then test the center and report.

    Builds everything from ``cfg`` (keys ``data``, ``module``, ``strategy``, ``trainer``, ``callbacks``,
    ``logger``, ``seed``, ``ckpt_path``, ``test_ckpt``), seeds every process identically (the paper starts the
    center and all workers from the same weights), fits (resuming from ``ckpt_path``; ``"auto"``, the default,
    resumes from this run directory's ``last.ckpt`` if a previous attempt left one, ``null`` never resumes), and
    tests the checkpoint chosen by ``test_ckpt``
    (``"last"``: the end of training; ``"best"``: the best ``val/acc``). Under EASGD the checkpoints, and so the
    test, hold the center variable. Testing from a checkpoint serves ``test_ckpt=best`` and ``"last"`` alike; after
    ``fit`` the module itself also holds the center, with every launcher.

    Args:
        cfg: The composed Hydra config (see ``conf/cifar10.yaml``).

    Returns:
        The test metrics, e.g. ``{"test/acc": ..., "test/acc_top5": ..., "test/loss": ...}``.

    Raises:
        ValueError: for combinations that cannot work (popen launcher in a multirun, a single-device strategy
            with several devices, fewer than one device, an unknown ``test_ckpt``).
        UnusableCheckpointError: ``ckpt_path`` (or this run's ``last.ckpt`` with ``auto``) is missing, empty,
            unreadable or lacks worker files; found before any worker starts.
        TypeError: the callbacks include no ``ModelCheckpoint`` that writes the checkpoint ``test_ckpt`` names.
    """
    test_ckpt = cfg.get("test_ckpt", "last")
    with _refusals_leave_no_run_dir():
        if test_ckpt not in _TEST_CKPT_CHOICES:
            raise ValueError(f"test_ckpt must be one of {_TEST_CKPT_CHOICES}, got {test_ckpt!r}")
        _check_devices(cfg)
        if cfg.get("seed") is not None:
            pl.seed_everything(cfg.seed, workers=True, verbose=False)

        datamodule: pl.LightningDataModule = instantiate(cfg.data)
        module: pl.LightningModule = instantiate(cfg.module)
        strategy = instantiate(cfg.strategy)
        callbacks: list[Callback] = _instantiate_named(cfg.get("callbacks"), "callbacks")
        loggers: list[Logger] = _instantiate_named(cfg.get("logger"), "logger")
        trainer: pl.Trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=callbacks, logger=loggers or False)
        _check_launch(cfg, trainer)
        _check_checkpoints(trainer, test_ckpt)
        resume = _resume_path(cfg, trainer)
        if resume is not None and resume not in _LIGHTNING_CKPT_NAMES and not resume.startswith("registry"):
            check_checkpoint(resume, entries=("state_dict",))  # here, not in every worker after the launch

    _open_csv_logs(trainer.loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    _continue_csv_logs(trainer)
    tested = _test_checkpoint(trainer, test_ckpt)
    results = trainer.test(module, datamodule=datamodule, ckpt_path=tested, verbose=False)
    metrics = {key: float(value) for key, value in (results[0] if results else {}).items()}
    _report(trainer, tested, metrics)
    return metrics
