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

Two checkpoints saved at the same step (``last.ckpt`` beside the top-k checkpoint of that step, or two
``fabric.save`` calls in a row) share their worker files: the second save hard-links the first one's files (same
save id, so each file still belongs to both checkpoints) instead of writing p model copies again. Removing either
checkpoint removes only its own links.

Format 1 (lightning-easgd 0.1) kept every worker inside the checkpoint file; it is still read.

Everything here is framework-neutral: :mod:`lightning_easgd.checkpoint.routines` holds the save and resume steps
both adapters call, :mod:`lightning_easgd.checkpoint.section` the checkpoint's ``"easgd"`` section.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, Protocol

import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_easgd.adapter.module_state import state_with
from lightning_easgd.checkpoint.rng import capture_rng_state

CHECKPOINT_FORMAT = 2
"""The format written: worker states in worker files. Format 1 (worker states inside the checkpoint) is read too."""
WORKERS_SUFFIX = ".workers"
"""The directory next to a checkpoint ``<name>`` that holds its worker files is ``<name>.workers``."""

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


def worker_file_target(checkpoint_path: _PATH, save_id: str, worker: int) -> str:
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
    older saves. Adapter-independent: the Trainer and the Fabric strategies both keep their workers' states this way
    (through :class:`~lightning_easgd.checkpoint.routines.WorkerCheckpointing`), in the same layout.

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
        share: str | None = None,
    ) -> None:
        """Write worker ``worker``'s file with the state ``make_state`` builds (None: this rank writes nothing, e.g.
        not its worker's writer), or, with ``share``, hard-link the identical local file ``share`` of an earlier save
        with the same save id (copied where the file system has no hard links) without calling ``make_state``.
        Collective: it is also the barrier that keeps rank 0 from writing a checkpoint file before all of its worker
        files exist, and a failure on any rank raises on every rank.

        Raises:
            WorkerFileError: naming the file and the error on the rank that failed, and the checkpoint on the others.
        """
        ranks = self._ranks
        target = worker_file_target(filepath, save_id, worker)
        error: BaseException | None = None
        try:
            if share is not None:
                _share(share, target)
            else:
                state = make_state()
                if state is not None:
                    ranks.checkpoint_io.save_checkpoint(state, target, storage_options=storage_options)
        except Exception as e:  # noqa: BLE001  (any failure must reach the decision, so that every rank raises)
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
            except Exception as error:  # noqa: BLE001  (any failure must reach the agreement: every rank raises)
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
    local: Sequence[Tensor] | None,
    optimizer_states: Sequence[Any],
) -> dict[str, Any] | None:
    """The content of a worker file, in host memory, on the worker's writer (its first rank); None on its other ranks.
    Collective within a worker group (the RNG states of its ranks travel to the writer); ``local`` is the worker's
    own values on the writer (``ElasticWorker.checkpoint_local``), None or ignored on the other ranks."""
    rngs = gather_in_worker(capture_rng_state(), worker_group, rank_in_worker, ranks_per_worker)
    if rngs is None:
        return None
    assert local is not None, "the worker's writer needs its local values"
    return {
        "format": CHECKPOINT_FORMAT,
        "save_id": save_id,
        "worker": worker,
        "num_workers": num_workers,
        "ranks_per_worker": ranks_per_worker,
        "state_dict": to_cpu(state_with(module_state, keys, local)),
        "optimizer_states": [to_cpu(s) for s in optimizer_states],
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


def _share(source: str, target: str) -> None:
    """Make ``target`` the same file as ``source``: a hard link, or an atomic copy where links are refused."""
    if os.path.abspath(source) == os.path.abspath(target):  # the same path saved again: the file is already there
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # no hard links here (another file system, FAT, some network mounts): copy
        partial_copy = f"{target}.partial"
        shutil.copyfile(source, partial_copy)
        os.replace(partial_copy, target)


def _file_name(worker: int) -> str:
    return f"worker_{worker:05d}.pt"


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it copied to host memory (detached)."""
    return apply_to_collection(value, Tensor, lambda t: t.detach().to("cpu", copy=True))


def _describe(found: tuple[Any, Any] | None) -> str:
    return "not a worker file" if found is None else f"save {found[0]!r}, worker {found[1]!r}"

