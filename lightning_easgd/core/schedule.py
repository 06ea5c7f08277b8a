"""When a worker exchanges with the center: every τ optimizer steps, optionally more often during a warm-up.

Early in training the workers move fast and apart; exchanging often then keeps them near the center, and the
rarer exchanges later save the communication (post-local SGD, Lin et al., ICLR 2020, is the extreme case: fully
synchronous first). The schedule is a pure function of the worker's clock t (its optimizer steps so far), which
Lightning restores on resume as ``global_step``: a resumed run exchanges at exactly the steps an uninterrupted one
does, and every rank agrees on them without communicating.
"""

from __future__ import annotations

import numbers

from lightning_easgd.core.family import check_sync_start, validate_steps
from lightning_easgd.core.hyperparams import validate_tau


class ExchangeSchedule:
    """Which optimizer steps start with an exchange.

    Step t (t > 0) starts with an exchange when t is a multiple of ``warmup_tau`` while t < ``warmup_steps``, and
    when t is a multiple of ``tau`` from step ``warmup_steps`` on: after the warm-up the exchanges fall on the same
    steps as without one. ``warmup_steps=0`` (the default) is the paper's fixed period τ.

    With a synchronous start of N = ``sync_steps`` steps (post-local SGD), steps t < N average gradients instead
    (:meth:`synchronous`) and step t starts with an exchange when t > N and (t − N) % τ == 0. It cannot be combined
    with a warm-up (:func:`~lightning_easgd.core.family.check_sync_start` says why).

    Args:
        tau: the communication period after the warm-up, in optimizer steps.
        warmup_steps: how many optimizer steps the warm-up lasts (0: none).
        warmup_tau: the communication period during the warm-up, between 1 and ``tau``.
        sync_steps: how many optimizer steps the synchronous start lasts (0: none).

    Raises:
        ValueError: naming the parameter, for a period < 1, a negative or non-integer warm-up length, or a warm-up
            period longer than ``tau`` (the warm-up exists to exchange more often, not less).
    """

    def __init__(self, tau: int, warmup_steps: int = 0, warmup_tau: int = 1, sync_steps: int = 0) -> None:
        self.tau = validate_tau(tau)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or warmup_steps < 0:
            raise ValueError(
                f"warmup_steps={warmup_steps!r} is invalid: it must be an integer >= 0 (optimizer steps; 0 = no "
                "warm-up)"
            )
        if isinstance(warmup_tau, bool) or not isinstance(warmup_tau, numbers.Integral) or not (
            1 <= warmup_tau <= self.tau
        ):
            raise ValueError(
                f"warmup_tau={warmup_tau!r} is invalid: the warm-up's communication period must be an integer in "
                f"[1, tau={self.tau}]"
            )
        self.warmup_steps = int(warmup_steps)
        self.warmup_tau = int(warmup_tau)
        self.sync_steps = validate_steps(sync_steps, "sync_steps", "optimizer steps")
        check_sync_start(self.sync_steps, 0, self.warmup_steps)

    def synchronous(self, clock: int) -> bool:
        """Whether optimizer step ``clock`` belongs to the synchronous start (gradients averaged over workers)."""
        return clock < self.sync_steps

    def due(self, clock: int) -> bool:
        """Whether optimizer step ``clock`` (steps taken so far) starts with an exchange."""
        if self.sync_steps:
            return clock > self.sync_steps and (clock - self.sync_steps) % self.tau == 0
        period = self.warmup_tau if clock < self.warmup_steps else self.tau
        return clock > 0 and clock % period == 0

    def exchange_index(self, clock: int) -> int:
        """How many exchanges steps 1 to ``clock`` start with: the exchange at a due step ``clock`` is number
        ``exchange_index(clock)``, counting from 1 (``clock // tau`` without a warm-up)."""
        if self.sync_steps:
            return max(clock - self.sync_steps, 0) // self.tau
        if clock <= 0:
            return 0
        early = min(clock, self.warmup_steps - 1) // self.warmup_tau if self.warmup_steps > 1 else 0
        first_late = max(self.warmup_steps, 1)
        late = clock // self.tau - (first_late - 1) // self.tau if clock >= first_late else 0
        return early + late

    def __repr__(self) -> str:
        sync = f", sync_steps={self.sync_steps}" if self.sync_steps else ""
        return (f"ExchangeSchedule(tau={self.tau}, warmup_steps={self.warmup_steps}, warmup_tau={self.warmup_tau}"
                f"{sync})")
