"""AsyncEASGDStrategy: the paper's asynchronous EASGD (Algorithm 1) and EAMSGD (Algorithm 2) for Lightning.

Everything but the exchange is the synchronous strategy's: launchers, evaluation on the center, checkpoints holding
the center, worker states for exact resumption, the distance monitor. The exchange is
:class:`~lightning_easgd.core.async_averager.AsyncElasticAverager`, whose center is sharded across the ranks and
served over ``torch.distributed.rpc``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, ClassVar, Literal

import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_easgd.adapter.options import register_start_methods
from lightning_easgd.core import DEFAULT_BETA
from lightning_easgd.core.async_averager import AsyncElasticAverager, async_stability_warning, validate_order
from lightning_easgd.core.center_service import validate_transport
from lightning_easgd.core.worker import NonFinitePolicy
from lightning_easgd.trainer.strategy import EASGDStrategy

_SYNCHRONOUS_ONLY = ("worker groups, a host-resident center and the exchange dtype belong to the synchronous averager "
                     "of EASGDStrategy")


class AsyncEASGDStrategy(EASGDStrategy):
    """Asynchronous Elastic Averaging SGD (Zhang, Choromanska & LeCun, NIPS 2015, Algorithm 1 and 2).

    Each worker runs its own optimizer; at the start of its own step t with t > 0 and t % tau == 0 it sends its
    parameters x to the center and, with no barrier between workers, the center applies x̃ += α·(x − x̃) while the
    worker applies x_i −= α·(x − x̃); the gradient of that step is taken at x. A slow worker holds nobody back.

    The center is sharded: every rank owns a contiguous 1/p slice of the flattened parameters in host memory and
    serves it over TensorPipe RPC (works across nodes, for CPU and GPU training). Validation, test and predict run
    on a consistent snapshot of the center taken between two barriers (so all ranks evaluate the same x̃, with every
    exchange so far applied); checkpoints hold the center; after ``fit`` the module holds the center. On an
    exception or KeyboardInterrupt in any rank, teardown stops the RPC agent without waiting for other ranks.

    ``torch.optim.SGD`` gives EASGD, ``SGD(momentum=δ, nesterov=True)`` gives EAMSGD; optimizer state is untouched.

    Args:
        tau: communication period τ of each worker, in its optimizer steps.
        alpha: moving rate α in (0, 1). Default: α = β/p (β = 0.9), as in the synchronous strategy and in the
            authors' own asynchronous example, so that switching between the two keeps the elastic force. The
            paper's footnote 8 reads the asynchronous "effective β" per step as β/τ, i.e. α = β/(τ·p) (the default
            of TensorFlow's ElasticAverageOptimizer); pass ``alpha`` to use it.
        beta: β = p·α used when ``alpha`` is None.
        order: ``"free"`` (default): every worker exchanges on its own clock. ``"round_robin"``: the center is
            updated in the fixed worker order 0, 1, ..., p−1, 0, ..., so a run equals a single-process replay of
            Algorithm 1; workers wait for their turn, so this is for testing and debugging.
        overlap: send the exchange before the step's forward/backward and apply the reply after the local update
            (True), or wait for the reply before the step (False). The arithmetic is the same either way.
        timeout: how long any wait on another rank (an exchange, a snapshot barrier, the RPC shutdown, and
            Lightning's own collectives) may last before it fails with an error. Default: 30 minutes.
        on_nonfinite: ``"raise"`` (default): a worker whose weights turn NaN or inf raises
            :class:`~lightning_easgd.core.NonFiniteWorkerError` before sending anything, so the center stays
            finite. ``"reset"``: it skips that exchange and restarts from the current center with empty optimizer
            state (warned on rank 0 when rank 0 is reset).
        rpc_transport: ``"tcp"`` (default): the center's slices travel over TCP on every link, which works
            everywhere and leaves every CPU core to training. ``"fast"``: InfiniBand verbs between hosts and shared
            memory within a host, where TensorPipe finds them usable (TCP for the rest); they busy-poll one CPU core
            per process, so choose it when each rank has a spare core (typical GPU nodes). See docs/async.md.
        bucket_cap_mb: size of the buffers of the initial broadcast of rank 0's weights (exchanges send one
            message per owner).
        warmup_steps, warmup_tau, save_worker_states, accelerator, parallel_devices, cluster_environment,
        checkpoint_io, precision_plugin, process_group_backend, start_method: as for
        :class:`~lightning_easgd.EASGDStrategy` (the warm-up applies to each worker's own clock).

    At setup a warning is given when the learning rate η and α lie outside the paper's round-robin stability region
    0 ≤ η ≤ 2, 0 ≤ α ≤ (4 − 2η)/(4 − η) (a quadratic with normalized curvature; exact only for that case).

    Raises:
        ValueError: for an invalid ``order`` or ``rpc_transport``, for ``center_momentum`` > 0 (see below), and
            everything :class:`EASGDStrategy` refuses.

    Center momentum is not supported: here the center is updated by each worker's exchange separately, on the ranks
    that own its slices, so there is no single increment s = α·Σ_i d_i per round for a velocity to accumulate; a
    velocity per update would multiply every worker's pull by 1/(1 − μ) and change the method's stability, which
    the paper's asynchronous analysis does not cover.
    """

    strategy_name = "easgd_async"
    unsupported_options: ClassVar[Mapping[str, tuple[Any, str]]] = {
        name: (default, _SYNCHRONOUS_ONLY)
        for name, default in (("ranks_per_worker", 1), ("center_device", None), ("exchange_dtype", None))
    }

    def __init__(
        self,
        tau: int = 10,
        alpha: float | None = None,
        beta: float = DEFAULT_BETA,
        order: Literal["free", "round_robin"] = "free",
        rpc_transport: Literal["tcp", "fast"] = "tcp",
        overlap: bool = True,
        bucket_cap_mb: float = 25.0,
        save_worker_states: bool = True,
        on_nonfinite: NonFinitePolicy = "raise",
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        self.order = validate_order(order)
        self.rpc_transport = validate_transport(rpc_transport)
        super().__init__(
            tau=tau, alpha=alpha, beta=beta, overlap=overlap, bucket_cap_mb=bucket_cap_mb,
            save_worker_states=save_worker_states, on_nonfinite=on_nonfinite, accelerator=accelerator,
            parallel_devices=parallel_devices, cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin, process_group_backend=process_group_backend, timeout=timeout,
            start_method=start_method, **kwargs,
        )
        if self.center_momentum:
            raise ValueError(
                f"AsyncEASGDStrategy does not accept center_momentum={self.center_momentum!r}: the asynchronous center "
                "is updated by each worker's exchange separately on the ranks that own its slices, with no per-round "
                "increment for a velocity to accumulate; use EASGDStrategy for center momentum"
            )
        if self.worker_pull != "elastic" or self.sync_steps or self.sync_epochs:
            given = ", ".join(f"{name}={value!r}" for name, value, default in (
                ("worker_pull", self.worker_pull, "elastic"), ("sync_steps", self.sync_steps, 0),
                ("sync_epochs", self.sync_epochs, 0)) if value != default)
            raise ValueError(
                f"AsyncEASGDStrategy does not accept {given}: the reset rule needs every worker's difference in one "
                "round (the asynchronous center takes them one at a time) and a synchronous start averages gradients "
                "at a barrier every step, which the asynchronous strategy has none of; use EASGDStrategy"
            )
        self._interrupted = False

    @property
    def averager(self) -> AsyncElasticAverager | None:
        """The exchange between this worker and the sharded center; None outside ``setup``/``teardown``."""
        assert self._averager is None or isinstance(self._averager, AsyncElasticAverager)
        return self._averager

    @override
    def _create_averager(self, elastic: list[tuple[str, Tensor]]) -> AsyncElasticAverager:
        """Start the center service (collective) after checking (η, α) against the paper's stability region."""
        rates = [group["lr"] for opt in self.optimizers for group in opt.param_groups if "lr" in group]
        alpha = self.config.moving_rate(self.num_workers)
        if rates:
            warning = async_stability_warning(alpha, float(max(rates)))
            if warning:
                rank_zero_warn(warning)
        self._interrupted = False
        return AsyncElasticAverager(elastic, self.config, order=self.order, rpc_transport=self.rpc_transport)

    @override
    def on_exception(self, exception: BaseException) -> None:
        # Other ranks may be gone or stuck: teardown must not wait for them (no snapshot, no graceful shutdown).
        self._interrupted = True
        super().on_exception(exception)

    @override
    def teardown(self) -> None:
        averager = self.averager
        interrupted, self._interrupted = self._interrupted, False
        if averager is not None and interrupted:
            if averager.center_in_use:
                averager.restore_local()
            self._averager = None  # the base class would adopt the center, a collective
        try:
            super().teardown()
        except BaseException:
            interrupted = True
            raise
        finally:
            if averager is not None:
                averager.close(graceful=not interrupted)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The center; outside evaluation a consistent snapshot is taken first (every rank saves checkpoints)."""
        averager = self.averager
        if averager is None or averager.center_in_use:
            return super().lightning_module_state_dict()
        averager.use_center()
        try:
            return super().lightning_module_state_dict()
        finally:
            averager.restore_local()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        register_start_methods(strategy_registry, cls, "easgd_async",
                               "Asynchronous Elastic Averaging SGD (sharded center)")
