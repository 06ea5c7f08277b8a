"""Validation of the options every synchronous EASGD adapter takes (the Trainer strategies and the Fabric strategy).

The adapters accept the same parameters with the same meaning; checking them in one place keeps their defaults and
error messages identical, and an option an adapter does not implement is refused here rather than silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from lightning_easgd.core.averager import validate_center_device, validate_exchange_dtype
from lightning_easgd.core.center_momentum import validate_center_momentum, validate_center_nesterov
from lightning_easgd.core.family import WorkerPull, validate_sync_start, validate_worker_pull
from lightning_easgd.core.hyperparams import validate_alpha, validate_beta
from lightning_easgd.core.schedule import ExchangeSchedule
from lightning_easgd.core.topology import validate_ranks_per_worker
from lightning_easgd.core.worker import NonFinitePolicy

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
class Unsupported:
    """Options an adapter refuses at any value but their default, and why (e.g. "worker groups ... belong to ...")."""

    defaults: Mapping[str, Any]
    reason: str


@dataclass(frozen=True)
class ExchangeOptions:
    """The EASGD options an adapter takes, checked and normalised; build it with :meth:`validated`.

    ``alpha`` stays None when not given: it is resolved from β and the number of workers at setup. ``bucket_cap_mb``
    None is resolved by the core per device. ``ranks_per_worker`` may be ``"node"``, resolved at setup.
    ``sync_epochs`` is turned into steps by the Trainer strategy once an epoch's length is known.
    """

    tau: int
    warmup_steps: int
    warmup_tau: int
    center_momentum: float
    center_nesterov: bool
    alpha: float | None
    beta: float
    overlap: bool
    bucket_cap_mb: float | None
    ranks_per_worker: int | str
    center_device: torch.device | None
    exchange_dtype: torch.dtype | None
    save_worker_states: bool
    on_nonfinite: NonFinitePolicy
    timeout: timedelta | None
    worker_pull: WorkerPull = "elastic"
    sync_steps: int = 0
    sync_epochs: int = 0

    @classmethod
    def validated(
        cls,
        *,
        owner: str,
        tau: object,
        alpha: object,
        beta: object,
        overlap: object,
        bucket_cap_mb: object,
        save_worker_states: object,
        on_nonfinite: object,
        ranks_per_worker: object,
        center_device: object,
        exchange_dtype: object,
        center_momentum: object,
        center_nesterov: object,
        warmup_steps: object,
        warmup_tau: object,
        timeout: object,
        start_method: object,
        unsupported: Unsupported | None = None,
        worker_pull: object = "elastic",
        sync_steps: object = 0,
        sync_epochs: object = 0,
    ) -> ExchangeOptions:
        """Check the options (``start_method`` too, which the launcher uses) and return them normalised.

        ``overlap=None`` becomes True, or False with ``center_device="cpu"`` (which cannot overlap).

        Args:
            owner: the adapter's class name, for the messages.
            unsupported: options this adapter accepts only at their default.

        Raises:
            ValueError: naming the first invalid option, the value given and what is allowed.
        """
        schedule = ExchangeSchedule(tau, warmup_steps, warmup_tau)  # type: ignore[arg-type]  # validates all three
        momentum = validate_center_momentum(center_momentum)
        nesterov = validate_center_nesterov(center_nesterov)
        pull = validate_worker_pull(worker_pull)
        sync_steps_, sync_epochs_ = validate_sync_start(sync_steps, sync_epochs, schedule.warmup_steps)
        alpha_ = None if alpha is None else validate_alpha(alpha)
        beta_ = validate_beta(beta)
        if overlap is not None and not isinstance(overlap, bool):
            raise ValueError(f"overlap={overlap!r} is invalid: it must be True, False or None")
        if bucket_cap_mb is not None and (
            isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0
        ):
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r} is invalid: it must be a number > 0 (megabytes)")
        if unsupported is not None:
            given = {"ranks_per_worker": ranks_per_worker, "center_device": center_device,
                     "exchange_dtype": exchange_dtype}
            for name, default in unsupported.defaults.items():
                if given[name] != default:
                    raise ValueError(f"{owner} does not support {name}={given[name]!r}: {unsupported.reason}")
        ranks = validate_ranks_per_worker(ranks_per_worker)
        device = validate_center_device(center_device)
        dtype = validate_exchange_dtype(exchange_dtype)
        if overlap is None:
            overlap = device is None
        if overlap and device is not None:
            raise ValueError(
                "overlap=True cannot be combined with center_device='cpu': the host-resident center is streamed "
                "through one device buffer bucket by bucket before the step, so there is nothing to overlap; leave "
                "overlap unset (False with center_device='cpu')"
            )
        if not isinstance(save_worker_states, bool):
            raise ValueError(f"save_worker_states={save_worker_states!r} is invalid: it must be True or False")
        if on_nonfinite not in ("raise", "reset"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is invalid: choose 'raise' or 'reset'")
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0):
            raise ValueError(f"timeout={timeout!r} is invalid: it must be a positive datetime.timedelta")
        if start_method not in START_METHODS:
            raise ValueError(f"start_method={start_method!r} is invalid: choose one of {', '.join(START_METHODS)}")
        return cls(
            tau=schedule.tau, warmup_steps=schedule.warmup_steps, warmup_tau=schedule.warmup_tau,
            center_momentum=momentum, center_nesterov=nesterov, alpha=alpha_, beta=beta_, overlap=overlap,
            bucket_cap_mb=None if bucket_cap_mb is None else float(bucket_cap_mb),  # type: ignore[arg-type]
            ranks_per_worker=ranks, center_device=device, exchange_dtype=dtype,
            save_worker_states=save_worker_states, on_nonfinite=on_nonfinite,  # type: ignore[arg-type]
            timeout=timeout,  # type: ignore[arg-type]
            worker_pull=pull, sync_steps=sync_steps_, sync_epochs=sync_epochs_,
        )


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
