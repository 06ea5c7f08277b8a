"""What an EASGD checkpoint holds and where: the center in the checkpoint file, each worker's own state in its own file.

A checkpoint saved at ``<dir>/epoch=3.ckpt`` (format 2) is::

    <dir>/epoch=3.ckpt                                   the center as ``state_dict``, Lightning's usual keys, and
                                                         the section "easgd" naming the worker files below
    <dir>/epoch=3.ckpt.workers/<save id>/worker_00000.pt  worker 0's local weights, optimizer state and the RNG
    <dir>/epoch=3.ckpt.workers/<save id>/worker_00001.pt  states of its ranks; one file per worker ...

Why: gathering every worker's state on rank 0 costs p model copies of traffic and memory there at every checkpoint.
Here the first rank of each worker (its *writer*) writes that worker's file, all writers at once; no rank receives
another worker's state (only the few-kB RNG states of a worker's own ranks travel to its writer). The checkpoint file
stays loadable on its own (``MyModule.load_from_checkpoint``, ``torch.load(weights_only=True)``), and it names its
worker files relative to its own directory, so a checkpoint directory can be moved or copied as a whole.

Every save goes to a fresh ``<save id>`` directory: worker files are complete before the checkpoint file that names
them is replaced, and the older saves under the same name are removed only afterwards, so a crash at any point
leaves a checkpoint file whose worker files exist. Checkpoints are written to a file system every rank sees, as
Lightning assumes for DDP.

Format 1 (lightning-easgd 0.1) kept every worker inside the checkpoint file; it is still read.

The worker files themselves (:class:`WorkerFiles`) and the section's checks do not depend on the adapter: the Fabric
strategy writes the same layout and the same section fields under its ``fabric.save`` entry ``"easgd"``.
:class:`WorkerCheckpoints` is the Trainer strategy's use of them.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.fabric.utilities.types import _PATH
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_easgd.adapter.module_state import state_with
from lightning_easgd.checkpoint.rng import capture_rng_state, restore_rng_state
from lightning_easgd.core.worker import ElasticWorker

if TYPE_CHECKING:
    from lightning_easgd.trainer.strategy import EASGDStrategy


CHECKPOINT_KEY = "easgd"
"""Where a checkpoint keeps the strategy's own state (the center itself is the checkpoint's ``state_dict``)."""
CHECKPOINT_FORMAT = 2
"""The format written: worker states in worker files. Format 1 (worker states inside the checkpoint) is read too."""
WORKERS_SUFFIX = ".workers"
"""The directory next to a checkpoint ``<name>`` that holds its worker files is ``<name>.workers``."""

_READABLE_FORMATS = (1, 2)
# Why a rank could not use its worker file; shared between ranks as small integers so every rank can name the files.
_MISSING, _UNREADABLE, _FOREIGN = 1, 2, 3
_REASONS = {
    _MISSING: "is missing",
    _UNREADABLE: "is unreadable (truncated or corrupt?)",
    _FOREIGN: "does not belong to this checkpoint",
}


class WorkerFileError(ValueError):
    """A worker file of a checkpoint is missing, unreadable or from another checkpoint, or could not be written."""


def worker_files_dir(checkpoint_path: _PATH) -> str:
    """The directory holding the worker files of the checkpoint at ``checkpoint_path``."""
    return f"{os.fspath(checkpoint_path)}{WORKERS_SUFFIX}"


def worker_file_name(checkpoint_path: _PATH, save_id: str, worker: int) -> str:
    """Worker ``worker``'s file of a save, relative to the checkpoint's directory (as the checkpoint names it)."""
    base = posixpath.basename(os.fspath(checkpoint_path).replace(os.sep, "/"))
    return f"{base}{WORKERS_SUFFIX}/{save_id}/{_file_name(worker)}"


def _worker_file_target(checkpoint_path: _PATH, save_id: str, worker: int) -> str:
    """Where a save writes worker ``worker``'s file: next to the path being written (not a link's target)."""
    directory, name = worker_files_dir(checkpoint_path), _file_name(worker)
    return posixpath.join(directory, save_id, name) if "://" in directory else os.path.join(directory, save_id, name)


def resolve_worker_file(checkpoint_path: _PATH, relative: str) -> str:
    """Where a worker file named by the checkpoint at ``checkpoint_path`` lies. A local checkpoint reached through a
    symbolic link (Lightning's ``save_last="link"``) names files next to the file the link points to."""
    parts = PurePosixPath(relative).parts
    if not parts or PurePosixPath(relative).is_absolute() or ".." in parts:
        raise WorkerFileError(
            f"{checkpoint_path} names the worker file {relative!r}: worker files must be relative paths inside the "
            "checkpoint's directory"
        )
    path = os.fspath(checkpoint_path)
    if "://" not in path:
        return os.path.join(os.path.dirname(os.path.realpath(path)), *parts)
    return posixpath.join(posixpath.dirname(path), relative)


class CheckpointRanks(Protocol):
    """What the worker files need of a strategy; Lightning's and Fabric's DDP strategies both provide it."""

    checkpoint_io: Any

    @property
    def is_global_zero(self) -> bool: ...

    @property
    def root_device(self) -> torch.device: ...

    @property
    def world_size(self) -> int: ...

    def broadcast(self, obj: Any, src: int = 0) -> Any: ...

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool: ...


class WorkerFiles:
    """The worker files of one save: naming, writing and reading them (every rank agreeing on failures), removing
    older saves. Adapter-independent: the Trainer strategy (through :class:`WorkerCheckpoints`) and the Fabric
    strategy both keep their workers' states this way, in the same layout.

    Files go through the strategy's ``checkpoint_io`` (so fsspec paths and atomic writes work as for the checkpoint
    file). Collective methods must be called by every rank.
    """

    def __init__(self, ranks: CheckpointRanks) -> None:
        self._ranks = ranks

    def new_save_id(self, step: int) -> str:
        """A fresh id for a save, the same on every rank (collective). A fresh directory per save keeps the files of
        the save being replaced intact until the new checkpoint file is in place."""
        return self._ranks.broadcast(f"{step:09d}-{uuid.uuid4().hex[:8]}")

    def write(
        self,
        filepath: _PATH,
        save_id: str,
        worker: int,
        make_state: Callable[[], dict[str, Any] | None],
        storage_options: Any | None = None,
    ) -> None:
        """Write worker ``worker``'s file with the state ``make_state`` builds (None: this rank writes nothing, e.g.
        not its worker's writer). Collective: it is also the barrier that keeps rank 0 from writing a checkpoint file
        before all of its worker files exist, and a failure on any rank raises on every rank.

        Raises:
            WorkerFileError: naming the file and the error on the rank that failed, and the checkpoint on the others.
        """
        ranks = self._ranks
        target = _worker_file_target(filepath, save_id, worker)
        error: BaseException | None = None
        try:
            state = make_state()
            if state is not None:
                ranks.checkpoint_io.save_checkpoint(state, target, storage_options=storage_options)
        except Exception as e:
            error = e
        if not ranks.reduce_boolean_decision(error is None, all=True):
            if error is not None:
                raise WorkerFileError(
                    f"could not write {target}, worker {worker}'s file of checkpoint {filepath}: "
                    f"{type(error).__name__}: {error}"
                ) from error
            raise WorkerFileError(
                f"another rank could not write its worker file of checkpoint {filepath} (see its error); the "
                "checkpoint was not saved"
            )

    def read(self, path: str, section: Mapping[str, Any], worker: int) -> dict[str, Any] | None:
        """Read worker ``worker``'s file named by a checkpoint's checked ``section`` (see :func:`check_section`);
        None for a worker the checkpoint did not have. Collective: every rank learns which files failed, so all raise
        the same error instead of leaving the others waiting for them.

        Raises:
            WorkerFileError: listing every worker file that is missing, unreadable or from another save.
        """
        saved_p = int(section["num_workers"])
        state: dict[str, Any] | None = None
        reason, detail = 0, ""
        if worker < saved_p:
            target = resolve_worker_file(path, section["worker_files"][worker])
            try:
                state = self._ranks.checkpoint_io.load_checkpoint(target, map_location="cpu", weights_only=True)
            except FileNotFoundError:
                reason = _MISSING
            except Exception as error:
                reason, detail = _UNREADABLE, f" ({type(error).__name__}: {error})"
            if state is not None:
                found = (state.get("save_id"), state.get("worker")) if isinstance(state, Mapping) else None
                expected = f"save {section['save_id']!r}, worker {worker}"
                if found != (section["save_id"], worker):
                    reason, detail = _FOREIGN, f" (it is {_describe(found)}; expected {expected})"
        failed = self._agree_on_failures(reason, worker, saved_p)
        if failed:
            lines = [
                f"  worker {w}: {resolve_worker_file(path, section['worker_files'][w])} {_REASONS[code]}"
                + (detail if w == worker else "")
                for w, code in failed.items()
            ]
            raise WorkerFileError(
                f"cannot resume from {path}: worker file(s) of this checkpoint cannot be used:\n" + "\n".join(lines)
                + "\nCopy or move a checkpoint together with its '" + WORKERS_SUFFIX + "' directory, or resume from "
                "another checkpoint."
            )
        return state

    def _agree_on_failures(self, reason: int, worker: int, saved_p: int) -> dict[int, int]:
        """{worker: reason} of the worker files any rank failed to use."""
        codes = torch.zeros(saved_p, dtype=torch.int32, device=self._ranks.root_device)
        if worker < saved_p:
            codes[worker] = reason
        if dist.is_available() and dist.is_initialized() and self._ranks.world_size > 1:
            dist.all_reduce(codes, op=dist.ReduceOp.MAX)
        return {w: code for w, code in enumerate(codes.tolist()) if code}

    def prune(self, filepath: _PATH, save_id: str | None) -> None:
        """Remove the worker files of earlier saves to the same path, once the checkpoint file names ``save_id``'s
        (rank 0; the files of an interrupted save go too). ``None``: the checkpoint names no worker files, all go."""
        if not self._ranks.is_global_zero:
            return
        directory = worker_files_dir(filepath)
        fs = get_filesystem(directory)
        if save_id is None:
            if fs.exists(directory):
                self._ranks.checkpoint_io.remove_checkpoint(directory)
            return
        for entry in fs.ls(directory, detail=False):
            if posixpath.basename(str(entry).rstrip("/")) != save_id:
                self._ranks.checkpoint_io.remove_checkpoint(entry)

    def remove(self, filepath: _PATH) -> None:
        """Remove a checkpoint's worker files after the checkpoint file itself (rank 0; the file system is shared)."""
        if self._ranks.is_global_zero:
            self._ranks.checkpoint_io.remove_checkpoint(worker_files_dir(filepath))


def worker_file_state(
    *,
    save_id: str,
    worker: int,
    num_workers: int,
    ranks_per_worker: int,
    worker_group: dist.ProcessGroup | None,
    rank_in_worker: int,
    module_state: dict[str, Any],
    keys: Mapping[str, int],
    local: Sequence[Tensor],
    optimizer_states: Sequence[Any],
) -> dict[str, Any] | None:
    """The content of a worker file, in host memory, on the worker's writer (its first rank); None on its other ranks.
    Collective within a worker group (the RNG states of its ranks travel to the writer); every rank passes its
    ``local`` values, which with the center swapped in are themselves gathered within the worker."""
    rngs = gather_in_worker(capture_rng_state(), worker_group, rank_in_worker, ranks_per_worker)
    if rngs is None:
        return None
    return {
        "format": CHECKPOINT_FORMAT,
        "save_id": save_id,
        "worker": worker,
        "num_workers": num_workers,
        "ranks_per_worker": ranks_per_worker,
        "state_dict": _to_cpu(state_with(module_state, keys, local)),
        "optimizer_states": [_to_cpu(s) for s in optimizer_states],
        "rng": rngs,
    }


def gather_in_worker(obj: Any, worker_group: dist.ProcessGroup | None, rank_in_worker: int, ranks_per_worker: int
                     ) -> list[Any] | None:
    """``obj`` of every rank of this rank's worker, in rank order, on its writer (its first rank; None on the others).
    Collective within the worker group; used for the few-kB RNG states."""
    if worker_group is None:
        return [obj]
    gathered: list[Any] | None = [None] * ranks_per_worker if rank_in_worker == 0 else None
    dist.gather_object(obj, gathered, group=worker_group, group_dst=0)
    return gathered


def describe_more_ranks(saved_k: int, k: int) -> str:
    """The warning for resuming a checkpoint of ``saved_k`` ranks per worker with ``k`` > ``saved_k``."""
    return (
        f"EASGD resume: the checkpoint has {saved_k} rank(s) per worker and this run has {k}; ranks "
        f"{saved_k}-{k - 1} of every worker start from freshly seeded random number generators."
    )


def describe_resize(saved_p: int, p: int, alpha: float) -> str:
    """The warning for resuming a checkpoint of ``saved_p`` workers with ``p`` workers."""
    kept = min(saved_p, p)
    return (
        f"EASGD resume: the checkpoint has {saved_p} workers and this run has {p}; "
        f"own weights and optimizer state restored: {_workers(0, kept)}"
        + (f"; starting from the center: {_workers(kept, p)}" if p > kept else "")
        + (f"; dropped: {_workers(kept, saved_p)}" if saved_p > kept else "")
        + f"; alpha is now {alpha:g}."
    )


@dataclass
class _PendingWorker:
    """This rank's part of a checkpoint being resumed, kept from ``setup`` until the optimizers are restored."""

    optimizer_states: list[dict[str, Any]] | None  # None: a new worker, fresh per-parameter state
    rng: dict[str, Any] | None  # None: keep the seeded generators


class WorkerCheckpoints:
    """The :class:`~lightning_easgd.EASGDStrategy`'s checkpoint handling: what to save, where, and resuming from it.

    It reads the worker layout from the strategy: ``num_workers`` (p), ``ranks_per_worker`` (k), ``worker_index``
    (g), ``rank_in_worker`` (j) and ``worker_group`` (the process group of the worker's k ranks, None when k = 1).
    """

    def __init__(self, strategy: EASGDStrategy) -> None:
        self._strategy = strategy
        self._files = WorkerFiles(strategy)
        self._loaded: tuple[str, dict[str, Any]] | None = None  # (path, section) read before setup
        self._pending: _PendingWorker | None = None
        self._saved: tuple[str, str] | None = None  # (path, save id) of the save in progress

    # ------------------------------------------------------------------ saving

    def center_state_dict(self, state: dict[str, Any]) -> dict[str, Any]:
        """Put the center into the module's ``state`` (see :func:`center_state`; rank 0 writes the file)."""
        strategy = self._strategy
        averager = strategy.averager
        if averager is None:
            return state
        return center_state(state, strategy._state_keys, averager.center_values(), strategy.is_global_zero)

    def before_save(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None) -> None:
        """Write the worker files of a full checkpoint (collective; every rank calls it) and add the section naming
        them. Weights-only checkpoints (no ``optimizer_states``) get neither."""
        strategy = self._strategy
        averager = strategy.averager
        self._saved = None
        if averager is None or "optimizer_states" not in checkpoint:
            return
        section = checkpoint_section(averager, world_size=strategy.world_size, num_workers=strategy.num_workers,
                                     ranks_per_worker=strategy.ranks_per_worker, tau=strategy.tau,
                                     writer=strategy.is_global_zero)
        if strategy.save_worker_states:
            save_id = self._files.new_save_id(int(checkpoint.get("global_step", 0)))
            names = [worker_file_name(filepath, save_id, g) for g in range(strategy.num_workers)]
            self._files.write(filepath, save_id, strategy.worker_index,
                              partial(self._worker_state, checkpoint, save_id), storage_options)
            section["save_id"] = save_id
            section["worker_files"] = names
            self._saved = (os.fspath(filepath), save_id)
            # Per-parameter optimizer state lives in the worker files; the checkpoint keeps the hyperparameters
            # (what a new worker starts with) so that it does not carry a second copy of worker 0's state.
            checkpoint["optimizer_states"] = [
                {"state": {}, "param_groups": s["param_groups"]} for s in checkpoint["optimizer_states"]
            ]
        checkpoint[CHECKPOINT_KEY] = section

    def _worker_state(self, checkpoint: dict[str, Any], save_id: str) -> dict[str, Any] | None:
        """This worker's file (on its writer; None on its other ranks, which send the writer their RNG states)."""
        strategy = self._strategy
        assert strategy.averager is not None and strategy.lightning_module is not None
        return worker_file_state(
            save_id=save_id, worker=strategy.worker_index, num_workers=strategy.num_workers,
            ranks_per_worker=strategy.ranks_per_worker, worker_group=strategy.worker_group,
            rank_in_worker=strategy.rank_in_worker, module_state=strategy.lightning_module.state_dict(),
            keys=strategy._state_keys, local=strategy.averager.local_values(),
            optimizer_states=checkpoint["optimizer_states"],
        )

    def after_save(self) -> None:
        """Remove the worker files of earlier saves to the same path, now that the checkpoint file names the new
        ones (rank 0; the files of an interrupted save go too)."""
        saved, self._saved = self._saved, None
        if saved is not None:
            self._files.prune(*saved)

    def remove(self, filepath: _PATH) -> None:
        """Remove a checkpoint's worker files after the checkpoint file itself (rank 0; the file system is shared)."""
        self._files.remove(filepath)

    # ------------------------------------------------------------------ loading

    def read(self, checkpoint_path: _PATH, load: Callable[[], Any]) -> dict[str, Any]:
        """Load the checkpoint file with ``load``, refuse what is not a checkpoint of a known format, and keep the
        strategy's section for :meth:`setup` (the worker files are read there, each rank reading only its own)."""
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
            self._loaded = (os.fspath(checkpoint_path), check_section(checkpoint_path, section))
        return checkpoint

    def setup(self, fitting: bool) -> None:
        """Consume the checkpoint read before setup: when fitting, give this rank back its worker's weights (from its
        worker's file only) and keep its optimizer and RNG states for :meth:`load_optimizer_states`."""
        loaded, self._loaded = self._loaded, None
        self._pending = None
        if fitting and loaded is not None:
            assert self._strategy.averager is not None
            resume_center_velocity(self._strategy.averager, loaded[1].get("center_velocity"))
            self._resume(*loaded)

    def _resume(self, path: str, section: dict[str, Any]) -> None:
        strategy = self._strategy
        assert strategy.averager is not None and strategy.lightning_module is not None
        legacy = section["format"] == 1
        saved_p = int(section["world_size"] if legacy else section["num_workers"])
        saved_k = 1 if legacy else int(section["ranks_per_worker"])
        if (section.get("workers") if legacy else section.get("worker_files")) is None:
            rank_zero_warn(
                f"EASGD resume: the checkpoint holds no worker states (saved with save_worker_states=False); all "
                f"{strategy.num_workers} workers start from the center."
            )
            return
        p, k = strategy.num_workers, strategy.ranks_per_worker
        if saved_p != p:
            rank_zero_warn(describe_resize(saved_p, p, strategy.averager.alpha))
        if k > saved_k:
            rank_zero_warn(describe_more_ranks(saved_k, k))
        g, j = strategy.worker_index, strategy.rank_in_worker
        if legacy:
            mine = section["workers"][g] if g < saved_p else None
            rngs = None if mine is None else [mine["rng"]]
        else:
            mine = self._files.read(path, section, g)
            rngs = None if mine is None else mine["rng"]
        if mine is None:
            self._pending = _PendingWorker(optimizer_states=None, rng=None)
            return
        strategy.lightning_module.load_state_dict(mine["state_dict"])
        self._pending = _PendingWorker(mine["optimizer_states"], rngs[j] if j < len(rngs) else None)

    def load_optimizer_states(self, checkpoint: Mapping[str, Any]) -> bool:
        """Restore this rank's optimizer states (and then its RNG states) from its worker's saved state; a new
        worker keeps only the hyperparameters. False when the checkpoint holds no worker states (the caller then
        restores the checkpoint's ``optimizer_states`` as usual)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        strategy = self._strategy
        # A new worker keeps the optimizer's hyperparameters (an LR schedule may have changed them) but no
        # per-parameter state: momentum belongs to another worker's trajectory.
        states = pending.optimizer_states or [
            {"state": {}, "param_groups": s["param_groups"]} for s in checkpoint["optimizer_states"]
        ]
        for optimizer, state in zip(strategy.optimizers, states):
            optimizer.load_state_dict(state)
            _optimizer_to_device(optimizer, strategy.root_device)
        if pending.rng is not None:
            # This is the last restore step before the fit loop creates the first epoch's data iterator, which
            # draws its base seed from the global generator (the sanity check runs under isolate_rng).
            restore_rng_state(pending.rng)
        return True


def checkpoint_section(averager: ElasticWorker, *, world_size: int, num_workers: int, ranks_per_worker: int | str,
                       tau: int, writer: bool) -> dict[str, Any]:
    """The ``"easgd"`` section of a checkpoint, before its worker files are added: the layout and clock it was saved
    with (what a resume checks and warns against) and the center momentum's velocity.

    Collective within a worker group (the velocity is gathered like the center); every rank calls it. The velocity
    is identical on every rank, like the center, so it travels in the checkpoint file: the rank that writes the file
    (``writer``) gets host copies, the others views that cost nothing.
    """
    section: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "world_size": world_size,
        "num_workers": num_workers,
        "ranks_per_worker": ranks_per_worker,
        "tau": tau,
        "alpha": averager.alpha,
        "clock": averager.clock,
    }
    velocity = averager.center_velocity()
    if velocity is not None:
        section["center_velocity"] = {k: _to_cpu(v) if writer else v for k, v in velocity.items()}
    return section


def resume_center_velocity(averager: ElasticWorker, velocity: Mapping[str, Tensor] | None) -> None:
    """Restore the center momentum's velocity from a checkpoint's section (zero from a checkpoint without one), or say
    that it is dropped when this run has no center momentum."""
    if velocity is not None and averager.center_momentum is None:
        rank_zero_warn("EASGD resume: the checkpoint holds a center-momentum velocity, but this run has "
                       "center_momentum=0: the velocity is dropped and the paper's rule is used.")
        return
    averager.load_center_velocity(velocity)


def center_state(state: dict[str, Any], keys: Mapping[str, int], center: Sequence[Tensor], writer: bool
                 ) -> dict[str, Any]:
    """A module's ``state`` with the center's values. The rank that writes the checkpoint file (``writer``) gets host
    copies (one center in host memory, and a file that loads on any machine); the others get views of the center,
    which cost nothing and are not kept."""
    state = state_with(state, keys, center)
    return {key: _to_cpu(value) for key, value in state.items()} if writer else state


def check_section(checkpoint_path: _PATH, section: Any, formats: tuple[int, ...] = _READABLE_FORMATS
                  ) -> dict[str, Any]:
    """A checkpoint's ``"easgd"`` section, checked: a known format and, with worker files, ``num_workers`` names
    inside the checkpoint's directory and a ``save_id``.

    Raises:
        ValueError: for an unknown format or a damaged section.
    """
    if not isinstance(section, Mapping) or section.get("format") not in formats:
        raise ValueError(
            f"{checkpoint_path}: the checkpoint's '{CHECKPOINT_KEY}' section has an unknown format; this version of "
            f"lightning-easgd reads format{'s' if len(formats) > 1 else ''} {', '.join(map(str, formats))}"
        )
    section = dict(section)
    if section["format"] == 2 and section.get("worker_files") is not None:
        files, p, save_id = section["worker_files"], section.get("num_workers"), section.get("save_id")
        if (not isinstance(p, int) or not isinstance(save_id, str) or not isinstance(files, list)
                or len(files) != p or not all(isinstance(name, str) for name in files)):
            raise ValueError(
                f"{checkpoint_path}: the checkpoint's '{CHECKPOINT_KEY}' section is damaged: it needs num_workers "
                f"(got {p!r}) worker file names (got {files!r}) and a save_id (got {save_id!r})"
            )
        for name in files:
            resolve_worker_file(checkpoint_path, name)  # refuses names outside the checkpoint's directory
    return section


def _file_name(worker: int) -> str:
    return f"worker_{worker:05d}.pt"


def _to_cpu(value: Any) -> Any:
    return apply_to_collection(value, Tensor, lambda t: t.detach().to("cpu", copy=True))


def _describe(found: tuple[Any, Any] | None) -> str:
    return "not a worker file" if found is None else f"save {found[0]!r}, worker {found[1]!r}"


def _workers(start: int, stop: int) -> str:
    return f"worker {start}" if stop - start == 1 else f"workers {start}-{stop - 1}"
