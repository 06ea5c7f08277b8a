"""ElasticDistanceMonitor: how far the workers wander from the center, logged at every exchange.

The distances ride in the exchange's own all-reduce (each worker fills its slot of a small vector), so every rank
knows every worker's distance and monitoring adds no collective on the steps between exchanges.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_easgd.core import ElasticAverager, ExchangeStats
from lightning_easgd.trainer.strategy import EASGDStrategy

PREFIX = "easgd/"


class ElasticDistanceMonitor(Callback):
    """Log ‖x_i − x̃‖₂ (taken from d_i, before the pull) at each exchange through the Trainer's loggers.

    Distances are per worker: with ``EASGDStrategy(ranks_per_worker=k)`` a worker is k ranks holding the same
    weights, and worker i's distance is assembled from its ranks' slices; ``..._rank{i}`` then names worker i, not
    global rank i (with k = 1 the two coincide).

    Logged under ``easgd/``, with the worker's optimizer-step count t at the exchange as the step:
    ``distance_mean`` and ``distance_max`` over workers, the same relative to ‖x̃‖₂ (``relative_distance_mean``,
    ``relative_distance_max``), and ``center_norm`` (‖x̃‖₂ of the center the differences were taken against).
    ``per_rank`` adds ``distance_rank{i}`` and ``relative_distance_rank{i}`` for every worker i; ``per_layer`` adds
    ``layer/<state_dict key>/distance_mean`` and ``.../distance_max`` for every averaged tensor (and
    ``.../distance_rank{i}`` with ``per_rank``). Scalars an exchange algorithm adds to its statistics (such as
    the asynchronous strategy's center version lag) are logged under ``easgd/`` with their own names. With a
    synchronous start (``sync_steps``/``sync_epochs``), ``bytes_sync`` and ``bytes_exchanges`` are the bytes each rank
    has sent in the synchronous start and in the exchanges up to and including this one (functions of the step, so
    a resumed run logs what an uninterrupted one does); the exchanges are numbered from the hand-over.

    Like :class:`~lightning.pytorch.callbacks.LearningRateMonitor`, it writes straight to the loggers, so no value
    is lost to ``log_every_n_steps``; use ``log_every_n_exchanges`` to thin the output instead. The most recent
    values are kept in :attr:`last_metrics`.

    Args:
        per_layer: also log the distance of every parameter and buffer tensor; the strategy must measure them
            (``EASGDStrategy(per_tensor_distances=True)``), identically on every rank.
        per_rank: also log every worker's own distance (named ``rank{i}`` for worker i).
        log_every_n_exchanges: log the exchanges k = 1, 2, ... (k = t/τ without a warm-up) with k % n == 0.
    """

    def __init__(self, per_layer: bool = False, per_rank: bool = False, log_every_n_exchanges: int = 1) -> None:
        for name, value in (("per_layer", per_layer), ("per_rank", per_rank)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is invalid: it must be True or False")
        if isinstance(log_every_n_exchanges, bool) or not isinstance(log_every_n_exchanges, int) or (
            log_every_n_exchanges < 1
        ):
            raise ValueError(
                f"log_every_n_exchanges={log_every_n_exchanges!r} is invalid: it must be an integer >= 1"
            )
        self.per_layer = per_layer
        self.per_rank = per_rank
        self.log_every_n_exchanges = log_every_n_exchanges
        self.last_metrics: dict[str, float] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy, EASGDStrategy):
            raise ValueError(
                "ElasticDistanceMonitor needs an EASGD strategy (strategy='easgd' or EASGDStrategy(...)); this "
                f"Trainer uses {type(trainer.strategy).__name__}"
            )
        if self.per_layer and not trainer.strategy.config.per_tensor_distances:
            raise ValueError(
                "ElasticDistanceMonitor(per_layer=True) needs the strategy to measure per-tensor distances: pass "
                f"{type(trainer.strategy).__name__}(per_tensor_distances=True) (they enlarge the exchange's "
                "all-reduce, so every rank must agree on them through the strategy, not through a callback)"
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        averager = self._strategy(trainer).averager
        assert averager is not None
        averager.track_distances()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        averager = self._strategy(trainer).averager
        assert averager is not None
        for stats in averager.pop_stats():
            if averager.schedule.exchange_index(stats.step) % self.log_every_n_exchanges:
                continue
            self.last_metrics = self._metrics(stats, averager.names)
            if isinstance(averager, ElasticAverager) and averager.schedule.sync_steps:
                sync, exchanges = averager.bytes_sent(stats.step + 1)
                self.last_metrics.update({PREFIX + "bytes_sync": float(sync),
                                          PREFIX + "bytes_exchanges": float(exchanges)})
            for logger in trainer.loggers:
                logger.log_metrics(self.last_metrics, step=stats.step)

    def _metrics(self, stats: ExchangeStats, names: tuple[str, ...]) -> dict[str, float]:
        distances = stats.distances
        relative = stats.relative_distances
        metrics = {
            "distance_mean": float(distances.mean()),
            "distance_max": float(distances.max()),
            "relative_distance_mean": float(relative.mean()),
            "relative_distance_max": float(relative.max()),
            "center_norm": stats.center_norm,
        }
        if self.per_rank:
            for rank, (d, r) in enumerate(zip(distances.tolist(), relative.tolist())):
                metrics[f"distance_rank{rank}"] = d
                metrics[f"relative_distance_rank{rank}"] = r
        if self.per_layer and stats.layer_distances is not None:
            for j, name in enumerate(names):
                column = stats.layer_distances[:, j]
                metrics[f"layer/{name}/distance_mean"] = float(column.mean())
                metrics[f"layer/{name}/distance_max"] = float(column.max())
                if self.per_rank:
                    for rank, d in enumerate(column.tolist()):
                        metrics[f"layer/{name}/distance_rank{rank}"] = d
        metrics.update(stats.extra)
        return {PREFIX + key: value for key, value in metrics.items()}

    @staticmethod
    def _strategy(trainer: Trainer) -> EASGDStrategy:
        strategy = trainer.strategy
        assert isinstance(strategy, EASGDStrategy)
        return strategy
