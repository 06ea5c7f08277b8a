"""Each worker's own state in its own file beside a checkpoint, written by that worker's rank.

A checkpoint's main file holds the center and metadata; the workers' local weights, optimizer states and RNG
states (what exact resume needs besides the center) go to ``<checkpoint>.workers/<save id>/worker_00003.pt``, one
file per worker, written in parallel and atomically by each worker itself, so that no rank ever gathers the others'
states. The main file names that directory relative to itself, so a checkpoint directory can be moved.

Crash safety: every save writes into a directory of its own, then the main file replaces the old one atomically,
and only then are older directories removed. After a crash at any point the main file is either the old one, whose
worker files are still there, or the new one, whose worker files are complete. Like Lightning's DDP checkpoints, this
assumes all ranks see the same file system.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from lightning_easgd.checkpoint_io import AtomicCheckpointIO

WORKERS_SUFFIX = ".workers"


def new_worker_directory(checkpoint: _PATH) -> str:
    """A fresh directory name for one save's worker files, relative to the checkpoint's own directory.

    Call it on one rank and share the result (it is random, so that saving over an existing checkpoint never
    touches the files the existing one names)."""
    return f"{os.path.basename(str(checkpoint))}{WORKERS_SUFFIX}/{uuid.uuid4().hex}"


def worker_file(checkpoint: _PATH, directory: str, index: int) -> str:
    """The path of worker ``index``'s file for the checkpoint whose metadata names ``directory``."""
    return os.path.join(os.path.dirname(str(checkpoint)), directory, f"worker_{index:05d}.pt")


def write_worker_state(checkpoint: _PATH, directory: str, index: int, state: dict[str, Any]) -> None:
    """Write worker ``index``'s state atomically (temporary file beside the target, fsync, rename)."""
    path = worker_file(checkpoint, directory, index)
    get_filesystem(path).makedirs(os.path.dirname(path), exist_ok=True)
    AtomicCheckpointIO().save_checkpoint(state, path)


def read_worker_state(checkpoint: _PATH, directory: str, index: int) -> dict[str, Any]:
    """Read worker ``index``'s state (tensors and plain Python values only: ``weights_only`` loading).

    Raises:
        ValueError: naming the file and the checkpoint when the file is missing, unreadable or not a worker state.
    """
    path = worker_file(checkpoint, directory, index)
    try:
        state = AtomicCheckpointIO().load_checkpoint(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"worker {index}'s state {path}, named by checkpoint {checkpoint}, cannot be read ({type(error).__name__}: "
            f"{error}); the checkpoint's worker files must stay beside it"
        ) from error
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ValueError(f"{path}, named by checkpoint {checkpoint}, is not a worker state file")
    return state


def prune_worker_directories(checkpoint: _PATH, keep: str | None) -> None:
    """Remove the checkpoint's worker directories other than ``keep`` (a name from :func:`new_worker_directory`).

    Call it on one rank after the main file naming ``keep`` has been written."""
    root = f"{checkpoint}{WORKERS_SUFFIX}"
    fs = get_filesystem(root)
    if not fs.isdir(root):
        return
    kept = None if keep is None else os.path.basename(keep)
    for entry in fs.ls(root, detail=False):
        if os.path.basename(str(entry).rstrip("/")) != kept:
            fs.rm(entry, recursive=True)
    if kept is None:
        fs.rm(root, recursive=True)


def describe_resize(saved: int, now: int, alpha: float) -> str:
    """The warning for resuming ``saved`` workers' checkpoint with ``now`` workers."""
    kept = min(saved, now)
    return (
        f"EASGD resume: the checkpoint has {saved} workers and this run has {now}; own weights and optimizer state "
        f"restored: {_workers(0, kept)}"
        + (f"; starting from the center: {_workers(kept, now)}" if now > kept else "")
        + (f"; dropped: {_workers(kept, saved)}" if saved > kept else "")
        + f"; alpha is now {alpha:g}."
    )


def _workers(start: int, stop: int) -> str:
    return f"worker {start}" if stop - start == 1 else f"workers {start}-{stop - 1}"
