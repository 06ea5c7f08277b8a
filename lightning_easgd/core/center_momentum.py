"""Momentum on the center's updates (beyond the paper), and the range of (β, μ) in which it is stable.

With s = α·Σ_i (x_i − x̃), the plain EASGD increment of the center at an exchange, the center keeps a velocity v:

    heavy ball:  v ← μ·v + s;   x̃ ← x̃ + v
    Nesterov:    v ← μ·v + s;   x̃ ← x̃ + μ·v + s

The workers' pull x_i −= α·d_i is unchanged. This is the outer momentum of synchronous model averaging in Crossbow
(VLDB 2019) and of SlowMo (ICLR 2020); DiLoCo's outer optimizer is the Nesterov form. Every rank applies it to the
same all-reduced sum, so v stays identical on every rank, like the center.

Stability (docs/center_momentum.md derives it): with the workers held at a fixed mean x̄ and β = p·α, the error
e = x̃ − x̄ and v follow a linear 2×2 iteration whose characteristic polynomial is λ² − T·λ + D with

    heavy ball:  T = 1 + μ − β,          D = μ
    Nesterov:    T = (1 + μ)·(1 − β),    D = μ·(1 − β)

By the Jury criterion both roots lie inside the unit circle iff 0 < β < 2·(1 + μ) (heavy ball) and
0 < β < 2·(1 + μ)/(1 + 2μ) (Nesterov), for 0 ≤ μ < 1. The center *overshoots* when T < 0: the dominant eigenvalue
has a negative real part, so the error changes sign more often than every second exchange (a sawtooth around the
mean). At μ = 0 that is β > 1, the paper's overshoot. Complex roots with T ≥ 0 are the ordinary ringing of any
momentum method (for β > (1 − √μ)²) and are not warned about: it is why momentum is used at all.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor


def validate_center_momentum(momentum: object) -> float:
    """Return ``momentum`` as a float, or raise unless it lies in [0, 1)."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not math.isfinite(momentum):
        raise ValueError(f"center_momentum={momentum!r} is invalid: it must be a real number in [0, 1)")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"center_momentum={momentum!r} is invalid: it must lie in [0, 1) (0 = the paper's rule)")
    return float(momentum)


def validate_center_nesterov(nesterov: object) -> bool:
    """Return ``nesterov``, or raise unless it is True or False."""
    if not isinstance(nesterov, bool):
        raise ValueError(f"center_nesterov={nesterov!r} is invalid: it must be True or False")
    return nesterov


def center_iteration(beta: float, momentum: float, nesterov: bool) -> tuple[float, float]:
    """Trace T and determinant D of the center's 2×2 iteration toward a fixed workers' mean (see the module doc)."""
    if nesterov:
        return (1.0 + momentum) * (1.0 - beta), momentum * (1.0 - beta)
    return 1.0 + momentum - beta, momentum


def center_momentum_bound(momentum: float, nesterov: bool) -> float:
    """The largest β = p·α (exclusive) for which the center's iteration is stable with momentum ``momentum``."""
    return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum) if nesterov else 2.0 * (1.0 + momentum)


def check_center_momentum(beta: float, momentum: float, nesterov: bool) -> str | None:
    """Refuse a (β, μ) for which the center diverges; return a warning when it overshoots, else None.

    Raises:
        ValueError: if β ≥ the bound of :func:`center_momentum_bound`, naming β, μ and the bound.
    """
    form = "Nesterov" if nesterov else "heavy-ball"
    bound = center_momentum_bound(momentum, nesterov)
    formula = "2*(1 + mu)/(1 + 2*mu)" if nesterov else "2*(1 + mu)"
    if not 0.0 < beta < bound:
        raise ValueError(
            f"beta = p*alpha = {beta:g} with center_momentum={momentum:g} ({form}) is unstable: the center diverges "
            f"unless 0 < beta < {formula} = {bound:g}; lower alpha (or beta) or center_momentum"
        )
    trace, _ = center_iteration(beta, momentum, nesterov)
    if trace < 0.0:
        limit = "1" if nesterov else f"1 + mu = {1.0 + momentum:g}"
        return (
            f"EASGD: beta = p*alpha = {beta:g} with center_momentum={momentum:g} ({form}) exceeds {limit}: the center "
            "overshoots the workers' mean at nearly every exchange (it changes sides more often than every second "
            "exchange); the paper uses beta = 0.9"
        )
    return None


class CenterMomentum:
    """The center's velocity v, one flat buffer per flat buffer of the center, and the update that uses it.

    It only needs the center's flat tensors, not the whole layout, so it serves a center held in slices as well.
    Memory: one more copy of the center (the same dtype and device).

    Args:
        center: the center's flat buffers, which :meth:`apply` updates in place.
        momentum: μ in [0, 1) (validated once, by :class:`~lightning_easgd.core.config.ExchangeConfig`).
        nesterov: use the Nesterov form instead of heavy ball.
    """

    def __init__(self, center: Sequence[Tensor], momentum: float, nesterov: bool = False) -> None:
        self.momentum = momentum
        self.nesterov = nesterov
        self.velocity: list[Tensor] = [torch.zeros_like(flat) for flat in center]

    def apply(self, center: Sequence[Tensor], sums: Sequence[Tensor], alpha: float) -> None:
        """``v ← μ·v + α·sums`` and the center's update, in place; ``sums`` (Σ_i d_i) is left untouched."""
        center, sums = list(center), list(sums)
        with torch.no_grad():
            torch._foreach_mul_(self.velocity, self.momentum)
            torch._foreach_add_(self.velocity, sums, alpha=alpha)
            if self.nesterov:
                torch._foreach_add_(center, self.velocity, alpha=self.momentum)
                torch._foreach_add_(center, sums, alpha=alpha)
            else:
                torch._foreach_add_(center, self.velocity)

    def reset(self) -> None:
        """v ← 0 (a fresh run, or a checkpoint written without center momentum)."""
        with torch.no_grad():
            torch._foreach_zero_(self.velocity)

    def state_dict(self) -> dict[str, object]:
        """μ, the form, and the velocity's flat buffers (cloned)."""
        return {"momentum": self.momentum, "nesterov": self.nesterov,
                "velocity": [v.detach().clone() for v in self.velocity]}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Restore the velocity from :meth:`state_dict`'s output; μ and the form stay as constructed (a resumed run
        may change them, the velocity is a property of the trajectory)."""
        velocity = state["velocity"]
        if not isinstance(velocity, Sequence) or len(velocity) != len(self.velocity):
            got = len(velocity) if isinstance(velocity, Sequence) else type(velocity).__name__
            raise ValueError(f"center velocity state has {got} buffers, expected {len(self.velocity)}")
        for i, (mine, value) in enumerate(zip(self.velocity, velocity)):
            if not isinstance(value, Tensor) or value.shape != mine.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"center velocity state: buffer {i} has shape {shape}, expected {tuple(mine.shape)}")
        with torch.no_grad():
            torch._foreach_copy_(self.velocity, list(velocity))


def make_center_momentum(center: Sequence[Tensor], momentum: float, nesterov: bool) -> CenterMomentum | None:
    """A :class:`CenterMomentum` for ``center``, or None for μ = 0, which keeps the paper's update untouched (not
    a momentum update with μ = 0, whose rounding differs). The arguments come from a validated
    :class:`~lightning_easgd.core.config.ExchangeConfig`."""
    return CenterMomentum(center, momentum, nesterov) if momentum > 0.0 else None
