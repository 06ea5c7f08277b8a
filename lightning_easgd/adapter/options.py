"""The options only an adapter has: how it launches, its worker layout, its checkpoint files, the DDP inside a worker.

The exchange's own options (τ, α, β, overlap, ...) are the core's :class:`~lightning_easgd.core.config.ExchangeConfig`,
validated there once; this module checks the rest, shared by the Trainer and Fabric strategies so that both refuse a
bad value with the same message, and an option an adapter does not implement is refused rather than ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from torch.nn.parallel import DistributedDataParallel

from lightning_easgd.core.topology import validate_ranks_per_worker

START_METHODS = ("popen", "spawn", "fork", "forkserver")

_NO_GRADIENT_ALL_REDUCE = "DDP communication hooks act on the gradient all-reduce, which EASGD does not do"
_DDP_COMM_OPTIONS = {
    "ddp_comm_state": _NO_GRADIENT_ALL_REDUCE,
    "ddp_comm_hook": _NO_GRADIENT_ALL_REDUCE,
    "ddp_comm_wrapper": _NO_GRADIENT_ALL_REDUCE,
    "model_averaging_period": "EASGD replaces periodic model averaging; set tau (and alpha or beta) instead",
}
_DDP_WRAPPER_OPTIONS = frozenset(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module"}
WORKER_DDP_OPTIONS = frozenset({"find_unused_parameters", "gradient_as_bucket_view", "static_graph"})
"""DistributedDataParallel options that still mean something for the DDP inside a worker group (the others set what
the strategy decides: the process group, devices, buffer broadcasting, or clash with the exchange's bucket_cap_mb)."""


@dataclass(frozen=True)
class AdapterOptions:
    """The adapter-level options, checked; build them with :meth:`validated`.

    Attributes:
        ranks_per_worker: k, or ``"node"``, resolved once into the strategy's
            :class:`~lightning_easgd.core.topology.WorkerTopology` when the processes are known.
        save_worker_states: whether checkpoints carry every worker's own state.
        start_method: how the launcher starts the processes.
    """

    ranks_per_worker: int | str
    save_worker_states: bool
    start_method: str

    @classmethod
    def validated(
        cls,
        *,
        owner: str,
        ranks_per_worker: object,
        save_worker_states: object,
        start_method: object,
        unsupported: Mapping[str, tuple[Any, str]],
        given: Mapping[str, Any],
    ) -> AdapterOptions:
        """Check the adapter's options, and refuse those this adapter does not implement.

        Args:
            owner: the adapter's class name, for the messages.
            unsupported: option name -> (the only value this adapter accepts, why), declared by the adapter's class.
            given: the values of the adapter's options as the user gave them (for ``unsupported``).

        Raises:
            ValueError: naming the first invalid option, the value given and what is allowed.
        """
        for name, (default, reason) in unsupported.items():
            if given[name] != default:
                raise ValueError(f"{owner} does not support {name}={given[name]!r}: {reason}")
        ranks = validate_ranks_per_worker(ranks_per_worker)
        if not isinstance(save_worker_states, bool):
            raise ValueError(f"save_worker_states={save_worker_states!r} is invalid: it must be True or False")
        if start_method not in START_METHODS:
            raise ValueError(f"start_method={start_method!r} is invalid: choose one of {', '.join(START_METHODS)}")
        return cls(ranks_per_worker=ranks, save_worker_states=save_worker_states, start_method=start_method)


def worker_ddp_options(kwargs: Mapping[str, Any], owner: str, grouped: bool) -> dict[str, Any]:
    """The DistributedDataParallel options for the DDP inside a worker group; refuse every other DDP option.

    Args:
        kwargs: the keyword arguments the adapter did not name (a ``DDPStrategy`` would accept them).
        owner: the adapter's class name, for the messages.
        grouped: whether ``ranks_per_worker`` asks for worker groups (not 1).

    Raises:
        ValueError: for DDP communication hooks, ``model_averaging_period`` and DistributedDataParallel's own
            arguments other than those the DDP inside a worker group takes.
        TypeError: for any other unknown keyword argument.
    """
    accepted: dict[str, Any] = {}
    for name in kwargs:
        if name in _DDP_COMM_OPTIONS:
            raise ValueError(f"{owner} does not accept {name}={kwargs[name]!r}: {_DDP_COMM_OPTIONS[name]}.")
        if name in _DDP_WRAPPER_OPTIONS:
            if grouped and name in WORKER_DDP_OPTIONS:
                accepted[name] = kwargs[name]
                continue
            if not grouped:
                why = ("and with one rank per worker EASGD never wraps the model in DistributedDataParallel (workers "
                       "train independently between exchanges); with ranks_per_worker > 1, "
                       f"{', '.join(sorted(WORKER_DDP_OPTIONS))} configure the DDP inside each worker.")
            else:
                why = ("and inside a worker group the strategy sets it itself; only "
                       f"{', '.join(sorted(WORKER_DDP_OPTIONS))} can be passed to the DDP inside each worker.")
            raise ValueError(
                f"{owner} does not accept {name}={kwargs[name]!r}: it is an option of DistributedDataParallel, {why}"
            )
    unknown = set(kwargs) - set(accepted)
    if unknown:
        raise TypeError(f"{owner} got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return accepted


def refuse_unused_worker_ddp_options(ddp_kwargs: Mapping[str, Any], ranks_per_worker: int | str, grouped: bool
                                     ) -> None:
    """Refuse DDP options (accepted for worker groups) when the resolved topology has one rank per worker
    (``ranks_per_worker="node"`` with one process per node), rather than ignore them.

    Raises:
        ValueError: naming the options and ``ranks_per_worker``.
    """
    if ddp_kwargs and not grouped:
        raise ValueError(
            f"{', '.join(f'{k}={v!r}' for k, v in ddp_kwargs.items())} configure the DDP inside a "
            f"worker group, but ranks_per_worker={ranks_per_worker!r} gives one rank per worker here, and "
            "such a worker is not wrapped in DistributedDataParallel; remove them"
        )


def register_start_methods(registry: _StrategyRegistry, strategy: type, name: str, description: str) -> None:
    """Register ``name`` (popen), ``name_spawn`` and, where the platform forks, ``name_fork`` for ``strategy``.

    A registry name cannot carry arguments, so each launcher gets a name of its own; Lightning's and Fabric's
    registries take the same call.
    """
    entries = [(name, "popen"), (f"{name}_spawn", "spawn")]
    if "fork" in torch.multiprocessing.get_all_start_methods():
        entries.append((f"{name}_fork", "fork"))
    for entry, start_method in entries:
        registry.register(entry, strategy, description=f"{description} with start_method '{start_method}'",
                          start_method=start_method)
