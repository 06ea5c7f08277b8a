"""The save and resume steps both adapters call: one save routine and one resume routine, framework-neutral.

An adapter (the Trainer's :class:`~lightning_easgd.EASGDStrategy` through
:mod:`lightning_easgd.trainer.checkpoints`, or :class:`~lightning_easgd.EASGDFabricStrategy`) only decides *when*
they run and where the checkpoint's entries go: the Trainer's ``checkpoint`` dict, or the entries of
``fabric.save``. What a save writes (the ``"easgd"`` section, the worker files, a fresh save id, the
hyperparameters-only optimizer entries of the main file) and what a resume restores (the center in full precision,
its velocity, the clock, this worker's weights, optimizer and RNG states, the warnings on a changed layout) is here,
once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.fabric.utilities.types import _PATH
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_easgd.checkpoint.rng import capture_rng_state, restore_rng_state
from lightning_easgd.checkpoint.section import (
    center_state,
    checkpoint_section,
    describe_more_ranks,
    describe_resize,
)
from lightning_easgd.checkpoint.worker_files import (
    CheckpointRanks,
    WorkerFiles,
    worker_file_name,
    worker_file_state,
    worker_file_target,
)
from lightning_easgd.core.topology import WorkerTopology
from lightning_easgd.core.worker import ElasticWorker


class CheckpointedWorker(CheckpointRanks, Protocol):
    """What the routines need of an adapter: its ranks (:class:`CheckpointRanks`), the worker layout (its resolved
    :class:`~lightning_easgd.core.topology.WorkerTopology`, read from there only), and the options that decide what a
    save holds. Both adapters' ``WorkerLayout`` provides it."""

    @property
    def tau(self) -> int: ...

    @property
    def save_worker_states(self) -> bool: ...

    @property
    def topology(self) -> WorkerTopology: ...

    @property
    def state_keys(self) -> Mapping[str, int]: ...


def hyperparameters_only(optimizer_state: Mapping[str, Any]) -> dict[str, Any]:
    """An optimizer's state dict without its per-parameter state: what the main file keeps when the worker files
    hold every worker's own (so the main file carries no second copy of rank 0's, and no rank loads it)."""
    return {"state": {}, "param_groups": optimizer_state["param_groups"]}


@dataclass
class WorkerResume:
    """This rank's part of a checkpoint being resumed, once its weights are back: its optimizer states (None: a
    worker the checkpoint did not have, which keeps the hyperparameters but no per-parameter state) and its RNG
    states (None: keep the seeded generators)."""

    optimizer_states: list[dict[str, Any]] | None
    rng: dict[str, Any] | None

    def restore(self, optimizers: Sequence[Optimizer], only: Collection[Optimizer] | None = None) -> None:
        """Restore the optimizers (all of them, or those in ``only``), then the RNG states: call it as the last
        restore step before training draws random numbers (the first epoch's data order, dropout).

        Raises:
            ValueError: when the worker's file holds another number of optimizer states than ``optimizers``.
        """
        states = self.optimizer_states
        if states is not None and len(states) != len(optimizers):
            raise ValueError(
                f"the worker's file holds {len(states)} optimizer states, but {len(optimizers)} optimizers are set up"
            )
        for i, optimizer in enumerate(optimizers):
            if only is not None and optimizer not in only:
                continue
            if states is None:  # momentum belongs to another worker's trajectory
                optimizer.state.clear()
            else:
                optimizer.load_state_dict(states[i])
        if self.rng is not None:
            restore_rng_state(self.rng)


@dataclass
class _LastSave:
    """What this rank wrote at the last save, to share its worker files with the next save of the same step."""

    save_id: str
    clock: int
    generation: int
    target: str  # this rank's worker file (written on its worker's first rank only)
    rng: dict[str, Any]
    param_groups: list[Any]


class WorkerCheckpointing:
    """The save and resume routines of one strategy (one per strategy: it remembers the last save, whose worker
    files the next save shares when nothing changed in between).

    Every method that says so is collective: all ranks call it, in the same order.
    """

    def __init__(self, strategy: CheckpointedWorker) -> None:
        self._strategy = strategy
        self.files = WorkerFiles(strategy)
        self._last: _LastSave | None = None
        self._generation = 0

    def touch(self) -> None:
        """The worker's state may have changed without an optimizer step (a training-mode forward updates
        BatchNorm's statistics, weights were loaded): the next save writes its own worker files."""
        self._generation += 1

    # ------------------------------------------------------------------ saving

    def center_state(self, averager: ElasticWorker, state: dict[str, Any]) -> dict[str, Any]:
        """The module's ``state`` with the center's values: host copies on rank 0, which writes the checkpoint file;
        views on the other ranks, or (where the center is sharded) their own state, which is not written.
        Collective within worker 0 with worker groups."""
        writer = self._strategy.is_global_zero
        return center_state(state, self._strategy.state_keys, averager.checkpoint_center(writer), writer)

    def save(self, filepath: _PATH, averager: ElasticWorker, *, module_state: Callable[[], dict[str, Any]],
             optimizer_states: Sequence[Mapping[str, Any]], storage_options: Any | None = None) -> dict[str, Any]:
        """Write this worker's file (with ``save_worker_states``) and return the checkpoint's ``"easgd"`` section
        naming every worker's. Collective. The caller then writes the checkpoint file, with
        :func:`hyperparameters_only` optimizer entries when the section names worker files, and calls
        :meth:`saved`.

        Args:
            filepath: the checkpoint file being saved.
            averager: the exchange, whose center, velocity and clock the section records.
            module_state: the module's ``state_dict`` (this worker's values, or the center while it is swapped in).
            optimizer_states: this rank's optimizers' full state dicts, for its worker's file.
            storage_options: passed to the strategy's ``checkpoint_io``.
        """
        s = self._strategy
        t = s.topology
        k = t.ranks_per_worker
        section = checkpoint_section(averager, world_size=s.world_size, num_workers=t.num_workers,
                                     ranks_per_worker=k, tau=s.tau, writer=s.is_global_zero)
        if not s.save_worker_states:
            self._last = None
            return section
        writer = t.rank_in_worker == 0
        rng = capture_rng_state()
        param_groups = [state["param_groups"] for state in optimizer_states]
        last = self._last
        shared = s.reduce_boolean_decision(self._can_share(filepath, averager, rng, param_groups, writer), all=True)
        save_id = last.save_id if shared and last is not None else self.files.new_save_id(averager.clock)

        def make_state() -> dict[str, Any] | None:
            return worker_file_state(
                save_id=save_id, worker=t.worker_index, num_workers=t.num_workers, ranks_per_worker=k,
                worker_group=t.worker_group, rank_in_worker=t.rank_in_worker, module_state=module_state(),
                keys=s.state_keys, local=averager.checkpoint_local(), optimizer_states=optimizer_states,
            )

        share = last.target if shared and writer and last is not None else None
        self.files.write(filepath, save_id, t.worker_index, (lambda: None) if shared else make_state,
                         storage_options, share=share)
        target = worker_file_target(filepath, save_id, t.worker_index)
        self._last = _LastSave(save_id, averager.clock, self._generation, target, rng, param_groups)
        section["save_id"] = save_id
        section["worker_files"] = [worker_file_name(filepath, save_id, g) for g in range(t.num_workers)]
        return section

    def _can_share(self, filepath: _PATH, averager: ElasticWorker, rng: dict[str, Any], param_groups: list[Any],
                   writer: bool) -> bool:
        """Whether this rank's worker file would equal the last save's: same clock, nothing touched since, the same
        RNG states and optimizer hyperparameters, and (on the writer) that file still on a local disk."""
        last = self._last
        if last is None or "://" in os.fspath(filepath) or "://" in last.target:
            return False
        if (last.clock, last.generation) != (averager.clock, self._generation):
            return False
        if not (_same(last.rng, rng) and _same(last.param_groups, param_groups)):
            return False
        return not writer or os.path.isfile(last.target)

    def saved(self, filepath: _PATH, section: Mapping[str, Any]) -> None:
        """After the checkpoint file is written: remove the worker files of earlier saves to the same path, all of
        them when this one names none (rank 0; the files of an interrupted save go too)."""
        self.files.prune(filepath, section.get("save_id"))

    # ------------------------------------------------------------------ resuming

    def resume(self, path: str, section: Mapping[str, Any], averager: ElasticWorker, module: Module,
               center: Mapping[str, Tensor] | None = None) -> WorkerResume | None:
        """Restore what a checkpoint (its checked ``section``) holds for this rank: the center from ``center`` (the
        checkpoint's full-precision values, not the module's, which a 16-bit precision has rounded), the
        velocity, the clock, and this worker's weights from its own file, read into ``module``. Collective.

        Returns:
            The optimizer and RNG states to restore (:meth:`WorkerResume.restore`), or None when the checkpoint
            holds no worker states (every worker starts from the center, with the main file's optimizer state).
        """
        t = self._strategy.topology
        self.touch()
        if center is not None and all(name in center for name in averager.names):
            averager.load_state_dict({"clock": averager.clock, "center": {n: center[n] for n in averager.names}})
        averager.clock = int(section.get("clock", averager.clock))
        velocity = section.get("center_velocity")
        if velocity is not None and averager.center_momentum is None:
            rank_zero_warn("EASGD resume: the checkpoint holds a center-momentum velocity, but this run has "
                           "center_momentum=0: the velocity is dropped and the paper's rule is used.")
        else:
            averager.load_center_velocity(velocity)
        legacy = section["format"] == 1
        if (section.get("workers") if legacy else section.get("worker_files")) is None:
            rank_zero_warn(
                f"EASGD resume: the checkpoint holds no worker states (saved with save_worker_states=False); all "
                f"{t.num_workers} workers start from the center."
            )
            return None
        saved_p = int(section["world_size"] if legacy else section["num_workers"])
        saved_k = 1 if legacy else int(section["ranks_per_worker"])
        p, k = t.num_workers, t.ranks_per_worker
        if saved_p != p:
            rank_zero_warn(describe_resize(saved_p, p, averager.alpha))
        if k > saved_k:
            rank_zero_warn(describe_more_ranks(saved_k, k))
        g, j = t.worker_index, t.rank_in_worker
        if legacy:
            mine = section["workers"][g] if g < saved_p else None
            rngs = None if mine is None else [mine["rng"]]
        else:
            mine = self.files.read(path, section, g)  # collective: every rank agrees on failures
            rngs = None if mine is None else mine["rng"]
        if mine is None:
            return WorkerResume(optimizer_states=None, rng=None)
        module.load_state_dict(mine["state_dict"])  # the local weights; the center is untouched
        # A rank the saved worker did not have keeps its seeded generators (warned above).
        return WorkerResume(list(mine["optimizer_states"]), rngs[j] if j < len(rngs) else None)


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested dicts, lists and tensors (tensors compared by value, dtype and shape)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and a.device == b.device
                and torch.equal(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b

