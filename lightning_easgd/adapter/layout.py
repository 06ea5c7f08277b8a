"""The worker layout and the start of the exchange, shared by the Trainer and the Fabric strategies.

Both adapters are a ``DDPStrategy`` of their framework (Lightning's or Fabric's) with the same EASGD options; what
differs is only when they set the exchange up (the Trainer's ``setup``, Fabric's ``setup_module``) and how a step is
framed. Keeping which worker a rank belongs to, and the checks, warnings and construction of the exchange, in one
mixin keeps the two from drifting apart: this module imports nothing from ``lightning.pytorch``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_easgd.adapter.module_state import elastic_tensors
from lightning_easgd.adapter.options import ExchangeOptions, refuse_unused_worker_ddp_options
from lightning_easgd.core import ElasticAverager, resolve_alpha
from lightning_easgd.core.buckets import check_device
from lightning_easgd.core.center_momentum import check_center_momentum
from lightning_easgd.core.family import WorkerPull, check_reset_beta
from lightning_easgd.core.topology import WorkerTopology, worker_topology
from lightning_easgd.core.worker import ElasticWorker, NonFinitePolicy

log = logging.getLogger(__name__)

W = TypeVar("W", bound=ElasticWorker)


class WorkerLayout:
    """Mixin for an EASGD strategy: where this rank sits among the workers, and the exchange built on that.

    The class that mixes it in is a ``DDPStrategy`` (``world_size``, ``global_rank``, ``num_processes``,
    ``root_device``, ``_timeout``) and calls :meth:`_keep_options` in its constructor.
    """

    _options: ExchangeOptions
    _worker_ddp_kwargs: dict[str, Any]  # for the DDP inside a worker group
    _topology: WorkerTopology | None  # set by _start_exchange
    _followers: tuple[str, ...]  # float buffers that follow the worker's first rank (set by _start_exchange)
    _state_keys: dict[str, int]  # state_dict key -> index of the averaged tensor it names
    _averager: ElasticWorker | None

    if TYPE_CHECKING:
        _timeout: timedelta | None

        @property
        def world_size(self) -> int: ...

        @property
        def global_rank(self) -> int: ...

        @property
        def num_processes(self) -> int: ...

        @property
        def root_device(self) -> torch.device: ...

    def _keep_options(self, options: ExchangeOptions) -> None:
        """Keep the validated options, and expose them as the strategy's public attributes."""
        self._options = options
        self.tau, self.warmup_steps, self.warmup_tau = options.tau, options.warmup_steps, options.warmup_tau
        self.center_momentum, self.center_nesterov = options.center_momentum, options.center_nesterov
        self.beta = options.beta
        self.center_device, self.exchange_dtype = options.center_device, options.exchange_dtype
        self.overlap = options.overlap
        self.bucket_cap_mb = options.bucket_cap_mb
        self.save_worker_states = options.save_worker_states
        self.on_nonfinite: NonFinitePolicy = options.on_nonfinite
        self.worker_pull: WorkerPull = options.worker_pull
        self.sync_steps, self.sync_epochs = options.sync_steps, options.sync_epochs
        self._topology = None
        self._followers = ()
        self._state_keys = {}

    # ------------------------------------------------------------------ the layout

    @property
    def ranks_per_worker(self) -> int | str:
        """k, the ranks of one worker: an int after setup (``"node"`` resolves to the processes per node)."""
        return self._topology.ranks_per_worker if self._topology is not None else self._options.ranks_per_worker

    @property
    def num_workers(self) -> int:
        """p, the number of EASGD workers (world size / ranks per worker)."""
        if self._topology is not None:
            return self._topology.num_workers
        return self.world_size // self._resolve_ranks_per_worker()

    @property
    def worker_index(self) -> int:
        """g, this rank's worker (global rank // ranks per worker)."""
        return self.global_rank // self._resolve_ranks_per_worker()

    @property
    def rank_in_worker(self) -> int:
        """j, this rank's place in its worker (global rank % ranks per worker); it owns slice j of the center."""
        return self.global_rank % self._resolve_ranks_per_worker()

    @property
    def worker_group(self) -> dist.ProcessGroup | None:
        """The process group of this rank's worker after setup (None with one rank per worker)."""
        return self._topology.worker_group if self._topology is not None else None

    def _resolve_ranks_per_worker(self) -> int:
        k = self._options.ranks_per_worker
        return self.num_processes if k == "node" else int(k)

    @property
    def state_keys(self) -> Mapping[str, int]:
        """For every ``state_dict`` key that names an averaged tensor, that tensor's index in the exchange (after
        setup; what a checkpoint needs to put the center's values under the module's keys)."""
        return self._state_keys

    @property
    def alpha(self) -> float | None:
        """The moving rate in use (resolved from β and the world size at setup when not given)."""
        return self._averager.alpha if self._averager is not None else self._options.alpha

    # ------------------------------------------------------------------ the exchange

    def _start_exchange(self, module: Module, name: str, create: Callable[[list[tuple[str, Tensor]], float], W]) -> W:
        """Check the module, build the worker groups (collective), warn about what deserves it, and return the
        exchange that ``create`` builds over the module's elastic tensors (which then hold rank 0's values).

        Args:
            module: the model whose parameters and floating-point buffers the exchange averages.
            name: the strategy's name in the single-worker warning.
            create: builds the exchange from the elastic tensors and the resolved α (``self._topology`` and
                ``self._followers`` are set by then); the Trainer's is its overridable ``_create_averager``.
        """
        options = self._options
        check_device([*module.named_parameters(), *module.named_buffers()], self.root_device)
        topology = worker_topology(self._resolve_ranks_per_worker(), self.world_size, self.global_rank,
                                   timeout=self._timeout)
        refuse_unused_worker_ddp_options(self._worker_ddp_kwargs, options.ranks_per_worker,
                                         grouped=topology.worker_group is not None)
        self._topology = topology
        p = topology.num_workers
        if p < 2:
            rank_zero_warn(
                f"{name} is running with a single worker: EASGD needs at least 2 workers to average; the elastic "
                "pull still runs, without any communication between workers."
            )
        if dist.is_initialized() and dist.get_backend() == "nccl" and os.environ.get(
            "TORCH_NCCL_ASYNC_ERROR_HANDLING", "3"
        ) == "0":
            rank_zero_warn(
                "EASGD: TORCH_NCCL_ASYNC_ERROR_HANDLING=0 disables NCCL's handling of collective timeouts: a dead or "
                "stalled peer then hangs the exchange instead of ending the run after `timeout`; unset it."
            )
        if options.worker_pull == "reset" and options.alpha is None and options.beta >= p:
            raise ValueError(
                f"worker_pull='reset' with beta={options.beta:g} and {p} worker(s) gives alpha = beta/p = "
                f"{options.beta / p:g}, outside the moving rate's range (0, 1): a single worker has no one to average "
                "with; train with at least 2 workers, or pass beta < 1"
            )
        alpha, warning = resolve_alpha(options.alpha, options.beta, p)
        if options.worker_pull == "reset":  # beta is the outer learning rate: its own bound, no overshoot warning
            check_reset_beta(p * alpha, options.center_momentum, options.center_nesterov)
            warning = None
        elif options.center_momentum:  # momentum moves the overshoot threshold (and the divergence bound)
            warning = check_center_momentum(p * alpha, options.center_momentum, options.center_nesterov)
        if warning:
            rank_zero_warn(warning)
        elastic, self._state_keys = elastic_tensors(module, options.bucket_cap_mb)  # collective: rank 0's values
        buffers = {id(t) for _, t in module.named_buffers()}
        self._followers = tuple(key for key, t in elastic if id(t) in buffers)
        averager = create(elastic, alpha)
        log.debug(
            "EASGD: %d workers of %d ranks, tau=%d, alpha=%g, %d tensors of %d bytes in %d buckets",
            p, topology.ranks_per_worker, options.tau, alpha, len(elastic), averager.layout.nbytes,
            len(averager.layout.buckets),
        )
        return averager

    def _elastic_averager(self, elastic: list[tuple[str, Tensor]], alpha: float) -> ElasticAverager:
        """The synchronous exchange over ``elastic`` with every option; with worker groups the float buffers follow
        the worker's first rank, as DDP broadcasts them."""
        options, topology = self._options, self._topology
        assert topology is not None
        return ElasticAverager(elastic, tau=options.tau, alpha=alpha, group=topology.column_group,
                               bucket_cap_mb=options.bucket_cap_mb, overlap=options.overlap,
                               on_nonfinite=options.on_nonfinite, timeout=self._timeout,
                               worker_group=topology.worker_group, center_device=options.center_device,
                               exchange_dtype=options.exchange_dtype, center_momentum=options.center_momentum,
                               center_nesterov=options.center_nesterov, warmup_steps=options.warmup_steps,
                               warmup_tau=options.warmup_tau, worker_pull=options.worker_pull,
                               sync_steps=options.sync_steps,
                               follow_first_rank=self._followers if topology.worker_group is not None else ())

    def _apply_resets(self, optimizers: Iterable[Optimizer]) -> None:
        """After a step: name the workers the divergence guard (``on_nonfinite="reset"``) restarted from the center,
        and empty the optimizers' state on their ranks (momentum belongs to the diverged trajectory)."""
        assert self._averager is not None
        for step, workers in self._averager.pop_resets():
            rank_zero_warn(
                f"EASGD: worker(s) {', '.join(map(str, workers))} had non-finite weights at optimizer step {step}; "
                "their contribution was dropped and they were reset to the center with empty optimizer state."
            )
            if self.worker_index in workers:
                for opt in optimizers:
                    opt.state.clear()
