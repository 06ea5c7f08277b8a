"""Check, in the launching process, that a checkpoint can be resumed from, before any worker starts.

A missing, empty or truncated checkpoint, or one whose worker files were not copied with it, is otherwise found by
every worker after the launch (tens of seconds for a large job), and reported by each of them. Here it is one
:class:`UnusableCheckpointError` whose single-line message names the file and what is wrong with it.

The check reads the layout the strategies write (see :mod:`lightning_easgd.checkpoint.worker_files`): the checkpoint
file, its ``"easgd"`` section (formats 1 and 2) and, for format 2, every worker file it names. Local files are
memory-mapped, so the check reads the pickled structure and the zip directory, not the tensors: it costs a fraction of
a load, and it finds truncation (the zip directory is at the end of the file) but not every flipped byte inside a
tensor. Framework-neutral: it imports neither Lightning's Trainer nor Fabric.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Collection, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH

from lightning_easgd.checkpoint.section import CHECKPOINT_KEY, check_section
from lightning_easgd.checkpoint.worker_files import WORKERS_SUFFIX, WorkerFileError, resolve_worker_file

__all__ = ["UnusableCheckpointError", "check_checkpoint"]


class UnusableCheckpointError(ValueError):
    """A checkpoint to resume from is missing, unreadable, not a Lightning checkpoint, or lacks worker files."""


def check_checkpoint(path: _PATH, *, entries: Collection[str] = (), weights_only: bool | None = None) -> None:
    """Refuse a checkpoint that resuming from ``path`` would fail on, naming the file and the problem.

    Args:
        path: The checkpoint file (local or an fsspec URL), as passed to ``fit(ckpt_path=...)`` or ``fabric.load``.
        entries: Top-level entries the load needs, e.g. ``("state_dict",)`` for a Trainer's resume (a Fabric
            checkpoint holds whatever was passed to ``fabric.save``).
        weights_only: As passed to the load that follows (``None``: torch's default for a local file, ``False`` for
            a remote one, as Lightning does), so that a checkpoint the load would refuse is refused here too.

    Raises:
        UnusableCheckpointError: with a single-line message.
    """
    path = os.fspath(path)
    checkpoint = _load(path, "ckpt_path", weights_only)
    if not isinstance(checkpoint, Mapping):
        raise UnusableCheckpointError(f"ckpt_path {path} is not a checkpoint: it holds a {type(checkpoint).__name__}, "
                                      "not a dictionary")
    missing = [entry for entry in entries if entry not in checkpoint]
    if missing:
        raise UnusableCheckpointError(f"ckpt_path {path} is not a Lightning checkpoint: it has no "
                                      f"{', '.join(map(repr, missing))} entry")
    section = checkpoint.get(CHECKPOINT_KEY)
    if section is None:  # not saved by an EASGD strategy: nothing more to check
        return
    try:
        section = check_section(path, section)
    except (ValueError, WorkerFileError) as error:
        raise UnusableCheckpointError(f"ckpt_path {_one_line(str(error))}") from error
    if section["format"] == 2 and section.get("worker_files") is not None:
        _check_worker_files(path, section)


def _check_worker_files(path: str, section: Mapping[str, Any]) -> None:
    """Every worker file the checkpoint names exists, is readable and belongs to this save and worker."""
    problems = []
    for worker, name in enumerate(section["worker_files"]):
        target = resolve_worker_file(path, name)
        try:
            state = _load(target, "worker file", weights_only=True)
        except UnusableCheckpointError as error:
            problems.append(f"worker {worker}: {error}")
            continue
        found = (state.get("save_id"), state.get("worker")) if isinstance(state, Mapping) else None
        if found != (section["save_id"], worker):
            problems.append(f"worker {worker}: worker file {target} does not belong to this checkpoint (it is "
                            f"{'not a worker file' if found is None else f'save {found[0]!r}, worker {found[1]!r}'}; "
                            f"expected save {section['save_id']!r}, worker {worker})")
    if problems:
        raise UnusableCheckpointError(
            f"ckpt_path {path}: {len(problems)} of its {len(section['worker_files'])} worker files cannot be used: "
            + "; ".join(problems) + f". Copy or move a checkpoint together with its '{WORKERS_SUFFIX}' directory."
        )


def _load(path: str, what: str, weights_only: bool | None) -> Any:
    """``torch.load`` of ``path`` on the CPU, memory-mapped when local; every failure as one line naming the file."""
    fs = get_filesystem(path)
    if not fs.exists(path):
        raise UnusableCheckpointError(f"{what} {path} does not exist")
    if fs.isdir(path):
        raise UnusableCheckpointError(f"{what} {path} is a directory, not a checkpoint file")
    if fs.size(path) == 0:
        raise UnusableCheckpointError(f"{what} {path} is empty (0 bytes): its save was interrupted or it was "
                                      "never written")
    try:
        if "://" in path:
            with fs.open(path, "rb") as file:
                return torch.load(file, map_location="cpu", weights_only=bool(weights_only))
        # mmap needs the zip format (torch.save's default since 1.6); older pickle files are read whole.
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        raise UnusableCheckpointError(
            f"{what} {path} cannot be loaded, it may be truncated or corrupt, or not a PyTorch checkpoint "
            f"({type(error).__name__}: {_one_line(str(error)) or 'no detail'})"
        ) from error


def _one_line(text: str) -> str:
    """The first line of ``text`` (torch's load errors run over many lines), stripped."""
    return text.strip().splitlines()[0].strip() if text.strip() else ""
