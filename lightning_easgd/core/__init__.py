"""The framework-free EASGD core: pure torch and torch.distributed, no Lightning.

Adapters (the Lightning strategies and the Fabric strategy) only decide *when* to call into it: which tensors take part,
when an optimizer step happens, when evaluation starts and ends, and what goes into a checkpoint. What the exchange
does is one :class:`ExchangeConfig`, validated once and handed whole to the averagers.
"""

from lightning_easgd.core.averager import ElasticAverager
from lightning_easgd.core.buckets import FlatLayout, ShardLayout, broadcast_tensors, check_device
from lightning_easgd.core.center_momentum import CenterMomentum
from lightning_easgd.core.config import ExchangeConfig
from lightning_easgd.core.hyperparams import DEFAULT_BETA, resolve_alpha, validate_alpha, validate_beta, validate_tau
from lightning_easgd.core.schedule import ExchangeSchedule
from lightning_easgd.core.topology import WorkerTopology, worker_topology
from lightning_easgd.core.worker import ElasticWorker, ExchangeError, ExchangeStats, NonFiniteWorkerError

__all__ = [
    "DEFAULT_BETA",
    "CenterMomentum",
    "ElasticAverager",
    "ElasticWorker",
    "ExchangeConfig",
    "ExchangeError",
    "ExchangeSchedule",
    "ExchangeStats",
    "FlatLayout",
    "NonFiniteWorkerError",
    "ShardLayout",
    "WorkerTopology",
    "broadcast_tensors",
    "check_device",
    "resolve_alpha",
    "validate_alpha",
    "validate_beta",
    "validate_tau",
    "worker_topology",
]
