"""EASGDStrategy: Elastic Averaging SGD for Lightning's Trainer, evaluated and checkpointed on the center.

It subclasses :class:`~lightning.pytorch.strategies.DDPStrategy` to inherit what is not specific to DDP's gradient
all-reduce: the launchers (popen, spawn, fork), the cluster environments (torchrun, SLURM, LSF, MPI), process-group
setup, the DistributedSampler and ``sync_dist`` logging. With one rank per worker (the paper's setting) it never wraps
the module in DistributedDataParallel, so between exchanges nothing is communicated; with worker groups of k ranks
it wraps the module in DistributedDataParallel on the worker's own process group only. The exchange itself lives in
:class:`~lightning_easgd.core.ElasticAverager`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from functools import partial
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.distributed import _init_dist_connection
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_easgd.adapter.layout import WorkerLayout
from lightning_easgd.adapter.options import register_start_methods
from lightning_easgd.checkpoint.atomic_io import AtomicCheckpointIO
from lightning_easgd.core import DEFAULT_BETA, ElasticAverager, ExchangeConfig
from lightning_easgd.core.family import WorkerPull, steps_for_epochs
from lightning_easgd.core.worker import ElasticWorker, NonFinitePolicy
from lightning_easgd.trainer.checkpoints import WorkerCheckpoints
from lightning_easgd.trainer.guards import PerStepSyncGuard, refuse_weight_averaging


class EASGDStrategy(WorkerLayout, DDPStrategy):
    """Synchronous Elastic Averaging SGD (Zhang, Choromanska & LeCun, NIPS 2015, Eq. 5-6).

    Each of the p workers trains its own copy x_i with the LightningModule's optimizer. At the start of every
    optimizer step t with t > 0 and t % tau == 0, every worker takes d_i = x_i − x̃ and, after its local step,
    x_i −= α·d_i and x̃ += α·Σ_i d_i, with Σ_i d_i from one SUM all-reduce that runs while the step computes.
    The center x̃ is replicated, bit-identical, on every rank. Validation, test and predict run on x̃; a
    checkpoint's ``state_dict`` is x̃; after ``fit`` the LightningModule holds x̃.

    Worker groups (``ranks_per_worker=k``): every k consecutive ranks form one worker, p = world_size / k. Inside a
    worker the module is wrapped in torch's DistributedDataParallel on the worker's process group, so gradients are
    averaged every step exactly as DDP does (bucketed, overlapping the all-reduce with backward: a hand-written
    all-reduce would only redo that less well), and all ranks of a worker hold identical parameters. The worker's
    float buffers are its first rank's, as DDP broadcasts them. Rank j of every worker owns slice j of the center
    and exchanges only that slice with rank j of the other workers; the worker then all-gathers the elastic pull.
    Every rank still reads its own DistributedSampler shard, so a worker's batch is the union of its ranks'
    batches. Distances and divergence are per worker.

    The local optimizer decides the variant: ``torch.optim.SGD`` gives EASGD, ``SGD(momentum=δ, nesterov=True)``
    gives EAMSGD (the paper's Algorithm 2, δ = 0.99 there). Optimizer state is never touched by the exchange.

    What takes part in the exchange: every parameter and every floating-point persistent buffer (e.g. BatchNorm
    running mean and variance), so the center is a complete model. Integer buffers (BatchNorm's
    ``num_batches_tracked``) stay local; the center's copy in checkpoints comes from rank 0. Buffers must be
    updated in place, as all torch modules do.

    Args:
        tau: communication period τ, in optimizer steps (after gradient accumulation). With several optimizers
            in manual optimization, every ``optimizer.step()`` call is one tick of the clock, as for
            ``trainer.global_step``: with N optimizers stepping once per batch, tau = k·N exchanges every k batches.
        alpha: moving rate α = ηρ in (0, 1). Default: α = β/p, the paper's synchronous convention, so the center
            moves a fraction β toward the workers' mean at each exchange whatever p is. (The paper's asynchronous
            footnote uses α = β/(τ·p); pass ``alpha`` to choose that or any other value.)
        beta: β = p·α used when ``alpha`` is None; the paper uses 0.9 throughout. β must be < 2 (the paper's
            stability analysis), and values above 1 warn.
        overlap: start the all-reduce before the step's forward/backward and wait for it after the local update
            (True), or wait for it before the step (False). The arithmetic is the same either way. Default: True,
            and False with ``center_device="cpu"``, which cannot overlap (True is refused there).
        bucket_cap_mb: size of the flat buffers that each all-reduce carries. Default: 25 MB on CPU (gloo),
            256 MB on CUDA, where NCCL's per-call cost makes small buckets slow for large models.
        ranks_per_worker: k, the ranks that form one EASGD worker (an integer that divides the world size), or
            ``"node"`` for the number of processes per node. Default 1: every rank is a worker (the paper).
        center_device: None (the parameters' device) or ``"cpu"``: keep the center and d_i in (pinned) host memory
            and stream them through one bucket-sized device buffer at each exchange, so that the exchange holds
            one bucket of accelerator memory (plus, with k > 1, one bucket to gather the pull).
        exchange_dtype: None (the center's dtype, float32 for 16-bit parameters) or ``torch.bfloat16`` /
            ``"bfloat16"``: d_i travels and is summed in bfloat16 (half the bytes); the center and the pull stay in
            full precision. ``torch.float32`` / ``"float32"`` is accepted too.
        save_worker_states: with every full checkpoint, store each worker's local weights, optimizer state and
            RNG states in a file of its own, written by that worker next to the checkpoint (see
            :mod:`lightning_easgd.checkpoint.worker_files`), so that resuming reproduces the uninterrupted run. Without
            them a resumed run restarts every worker from the center.
        on_nonfinite: the divergence guard. A worker whose weights turn NaN or inf never reaches the center (the
            check rides in the exchange). ``"raise"`` (default): every rank raises
            :class:`~lightning_easgd.core.NonFiniteWorkerError` naming the workers and the step, so the run stops
            with the last good checkpoint intact. ``"reset"``: the diverged workers' contributions are dropped,
            they restart from the center with empty optimizer state, and a warning names them.
        center_momentum: momentum μ in [0, 1) on the center's updates (beyond the paper; see
            docs/center_momentum.md): with s = α·Σ_i d_i, heavy ball ``v ← μ·v + s; x̃ ← x̃ + v``. The workers'
            pull is unchanged; v is identical on every rank and travels in checkpoints. 0 (default): the paper's
            rule, bit for bit. Refused where the center's iteration diverges (β ≥ 2·(1 + μ), Nesterov
            β ≥ 2·(1 + μ)/(1 + 2μ)), warned where it overshoots the workers' mean at nearly every exchange.
        center_nesterov: use the Nesterov form ``v ← μ·v + s; x̃ ← x̃ + μ·v + s`` instead.
        warmup_steps: exchange every ``warmup_tau`` optimizer steps while the clock is below ``warmup_steps``, and
            every ``tau`` steps afterwards (on the multiples of tau, as without a warm-up). 0 (default): no warm-up.
            The schedule depends only on the clock, so resuming keeps it exact.
        warmup_tau: the communication period during the warm-up, in [1, tau].
        per_tensor_distances: the exchange also measures every tensor's distance to the center, for
            ``ElasticDistanceMonitor(per_layer=True)``. It enlarges the exchange's all-reduce, so it is a setting of
            the strategy, the same on every rank (a per-rank switch would make the ranks' all-reduces differ in
            size, which hangs NCCL). Default False.
        worker_pull: ``"elastic"`` (default: the paper's pull x_i −= α·d_i) or ``"reset"``: at an exchange every
            worker lands on the new center plus its own update of that step, x_i ← x_i − d_i + (x̃_new − x̃_old), and β
            is the outer learning rate, allowed in (0, 2) and below the center momentum's bound. Periodic averaging
            is reset with β = 1; SlowMo adds heavy-ball ``center_momentum``; DiLoCo Nesterov (β = 0.7, μ = 0.9).
            See docs/family.md.
        sync_steps: a synchronous start (post-local SGD): optimizer steps t < ``sync_steps`` average the gradients
            over all workers (DDP's rule; with worker groups sliced across the workers' columns) and the floating-point
            buffers, so the workers stay identical and the center follows them; exchanges then happen at the steps
            t > N with (t − N) % tau == 0. 0 (default): none. Not combinable with ``warmup_steps``.
        sync_epochs: the synchronous start in epochs instead, turned into optimizer steps at the start of ``fit``
            from the training loader's length (automatic optimization only; at most one of the two).
        timeout: how long collectives, the exchange included, may wait for a peer before failing with an error
            (a dead or stalled worker then stops the run instead of hanging it). Default: 30 minutes. With gloo the
            exchange raises :class:`~lightning_easgd.core.ExchangeError` after it; with NCCL it is the process
            group's timeout, enforced by NCCL's watchdog, which aborts the communicator (and, with
            ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` at its default, the process) and logs the collective that timed out.
        checkpoint_io: defaults to :class:`~lightning_easgd.checkpoint.atomic_io.AtomicCheckpointIO`, which never leaves
            a partial checkpoint file behind.
        accelerator, parallel_devices, cluster_environment, precision_plugin, process_group_backend,
        start_method: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.
        **kwargs: with ``ranks_per_worker`` > 1, ``find_unused_parameters``, ``gradient_as_bucket_view`` and
            ``static_graph`` are passed to the DistributedDataParallel inside each worker.

    Raises:
        ValueError: for an invalid ``tau``, ``alpha``, ``beta``, ``bucket_cap_mb``, ``ranks_per_worker``,
            ``center_device``, ``exchange_dtype``, ``worker_pull``, ``sync_steps``, ``sync_epochs`` (or both of the
            last two, or either with ``warmup_steps``) or ``start_method``, and for options of DDP that have no meaning
            here (communication hooks, ``model_averaging_period``, DistributedDataParallel's own arguments such as
            ``find_unused_parameters`` with one rank per worker, and those the strategy sets itself with more). At
            setup: a world size that ``ranks_per_worker`` does not divide, a floating-point tensor of the module
            on another device than the model's, and with ``worker_pull="reset"`` a β at or beyond the outer step's
            stability bound. At the start of ``fit``: ``sync_epochs`` where the steps per epoch are unknown.
        TypeError: for any other unknown keyword argument.
    """

    strategy_name = "easgd"

    def __init__(
        self,
        tau: int = 10,
        alpha: float | None = None,
        beta: float = DEFAULT_BETA,
        overlap: bool | None = None,
        bucket_cap_mb: float | None = None,
        save_worker_states: bool = True,
        on_nonfinite: NonFinitePolicy = "raise",
        ranks_per_worker: int | Literal["node"] = 1,
        center_device: str | None = None,
        exchange_dtype: str | torch.dtype | None = None,
        center_momentum: float = 0.0,
        center_nesterov: bool = False,
        warmup_steps: int = 0,
        warmup_tau: int = 1,
        per_tensor_distances: bool = False,
        worker_pull: WorkerPull = "elastic",
        sync_steps: int = 0,
        sync_epochs: int = 0,
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
        self._keep_options(locals())  # the adapter's own options, and those this class does not implement
        self.config = ExchangeConfig.from_options(locals())  # the exchange's options, validated once, in the core
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=AtomicCheckpointIO() if checkpoint_io is None else checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self._averager: ElasticWorker | None = None
        self._checkpoints = WorkerCheckpoints(self)
        self._patched_loop: Any = None  # the training epoch loop whose per-batch SIGTERM broadcast is replaced
        self._sync_guard = PerStepSyncGuard()
        self._failed = False

    # ------------------------------------------------------------------ properties

    @property
    def averager(self) -> ElasticWorker | None:
        """The exchange between this worker and the center; None outside ``setup``/``teardown``."""
        return self._averager

    @property  # type: ignore[override]
    def _layer_sync(self) -> LayerSync | None:
        return None

    @_layer_sync.setter
    def _layer_sync(self, layer_sync: LayerSync | None) -> None:
        # The Trainer assigns this from `sync_batchnorm`; refuse at construction rather than ignore it.
        if layer_sync is not None:
            raise ValueError(
                "Trainer(sync_batchnorm=True) is not supported with EASGDStrategy: SyncBatchNorm all-reduces batch "
                "statistics in every forward pass, which defeats EASGD's communication every tau steps. BatchNorm "
                "running statistics already take part in the elastic exchange; use plain BatchNorm."
            )

    # ------------------------------------------------------------------ setup and teardown

    @override
    def setup_distributed(self) -> None:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if attempt == "0" or dist.is_initialized():
            super().setup_distributed()
            return
        # TorchElastic restarted the workers (after a crash, say). Its store can still hold the previous attempt's
        # process-group addresses, and a rank that reads one before the restarted peer overwrites it dials a dead
        # port. Namespacing the store by attempt makes every restart rendezvous afresh. The rest is DDPStrategy's own
        # setup (Lightning's _init_dist_connection), so a restarted NCCL group is destroyed at exit like a first one.
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        assert self.cluster_environment is not None
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        timeout = self._timeout or default_pg_timeout
        store, _, _ = next(dist.rendezvous("env://", self.global_rank, self.world_size, timeout=timeout))
        _init_dist_connection(
            self.cluster_environment,
            self._process_group_backend,
            self.global_rank,
            self.world_size,
            store=dist.PrefixStore(f"lightning_easgd/attempt_{attempt}", store),
            timeout=timeout,
            device_id=self.root_device if self.root_device.type != "cpu" else None,
        )

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        if trainer.state.fn == TrainerFn.FITTING:
            refuse_weight_averaging(trainer.callbacks)
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)
        self._failed = False
        self._setup_averager()
        self._checkpoints.setup(fitting)
        assert self._topology is not None
        if fitting and self._topology.worker_group is not None:
            # Inside a worker, gradients are averaged every step by DDP on the worker's own process group. Wrapped
            # after the resume so that DDP's initial broadcast finds the worker's restored weights.
            self._ddp_kwargs = {"process_group": self._topology.worker_group, **self._worker_ddp_kwargs}
            self.configure_ddp()

    def _setup_averager(self) -> None:
        module = self.lightning_module
        assert module is not None
        self._averager = self._start_exchange(module, "EASGDStrategy", self._create_averager)

    def _create_averager(self, elastic: list[tuple[str, Tensor]]) -> ElasticWorker:
        """Build the exchange over ``elastic`` (all ranks hold equal values here); subclasses swap the algorithm."""
        return self._elastic_averager(elastic)

    @override
    def teardown(self) -> None:
        if self._patched_loop is not None:
            del self._patched_loop._broadcast_sigterm_tensor  # back to the class's method
            self._patched_loop = None
        failed = self._failed
        if self._averager is not None:
            module = self.lightning_module
            grouped = self._topology is not None and self._topology.worker_group is not None
            if failed and grouped:
                pass  # swapping needs the worker's other ranks, which may be gone: leave the tensors as they are
            elif module is not None and module._trainer is not None and module.trainer.state.fn == TrainerFn.FITTING:
                # The center is the model: the user's module (and what spawn/fork send back) holds it after fit.
                self._averager.adopt_center()
            elif self._averager.center_in_use:
                self._averager.restore_local()
            self._averager = None
        self._failed = False
        if isinstance(self.model, DistributedDataParallel):
            # Unwrap here: DDPStrategy.teardown would suggest static_graph=True, a DDP option this strategy refuses.
            self.model = self.lightning_module
        super().teardown()
        self._release_groups(destroy=not failed)

    @override
    def on_exception(self, exception: BaseException) -> None:
        self._failed = True
        super().on_exception(exception)

    # ------------------------------------------------------------------ training

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: LightningModule | Module | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the local step inside the exchange: d_i is taken before the closure's forward/backward runs and
        the elastic pull is applied after the optimizer has updated the weights."""
        assert self._averager is not None
        with self._averager.step():
            if isinstance(self._averager, ElasticAverager) and self._averager.synchronous:
                closure = _averaging_closure(self._averager, optimizer, closure)
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._sync_guard.check(self.lightning_module.trainer)
        self._apply_resets(self.optimizers)
        return output

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # A training batch may change the worker's state before its optimizer step (BatchNorm statistics, gradient
        # accumulation): a save after it writes its own worker files instead of sharing an earlier save's.
        self._checkpoints.touch()
        super().on_train_batch_start(batch, batch_idx)

    @override
    def on_train_start(self) -> None:
        assert self._averager is not None and self.lightning_module is not None
        trainer = self.lightning_module.trainer
        # The clock is the number of optimizer steps taken, which Lightning restores on resume.
        self._averager.clock = trainer.global_step
        if self.sync_epochs and isinstance(self._averager, ElasticAverager):
            self._averager.set_sync_steps(steps_for_epochs(self.sync_epochs, _steps_per_epoch(trainer)))
        # Lightning 2.6 broadcasts a SIGTERM flag from rank 0 before every training batch
        # (_TrainingEpochLoop._broadcast_sigterm_tensor): a collective on every step that makes every worker wait
        # for the slowest, which EASGD exists to avoid. Each rank checks its own flag instead. SLURM and torchrun
        # signal every rank; if only some ranks get SIGTERM, the others stop at their next exchange with an
        # ExchangeError (within `timeout`).
        def check_local_sigterm() -> None:
            if getattr(trainer, "received_sigterm", False):
                raise SIGTERMException()

        epoch_loop = trainer.fit_loop.epoch_loop
        epoch_loop._broadcast_sigterm_tensor = check_local_sigterm  # type: ignore[method-assign]
        self._patched_loop = epoch_loop

    # ------------------------------------------------------------------ evaluation on the center

    def _use_center(self) -> None:
        if self._averager is not None and not self._averager.center_in_use:
            self._averager.use_center()

    def _restore_local(self) -> None:
        if self._averager is not None and self._averager.center_in_use:
            self._averager.restore_local()

    @override
    def on_validation_start(self) -> None:
        self._use_center()

    @override
    def on_validation_end(self) -> None:
        self._restore_local()

    @override
    def on_test_start(self) -> None:
        self._use_center()

    @override
    def on_test_end(self) -> None:
        self._restore_local()

    @override
    def on_predict_start(self) -> None:
        self._use_center()

    @override
    def on_predict_end(self) -> None:
        self._restore_local()

    # ------------------------------------------------------------------ checkpoints (trainer/checkpoints.py)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The center, whatever the module holds right now (local weights, or the center during validation)."""
        return self._checkpoints.center_state_dict(super().lightning_module_state_dict())

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        # Called on every rank: each worker's writer writes its worker file, then rank 0 the checkpoint file.
        self._checkpoints.before_save(checkpoint, filepath, storage_options)
        super().save_checkpoint(checkpoint, filepath, storage_options)
        self._checkpoints.after_save()

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        super().remove_checkpoint(filepath)
        self._checkpoints.remove(filepath)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        return self._checkpoints.read(
            checkpoint_path, partial(super().load_checkpoint, checkpoint_path, weights_only=weights_only)
        )

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        try:
            super().load_model_state_dict(checkpoint, strict=strict)
        except RuntimeError as error:
            raise ValueError(
                f"the checkpoint's weights do not fit this model ({type(self.lightning_module).__name__}); was it "
                f"saved from another model or configuration?\n{error}"
            ) from error

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)  # the hyperparameters (and, without worker files, rank 0's state)
        self._checkpoints.restore_optimizers()

    # ------------------------------------------------------------------ registration

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        register_start_methods(strategy_registry, cls, "easgd", "Synchronous Elastic Averaging SGD")



def _averaging_closure(averager: ElasticAverager, optimizer: Optimizer,
                       closure: Callable[[], Any]) -> Callable[[], Any]:
    """``closure`` (forward and backward) followed by the synchronous start's gradient average, so that what runs
    after the closure (gradient clipping, the precision plugin's checks, the update) sees DDP's averaged gradients."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def averaged() -> Any:
        output = closure()
        averager.average_gradients(parameters)
        return output

    return averaged


def _steps_per_epoch(trainer: Trainer) -> int:
    """Optimizer steps in one training epoch: ⌈batches / accumulate_grad_batches⌉, as Lightning steps on an epoch's
    last batch whether or not it completes an accumulation.

    Raises:
        ValueError: where the count is unknown (manual optimization decides its own steps; a loader without a
            length), naming ``sync_epochs`` and what to pass instead.
    """
    module = trainer.lightning_module
    if not module.automatic_optimization:
        raise ValueError(
            "sync_epochs needs the number of optimizer steps per epoch, which manual optimization decides in "
            "training_step; pass sync_steps (optimizer.step() calls of all optimizers) instead"
        )
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        raise ValueError(
            "sync_epochs needs the number of optimizer steps per epoch, but the training loader has no length; "
            "pass sync_steps instead"
        )
    return math.ceil(int(batches) / trainer.accumulate_grad_batches)
