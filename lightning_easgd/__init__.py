"""Elastic Averaging SGD (Zhang, Choromanska & LeCun, NIPS 2015) for PyTorch Lightning.

Importing the package registers the strategy names ``easgd`` (popen launcher), ``easgd_spawn`` and ``easgd_fork``,
and for asynchronous EASGD ``easgd_async``, ``easgd_async_spawn`` and ``easgd_async_fork``, with Lightning's
strategy registry, so ``Trainer(strategy="easgd")`` works after ``import lightning_easgd``. Fabric has a registry of
its own: ``easgd``, ``easgd_spawn`` and ``easgd_fork`` there give :class:`EASGDFabricStrategy`, so
``Fabric(strategy="easgd")`` works too.
"""

from lightning.fabric.strategies import STRATEGY_REGISTRY as FABRIC_STRATEGY_REGISTRY
from lightning.pytorch.strategies import StrategyRegistry

from lightning_easgd.core import ElasticAverager, ExchangeStats
from lightning_easgd.core.async_averager import AsyncElasticAverager
from lightning_easgd.fabric import EASGDFabricStrategy
from lightning_easgd.trainer import AsyncEASGDStrategy, EASGDStrategy, ElasticDistanceMonitor

__version__ = "0.1.0"

EASGDStrategy.register_strategies(StrategyRegistry)
AsyncEASGDStrategy.register_strategies(StrategyRegistry)
EASGDFabricStrategy.register_strategies(FABRIC_STRATEGY_REGISTRY)

__all__ = [
    "AsyncEASGDStrategy",
    "AsyncElasticAverager",
    "EASGDFabricStrategy",
    "EASGDStrategy",
    "ElasticAverager",
    "ElasticDistanceMonitor",
    "ExchangeStats",
    "__version__",
]
