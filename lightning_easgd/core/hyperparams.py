"""Validation of EASGD's hyperparameters and the choice of the moving rate α.

The paper (Zhang, Choromanska & LeCun, NIPS 2015, arXiv:1412.6651) parameterises the elastic force by the
moving rate α = ηρ and uses β = p·α (p workers) to describe how strongly the center moves toward the workers'
average. Its stability analysis (§4 and the supplement) needs 0 < α < 1 and, for the synchronous rule to be a
contraction toward the average, β ≤ 1; β ≥ 2 diverges even on a quadratic, 1 < β < 2 overshoots.
"""

from __future__ import annotations

import math
import numbers

DEFAULT_BETA = 0.9
"""β used in every experiment of the paper."""


def validate_tau(tau: object) -> int:
    """Return ``tau`` as an int, or raise if it is not a whole number of optimizer steps ≥ 1."""
    if isinstance(tau, bool) or not isinstance(tau, numbers.Integral) or tau < 1:
        raise ValueError(f"tau={tau!r} is invalid: the communication period must be an integer >= 1 (optimizer steps)")
    return int(tau)


def validate_alpha(alpha: object) -> float:
    """Return ``alpha`` as a float, or raise unless it lies in the open interval (0, 1)."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha!r} is invalid: the moving rate must be a real number in (0, 1)")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha!r} is invalid: the moving rate must lie in (0, 1)")
    return float(alpha)


def validate_beta(beta: object) -> float:
    """Return ``beta`` as a float, or raise unless it lies in (0, 2), the range the stability analysis allows."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta):
        raise ValueError(f"beta={beta!r} is invalid: beta = p*alpha must be a real number in (0, 2)")
    if not 0.0 < beta < 2.0:
        raise ValueError(
            f"beta={beta!r} is invalid: beta = p*alpha must lie in (0, 2); the paper uses 0.9 and the synchronous "
            "rule diverges for beta >= 2"
        )
    return float(beta)


def resolve_alpha(alpha: float | None, beta: float, world_size: int) -> tuple[float, str | None]:
    """Choose the moving rate for ``world_size`` workers and check the resulting β = p·α.

    When ``alpha`` is None we follow the paper's synchronous convention α = β/p, so that the center moves a
    fraction β of the way toward the workers' mean at each exchange whatever the number of workers. (The
    paper's asynchronous footnote uses α = β/(τ·p) instead; pass ``alpha`` explicitly to get that.)

    Returns:
        The moving rate and, when β = p·α lies in (1, 2), a warning to show the user (the center overshoots the
        workers' mean, which the paper's analysis allows but does not recommend).

    Raises:
        ValueError: if ``world_size`` < 1, α is outside (0, 1), or β = p·α ≥ 2.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size!r} is invalid: EASGD needs at least one worker")
    if alpha is None:
        alpha = validate_beta(beta) / world_size
    alpha = validate_alpha(alpha)
    effective_beta = world_size * alpha
    if effective_beta >= 2.0:
        raise ValueError(
            f"alpha={alpha!r} is invalid for {world_size} workers: beta = p*alpha = {effective_beta:g} >= 2, which "
            f"the paper's stability analysis rules out; use alpha < {2.0 / world_size:g} (alpha = 0.9/p is the "
            "paper's choice)"
        )
    if effective_beta > 1.0:
        return alpha, (
            f"EASGD: beta = p*alpha = {effective_beta:g} > 1 with {world_size} workers and alpha={alpha:g}: the center "
            "overshoots the workers' average at each exchange; the paper uses beta = 0.9"
        )
    return alpha, None
