"""The Lightning Trainer adapter: the strategies, their checkpoint glue, the distance monitor and the guards.

The only layer of the plugin that imports ``lightning.pytorch``.
"""

from lightning_easgd.trainer.async_strategy import AsyncEASGDStrategy
from lightning_easgd.trainer.callbacks import ElasticDistanceMonitor
from lightning_easgd.trainer.strategy import EASGDStrategy

__all__ = ["AsyncEASGDStrategy", "EASGDStrategy", "ElasticDistanceMonitor"]
