"""Learning-rate schedulers the paper's recipes need and torch does not provide."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

__all__ = ["DivideOnPlateau"]


class DivideOnPlateau(ReduceLROnPlateau):
    """Divide the learning rate by a different factor at each plateau, then stop decaying.

    The paper's ImageNet runs divide the learning rate "by 5 then by 2 when the training loss stalls";
    ``torch.optim.lr_scheduler.ReduceLROnPlateau`` can only apply one factor every time. This subclass keeps
    its plateau detection (``patience``, ``threshold``, ``cooldown``, ``min_lr``) and applies ``divisors`` in
    order, one per detected plateau; once they are used up it leaves the learning rate alone. Because it is a
    ``ReduceLROnPlateau``, Lightning steps it with the monitored metric, and its ``state_dict`` (which holds the
    number of reductions done so far) round-trips through checkpoints.

    Args:
        optimizer: The optimizer whose learning rates to divide.
        divisors: One divisor per plateau, each > 1, applied in order.
        mode: ``"min"`` for a loss, ``"max"`` for an accuracy.
        patience: Epochs (scheduler steps) without improvement before a plateau is declared.
        threshold: Minimum change that counts as an improvement (see ``threshold_mode``).
        threshold_mode: ``"rel"`` or ``"abs"``, as in ``ReduceLROnPlateau``.
        cooldown: Steps to wait after a division before counting bad epochs again.
        min_lr: Lower bound on every learning rate.
        eps: Divisions smaller than this are skipped.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        divisors: Sequence[float] = (5.0, 2.0),
        mode: Literal["min", "max"] = "min",
        patience: int = 2,
        threshold: float = 1e-3,
        threshold_mode: Literal["rel", "abs"] = "rel",
        cooldown: int = 0,
        min_lr: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        divisors = [float(d) for d in divisors]
        if not divisors or any(d <= 1.0 for d in divisors):
            raise ValueError(f"divisors must be a non-empty list of numbers > 1, got {divisors}")
        self.divisors = divisors
        self.num_divisions = 0
        super().__init__(
            optimizer,
            mode=mode,
            factor=1.0 / divisors[0],
            patience=patience,
            threshold=threshold,
            threshold_mode=threshold_mode,
            cooldown=cooldown,
            min_lr=min_lr,
            eps=eps,
        )

    def _reduce_lr(self, epoch: int | None) -> None:
        if self.num_divisions >= len(self.divisors):
            return
        self.factor = 1.0 / self.divisors[self.num_divisions]
        super()._reduce_lr(epoch)
        self.num_divisions += 1
