"""Validation of the options every synchronous EASGD adapter takes (the Trainer strategy and the Fabric strategy).

Both adapters accept the same parameters with the same meaning; checking them in one place keeps their error
messages identical, and an option an adapter does not implement is refused here rather than silently ignored.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from torch.nn.parallel import DistributedDataParallel

from lightning_easgd.core.hyperparams import validate_alpha, validate_beta, validate_tau
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


@dataclass(frozen=True)
class ExchangeOptions:
    """The EASGD options an adapter takes, checked; build it with :meth:`validated`.

    ``alpha`` stays None when not given: it is resolved from β and the number of workers at setup.
    """

    tau: int
    alpha: float | None
    beta: float
    overlap: bool
    bucket_cap_mb: float
    save_worker_states: bool
    on_nonfinite: NonFinitePolicy
    timeout: timedelta | None

    @classmethod
    def validated(
        cls,
        *,
        tau: object,
        alpha: object,
        beta: object,
        overlap: object,
        bucket_cap_mb: object,
        save_worker_states: object,
        on_nonfinite: object,
        timeout: object,
        start_method: object,
    ) -> ExchangeOptions:
        """Check the options (``start_method`` too, which the launcher uses) and return them normalised.

        Raises:
            ValueError: naming the first invalid option, the value given and what is allowed.
        """
        tau_ = validate_tau(tau)
        alpha_ = None if alpha is None else validate_alpha(alpha)
        beta_ = validate_beta(beta)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap={overlap!r} is invalid: it must be True or False")
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r} is invalid: it must be a number > 0 (megabytes)")
        if not isinstance(save_worker_states, bool):
            raise ValueError(f"save_worker_states={save_worker_states!r} is invalid: it must be True or False")
        if on_nonfinite not in ("raise", "reset"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is invalid: choose 'raise' or 'reset'")
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0):
            raise ValueError(f"timeout={timeout!r} is invalid: it must be a positive datetime.timedelta")
        if start_method not in START_METHODS:
            raise ValueError(f"start_method={start_method!r} is invalid: choose one of {', '.join(START_METHODS)}")
        return cls(tau_, alpha_, beta_, overlap, float(bucket_cap_mb), save_worker_states, on_nonfinite, timeout)


def refuse_ddp_options(kwargs: Mapping[str, Any], owner: str) -> None:
    """Refuse options a ``DDPStrategy`` would accept but that mean nothing without a DistributedDataParallel wrapper.

    Raises:
        ValueError: for DDP communication hooks, ``model_averaging_period`` and DistributedDataParallel's own
            arguments (e.g. ``find_unused_parameters``).
        TypeError: for any other unknown keyword argument.
    """
    for name in kwargs:
        if name in _DDP_COMM_OPTIONS:
            raise ValueError(f"{owner} does not accept {name}={kwargs[name]!r}: {_DDP_COMM_OPTIONS[name]}.")
        if name in _DDP_WRAPPER_OPTIONS:
            raise ValueError(
                f"{owner} does not accept {name}={kwargs[name]!r}: it is an option of DistributedDataParallel, "
                "and EASGD never wraps the model in DistributedDataParallel (workers train independently between "
                "exchanges)."
            )
    if kwargs:
        raise TypeError(f"{owner} got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
