"""The ``"easgd"`` section of a checkpoint: what it records, how it is checked, and the center beside it.

The center itself is the checkpoint's model entry (``state_dict`` for the Trainer, the model's entry of
``fabric.save``); the section records the layout and clock the checkpoint was saved with (what a resume checks and
warns against), the center momentum's velocity, and the worker files (:mod:`lightning_easgd.checkpoint.worker_files`).
Framework-neutral: both adapters write and read it through :mod:`lightning_easgd.checkpoint.routines`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.fabric.utilities.types import _PATH
from torch import Tensor

from lightning_easgd.adapter.module_state import state_with
from lightning_easgd.checkpoint.worker_files import CHECKPOINT_FORMAT, resolve_worker_file, to_cpu
from lightning_easgd.core.worker import ElasticWorker

CHECKPOINT_KEY = "easgd"
"""Where a checkpoint keeps the strategy's own state (the center itself is the checkpoint's model entry)."""
READABLE_FORMATS = (1, 2)
"""The formats the Trainer strategy resumes from (Fabric's ``fabric.save`` only ever wrote format 2)."""


def checkpoint_section(averager: ElasticWorker, *, world_size: int, num_workers: int, ranks_per_worker: int | str,
                       tau: int, writer: bool) -> dict[str, Any]:
    """The ``"easgd"`` section of a checkpoint, before its worker files are added: the layout and clock it was saved
    with and the center momentum's velocity.

    Collective within the writer's worker group (a sharded velocity is gathered to the writer); every rank calls it.
    The velocity is identical on every rank, like the center, so it travels in the checkpoint file: the rank that
    writes the file (``writer``) gets host copies, the others nothing they would have to allocate.
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
    velocity = averager.checkpoint_velocity(writer)
    if velocity is not None:
        section["center_velocity"] = velocity
    return section


def center_state(state: dict[str, Any], keys: Mapping[str, int], center: Sequence[Tensor] | None, writer: bool
                 ) -> dict[str, Any]:
    """A module's ``state`` with the center's values ``center``, from
    :meth:`~lightning_easgd.core.worker.ElasticWorker.checkpoint_center`: host copies on the rank that writes the
    checkpoint file (``writer``, whose other entries, e.g. integer buffers, are copied to the host too, so that the
    file loads on any machine), views that cost nothing or None on the others. None leaves ``state`` as it is: that
    rank's state is not written."""
    if center is None:
        return state
    state = state_with(state, keys, center)
    if writer:  # the center's values are host copies already
        return {key: value if key in keys else to_cpu(value) for key, value in state.items()}
    return state


def check_section(checkpoint_path: _PATH, section: Any, formats: tuple[int, ...] = READABLE_FORMATS
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


def _workers(start: int, stop: int) -> str:
    return f"worker {start}" if stop - start == 1 else f"workers {start}-{stop - 1}"
