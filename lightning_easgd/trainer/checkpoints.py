"""The Trainer's checkpoint glue: when :class:`~lightning_easgd.EASGDStrategy` saves and resumes, in Lightning's
hook order, over the framework-neutral routines of :mod:`lightning_easgd.checkpoint.routines`.

Lightning saves through ``lightning_module_state_dict`` and ``save_checkpoint`` on every rank, and resumes in three
steps: ``load_checkpoint`` before ``setup`` (the file), ``setup`` (where the exchange is built, so the worker's own
weights and the center in full precision can be restored only after it), and ``load_optimizer_state_dict`` (the
optimizers, then the RNG states, the last step before the first epoch's data order is drawn).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.fabric.utilities.types import _PATH
from torch.nn import Module
from torch.optim import Optimizer

from lightning_easgd.checkpoint.routines import (
    CheckpointedWorker,
    WorkerCheckpointing,
    WorkerResume,
    hyperparameters_only,
)
from lightning_easgd.checkpoint.section import CHECKPOINT_KEY, check_section
from lightning_easgd.core.worker import ElasticWorker


class TrainerCheckpointed(CheckpointedWorker, Protocol):
    """What the glue needs of the Trainer strategy beyond the routines' needs: the exchange, the module and the
    optimizers (public attributes of a Lightning ``Strategy``)."""

    @property
    def averager(self) -> ElasticWorker | None: ...

    @property
    def lightning_module(self) -> Module | None: ...

    @property
    def optimizers(self) -> list[Optimizer]: ...


class WorkerCheckpoints:
    """The :class:`~lightning_easgd.EASGDStrategy`'s checkpoint handling: what to save, where, and resuming from it."""

    def __init__(self, strategy: TrainerCheckpointed) -> None:
        self._strategy = strategy
        self._routines = WorkerCheckpointing(strategy)
        self._loaded: tuple[str, dict[str, Any], Mapping[str, Any]] | None = None  # (path, section, state_dict)
        self._pending: WorkerResume | None = None
        self._saved: tuple[str, dict[str, Any]] | None = None  # (path, section) of the save in progress

    def touch(self) -> None:
        """The worker's state may change without an optimizer step (a training batch starts): see
        :meth:`WorkerCheckpointing.touch`."""
        self._routines.touch()

    # ------------------------------------------------------------------ saving

    def center_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """Put the center into the module's ``state`` (rank 0 writes the file; collective within worker 0)."""
        averager = self._strategy.averager
        return state if averager is None else self._routines.center_state(averager, state)

    def before_save(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None) -> None:
        """Write the worker files of a full checkpoint (collective; every rank calls it) and add the section naming
        them. Weights-only checkpoints (no ``optimizer_states``) get neither."""
        strategy = self._strategy
        averager, module = strategy.averager, strategy.lightning_module
        self._saved = None
        if averager is None or module is None or "optimizer_states" not in checkpoint:
            return
        section = self._routines.save(filepath, averager, module_state=module.state_dict,
                                      optimizer_states=checkpoint["optimizer_states"],
                                      storage_options=storage_options)
        if "worker_files" in section:
            checkpoint["optimizer_states"] = [hyperparameters_only(s) for s in checkpoint["optimizer_states"]]
        checkpoint[CHECKPOINT_KEY] = section
        self._saved = (os.fspath(filepath), section)

    def after_save(self) -> None:
        """Remove the worker files of earlier saves to the same path, now that the checkpoint file is written."""
        saved, self._saved = self._saved, None
        if saved is not None:
            self._routines.saved(*saved)

    def remove(self, filepath: _PATH) -> None:
        """Remove a checkpoint's worker files after the checkpoint file itself (rank 0; the file system is shared)."""
        self._routines.files.remove(filepath)

    # ------------------------------------------------------------------ loading

    def read(self, checkpoint_path: _PATH, load: Callable[[], Any]) -> dict[str, Any]:
        """Load the checkpoint file with ``load``, refuse what is not a checkpoint of a known format, and keep the
        strategy's section and the center's values for :meth:`setup` (the worker files are read there, each rank
        reading only its own)."""
        try:
            checkpoint = load()
        except FileNotFoundError:
            raise
        except Exception as error:
            raise ValueError(
                f"{checkpoint_path} is not a readable checkpoint ({type(error).__name__}: {error}); the file may be "
                "truncated or corrupt, or not a PyTorch checkpoint"
            ) from error
        if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
            raise ValueError(f"{checkpoint_path} is not a Lightning checkpoint: it has no 'state_dict' mapping")
        section = checkpoint.get(CHECKPOINT_KEY)
        self._loaded = None
        if section is not None:
            checked = check_section(checkpoint_path, section)
            self._loaded = (os.fspath(checkpoint_path), checked, checkpoint["state_dict"])
        return checkpoint

    def setup(self, fitting: bool) -> None:
        """Consume the checkpoint read before setup: when fitting, restore the center from the checkpoint's
        full-precision values (the module holds them rounded to its precision by now), its velocity, and this
        rank's worker weights (from its worker's file only); keep its optimizer and RNG states for
        :meth:`restore_optimizers`."""
        loaded, self._loaded = self._loaded, None
        self._pending = None
        strategy = self._strategy
        if fitting and loaded is not None:
            path, section, center = loaded
            assert strategy.averager is not None and strategy.lightning_module is not None
            self._pending = self._routines.resume(path, section, strategy.averager, strategy.lightning_module,
                                                  center=center)

    def restore_optimizers(self) -> None:
        """After Lightning restored the main file's optimizer entries (hyperparameters): this rank's worker's own
        optimizer states (a new worker: none), then its RNG states."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        optimizers = self._strategy.optimizers
        pending.restore(optimizers)
        for optimizer in optimizers:
            _optimizer_to_device(optimizer, self._strategy.root_device)
