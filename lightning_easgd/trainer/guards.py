"""Lightning features that would silently undo what EASGD is for: refused or warned about, with what to do instead.

- Weight-averaging callbacks (``StochasticWeightAveraging``, ``WeightAveraging`` and its ``EMAWeightAveraging``)
  average *this worker's local* weights. With EASGD the model that counts is the center: validation, checkpoints
  and the module after ``fit`` hold it. The callbacks' average would be overwritten by the center when fit ends,
  and their checkpoint hooks would put an average of one worker's weights where the center belongs. So they are
  refused at setup, with the alternatives.
- ``self.log(..., sync_dist=True)`` of a per-step value during training all-reduces it on every step: a collective
  per step makes every worker wait for the slowest, which EASGD's communication every τ steps exists to avoid.
  It is warned about once per metric, on rank 0.
"""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch import Callback, Trainer
from lightning.pytorch import callbacks as _callbacks
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

WEIGHT_AVERAGING_CALLBACKS: tuple[type[Callback], ...] = tuple(
    getattr(_callbacks, name) for name in ("StochasticWeightAveraging", "WeightAveraging") if hasattr(_callbacks, name)
)
"""Lightning's weight-averaging callbacks (``WeightAveraging``, the base of ``EMAWeightAveraging``, from 2.6 on)."""

def refuse_weight_averaging(callbacks: Iterable[Callback]) -> None:
    """Raise if a weight-averaging callback is attached (see the module docstring for why).

    Raises:
        ValueError: naming the callback and what to use instead.
    """
    for callback in callbacks:
        if isinstance(callback, WEIGHT_AVERAGING_CALLBACKS):
            raise ValueError(
                f"{type(callback).__name__} cannot be used with EASGD: it averages this worker's local weights, "
                "while EASGD's model is the center (validation, checkpoints and the module after fit hold the "
                "center), so its average would be overwritten by the center when fit ends and its checkpoints would "
                "replace the center with an average of one worker. The center is already an elastic moving average "
                "of the workers (lower alpha or beta to smooth it more). To average over time, average the centers "
                "your checkpoints hold after training, e.g. torch.optim.swa_utils.AveragedModel fed each "
                "checkpoint's 'state_dict'. Remove the callback to train with EASGD."
            )


class PerStepSyncGuard:
    """Warns once per metric when a training-time ``self.log`` syncs across ranks on every step."""

    def __init__(self) -> None:
        self._warned: set[str] = set()

    def check(self, trainer: Trainer) -> None:
        """Look at what the running training loop has logged so far (a dict walk; nothing is synchronised)."""
        results = trainer._results
        if results is None or not trainer.training:
            return
        for _, metric in results.valid_items():
            meta = metric.meta
            per_step_sync = metric.is_tensor and meta.on_step and meta.sync.should and not meta.sync.rank_zero_only
            if not per_step_sync or meta.name in self._warned:
                continue
            self._warned.add(meta.name)
            rank_zero_warn(
                f"self.log({meta.name!r}, ..., sync_dist=True) in {meta.fx} all-reduces the value on every training "
                "step: a collective per step makes every worker wait for the slowest, which undoes EASGD's "
                "communication every tau steps. Log it without sync_dist (each rank's own value; rank 0's reaches "
                "the logger), or with on_step=False, on_epoch=True so that it is reduced once per epoch. Validation "
                "runs on the center, where sync_dist=True is fine."
            )
