"""The exchange's options, validated once: :class:`ExchangeConfig`.

Every entry point (``EASGDStrategy``, ``EASGDFabricStrategy``, ``AsyncEASGDStrategy``, a Hydra ``_target_``, or the
core's averagers used directly) builds one ``ExchangeConfig`` and hands it on whole, so a bad value is refused here,
with one message whichever way it came in, and nothing downstream checks it again.

Adding an option is one field: its default and, in :func:`check`, the function that checks and normalises its value;
the strategies expose every field as an attribute of the same name (``strategy.tau``, ``strategy.beta``, ...).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any, Literal

import torch

from lightning_easgd.core.center_momentum import (
    check_center_momentum,
    validate_center_momentum,
    validate_center_nesterov,
)
from lightning_easgd.core.family import (
    WorkerPull,
    check_reset_beta,
    check_sync_start,
    validate_steps,
    validate_worker_pull,
)
from lightning_easgd.core.hyperparams import DEFAULT_BETA, resolve_alpha, validate_alpha, validate_beta
from lightning_easgd.core.schedule import ExchangeSchedule

NonFinitePolicy = Literal["raise", "reset"]

_EXCHANGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def validate_exchange_dtype(exchange_dtype: object) -> torch.dtype | None:
    """``None``, ``torch.float32`` or ``torch.bfloat16`` (also as the strings "float32"/"bfloat16", for configs)."""
    if exchange_dtype is None:
        return None
    if isinstance(exchange_dtype, str) and exchange_dtype in _EXCHANGE_DTYPES:
        return _EXCHANGE_DTYPES[exchange_dtype]
    if exchange_dtype in _EXCHANGE_DTYPES.values():
        return exchange_dtype  # type: ignore[return-value]
    raise ValueError(
        f"exchange_dtype={exchange_dtype!r} is invalid: choose None (the center's dtype), torch.float32 or "
        "torch.bfloat16 (or the strings 'float32', 'bfloat16')"
    )


def validate_center_device(center_device: object) -> torch.device | None:
    """``None`` (the tensors' device) or the host, as "cpu" or ``torch.device("cpu")``."""
    if center_device is None:
        return None
    if isinstance(center_device, (str, torch.device)) and str(center_device) == "cpu":
        return torch.device("cpu")
    raise ValueError(
        f"center_device={center_device!r} is invalid: choose None (the parameters' device) or 'cpu' (host memory)"
    )


def _optional_alpha(alpha: object) -> float | None:
    return None if alpha is None else validate_alpha(alpha)


def _overlap(overlap: object) -> bool | None:
    if overlap is not None and not isinstance(overlap, bool):
        raise ValueError(f"overlap={overlap!r} is invalid: it must be True, False or None")
    return overlap


def _bucket_cap_mb(bucket_cap_mb: object) -> float | None:
    if bucket_cap_mb is None:
        return None
    if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, numbers.Real) or not (
        math.isfinite(bucket_cap_mb) and bucket_cap_mb > 0
    ):
        raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r} is invalid: it must be a number > 0 (megabytes)")
    return float(bucket_cap_mb)


def _on_nonfinite(on_nonfinite: object) -> NonFinitePolicy:
    if on_nonfinite not in ("raise", "reset"):
        raise ValueError(f"on_nonfinite={on_nonfinite!r} is invalid: choose 'raise' or 'reset'")
    return on_nonfinite  # type: ignore[return-value]


def _timeout(timeout: object) -> timedelta | None:
    if timeout is not None and (not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0):
        raise ValueError(f"timeout={timeout!r} is invalid: it must be a positive datetime.timedelta")
    return timeout


def validate_flag(name: str) -> Callable[[object], bool]:
    """A check that option ``name`` is True or False (not 1, not "yes")."""

    def check(value: object) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name}={value!r} is invalid: it must be True or False")
        return value

    return check


def _sync_epochs(sync_epochs: object) -> int:
    return validate_steps(sync_epochs, "sync_epochs", "epochs")


def _unchecked(value: Any) -> Any:
    return value


def check(function: Callable[[Any], Any]) -> dict[str, Callable[[Any], Any]]:
    """The metadata of an :class:`ExchangeConfig` field: the function that checks and normalises its value (raising
    ``ValueError`` that names the option, the value and what is allowed)."""
    return {"check": function}


@dataclass(frozen=True)
class ExchangeConfig:
    """What the elastic exchange is asked to do, checked and normalised at construction.

    Attributes:
        tau: communication period τ after the warm-up, in optimizer steps.
        warmup_steps, warmup_tau: exchange every ``warmup_tau`` steps while the clock is below ``warmup_steps``.
        alpha: moving rate α in (0, 1); None: α = β/p, resolved with the number of workers (:meth:`moving_rate`).
        beta: β = p·α used when ``alpha`` is None, in (0, 2).
        overlap: run the all-reduce during the local step. None becomes True, or False with
            ``center_device="cpu"`` (which cannot overlap).
        bucket_cap_mb: size of the flat buffers each collective carries (None: a default per device).
        center_device: None (the tensors' device) or ``torch.device("cpu")`` (given as "cpu" too).
        exchange_dtype: the dtype d_i travels in: None (the center's), float32 or bfloat16 (strings accepted).
        center_momentum, center_nesterov: momentum μ in [0, 1) on the center's updates, and its form.
        on_nonfinite: ``"raise"`` or ``"reset"``: what happens to a worker whose weights turned NaN or inf.
        timeout: how long the exchange waits for its collectives (None: the process group's own timeout).
        per_tensor_distances: the exchange also measures every tensor's distance to the center. It changes the size
            of the exchange's all-reduce, so it is part of the configuration, identical on every rank, and not a
            switch a rank could flip alone.
        worker_pull: ``"elastic"`` (the paper's pull x_i −= α·d_i) or ``"reset"`` (workers land on the new center
            plus their own update: local SGD, SlowMo, DiLoCo; :mod:`~lightning_easgd.core.family`).
        sync_steps, sync_epochs: the length of a synchronous start (gradients averaged over all workers), in
            optimizer steps or in epochs (one of them; 0: none; not with a warm-up). ``sync_epochs`` is turned into
            steps by the adapter once an epoch's length is known.
        schedule: the exchange schedule built from ``tau``, ``warmup_steps``, ``warmup_tau`` and ``sync_steps`` (not
            an argument).

    Raises:
        ValueError: naming the first invalid option, the value given and what is allowed.
    """

    tau: int = field(default=10, metadata=check(_unchecked))  # checked with the warm-up by ExchangeSchedule
    warmup_steps: int = field(default=0, metadata=check(_unchecked))
    warmup_tau: int = field(default=1, metadata=check(_unchecked))
    alpha: float | None = field(default=None, metadata=check(_optional_alpha))
    beta: float = field(default=DEFAULT_BETA, metadata=check(validate_beta))
    overlap: bool | None = field(default=None, metadata=check(_overlap))
    bucket_cap_mb: float | None = field(default=None, metadata=check(_bucket_cap_mb))
    center_device: torch.device | None = field(default=None, metadata=check(validate_center_device))
    exchange_dtype: torch.dtype | None = field(default=None, metadata=check(validate_exchange_dtype))
    center_momentum: float = field(default=0.0, metadata=check(validate_center_momentum))
    center_nesterov: bool = field(default=False, metadata=check(validate_center_nesterov))
    on_nonfinite: NonFinitePolicy = field(default="raise", metadata=check(_on_nonfinite))
    timeout: timedelta | None = field(default=None, metadata=check(_timeout))
    per_tensor_distances: bool = field(default=False, metadata=check(validate_flag("per_tensor_distances")))
    worker_pull: WorkerPull = field(default="elastic", metadata=check(validate_worker_pull))
    sync_steps: int = field(default=0, metadata=check(_unchecked))  # checked with the warm-up by ExchangeSchedule
    sync_epochs: int = field(default=0, metadata=check(_sync_epochs))
    schedule: ExchangeSchedule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        schedule = ExchangeSchedule(self.tau, self.warmup_steps, self.warmup_tau, self.sync_steps)
        for f in fields(self):
            if f.init:
                object.__setattr__(self, f.name, f.metadata["check"](getattr(self, f.name)))
        if self.center_nesterov and not self.center_momentum:
            raise ValueError(
                f"center_nesterov=True is invalid with center_momentum={self.center_momentum!r}: the Nesterov form "
                "needs a center momentum in (0, 1); set center_momentum or leave center_nesterov=False"
            )
        check_sync_start(schedule.sync_steps, self.sync_epochs, schedule.warmup_steps)
        object.__setattr__(self, "schedule", schedule)
        for name in ("tau", "warmup_steps", "warmup_tau", "sync_steps"):
            object.__setattr__(self, name, getattr(schedule, name))
        if self.overlap is None:
            object.__setattr__(self, "overlap", self.center_device is None)
        elif self.overlap and self.center_device is not None:
            raise ValueError(
                "overlap=True cannot be combined with center_device='cpu': the host-resident center is streamed "
                "through one device buffer bucket by bucket before the step, so there is nothing to overlap; leave "
                "overlap unset (False with center_device='cpu')"
            )

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The constructor's options, in declaration order (what an adapter forwards and exposes)."""
        return tuple(f.name for f in fields(cls) if f.init)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ExchangeConfig:
        """The config from those entries of ``options`` (e.g. an adapter constructor's ``locals()``) that name an
        option; the others are the caller's."""
        return cls(**{name: options[name] for name in cls.option_names() if name in options})

    def moving_rate(self, num_workers: int) -> float:
        """α for ``num_workers`` workers: ``alpha`` itself, or β/p (the paper's synchronous convention)."""
        return self.alpha if self.alpha is not None else self.beta / num_workers

    def check_moving_rate(self, num_workers: int) -> str | None:
        """Refuse an α that makes β = p·α unstable for ``num_workers`` workers (with center momentum: the center's
        own iteration), and return a warning when the center overshoots the workers' mean, else None.

        With ``worker_pull="reset"`` β is the outer learning rate: α = β/p is only the weight of Σ_i d_i in the center's
        step (not a pull toward it, so not bound to (0, 1); one worker may take β ≥ 1), β must stay below the reset
        rule's bound (:func:`~lightning_easgd.core.family.check_reset_beta`) and β > 1 is a choice, not warned about.

        Raises:
            ValueError: for β = p·α ≥ 2 (without center momentum) or beyond the center momentum's (or the reset
                rule's) bound.
        """
        if self.worker_pull == "reset":
            if num_workers < 1:
                raise ValueError(f"world_size={num_workers!r} is invalid: EASGD needs at least one worker")
            check_reset_beta(num_workers * self.moving_rate(num_workers), self.center_momentum, self.center_nesterov)
            return None
        alpha, warning = resolve_alpha(self.alpha, self.beta, num_workers)
        if self.center_momentum:  # momentum moves the overshoot threshold (and the divergence bound)
            warning = check_center_momentum(num_workers * alpha, self.center_momentum, self.center_nesterov)
        return warning


def config_from(config: ExchangeConfig | None, options: dict[str, Any], owner: str) -> ExchangeConfig:
    """``config``, or one built from keyword ``options`` (the averagers accept either, for direct use of the core).

    Raises:
        TypeError: if both are given, or an option is unknown.
    """
    if config is None:
        unknown = set(options) - set(ExchangeConfig.option_names())
        if unknown:
            raise TypeError(f"{owner} got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        return ExchangeConfig(**options)
    if options:
        raise TypeError(
            f"{owner} takes its options either as one ExchangeConfig or as keyword arguments, not both; got config "
            f"and {', '.join(sorted(options))}"
        )
    return config
