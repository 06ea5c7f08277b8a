"""EASGDStrategy: Elastic Averaging SGD for Lightning's Trainer, evaluated and checkpointed on the center.

It subclasses :class:`~lightning.pytorch.strategies.DDPStrategy` to inherit what is not specific to DDP's gradient
all-reduce: the launchers (popen, spawn, fork), the cluster environments (torchrun, SLURM, LSF, MPI), process-group
setup, the DistributedSampler and ``sync_dist`` logging. It never wraps the module in DistributedDataParallel, so
between exchanges nothing is communicated; the exchange itself lives in :class:`~lightning_easgd.core.ElasticAverager`.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.utilities.optimizer import _optimizer_to_device, _optimizers_to_device
from lightning.fabric.utilities.seed import reset_seed
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from typing_extensions import override

from lightning_easgd.checkpoint_io import AtomicCheckpointIO
from lightning_easgd.core import DEFAULT_BETA, ElasticAverager, broadcast_tensors, resolve_alpha
from lightning_easgd.core.center_momentum import (
    check_center_momentum,
    validate_center_momentum,
    validate_center_nesterov,
)
from lightning_easgd.core.hyperparams import validate_alpha, validate_beta
from lightning_easgd.core.schedule import ExchangeSchedule
from lightning_easgd.core.worker import ElasticWorker, NonFinitePolicy
from lightning_easgd.rng import capture_rng_state, restore_rng_state

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "easgd"
"""Where a checkpoint keeps the strategy's own state (the center itself is the checkpoint's ``state_dict``)."""
CHECKPOINT_FORMAT = 1

_START_METHODS = ("popen", "spawn", "fork", "forkserver")
_DDP_COMM_OPTIONS = {
    "ddp_comm_state": "DDP communication hooks act on the gradient all-reduce, which EASGD does not do",
    "ddp_comm_hook": "DDP communication hooks act on the gradient all-reduce, which EASGD does not do",
    "ddp_comm_wrapper": "DDP communication hooks act on the gradient all-reduce, which EASGD does not do",
    "model_averaging_period": "EASGD replaces periodic model averaging; set tau (and alpha or beta) instead",
}
_DDP_WRAPPER_OPTIONS = frozenset(inspect.signature(DistributedDataParallel.__init__).parameters) - {"self", "module"}


class EASGDStrategy(DDPStrategy):
    """Synchronous Elastic Averaging SGD (Zhang, Choromanska & LeCun, NIPS 2015, Eq. 5-6).

    Each of the p workers trains its own copy x_i with the LightningModule's optimizer. At the start of every
    optimizer step t with t > 0 and t % tau == 0, every worker takes d_i = x_i − x̃ and, after its local step,
    x_i −= α·d_i and x̃ += α·Σ_i d_i, with Σ_i d_i from one SUM all-reduce that runs while the step computes.
    The center x̃ is replicated, bit-identical, on every rank. Validation, test and predict run on x̃; a
    checkpoint's ``state_dict`` is x̃; after ``fit`` the LightningModule holds x̃.

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
            (True), or wait for it before the step (False). The arithmetic is the same either way.
        bucket_cap_mb: size of the flat buffers that each all-reduce carries.
        save_worker_states: store every worker's local weights, optimizer state and RNG state in full
            checkpoints (gathered on rank 0), so that resuming reproduces the uninterrupted run. Without them a
            resumed run restarts every worker from the center.
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
        timeout: how long collectives, the exchange included, may wait for a peer before failing with an error
            (a dead or stalled worker then stops the run instead of hanging it). Default: 30 minutes.
        checkpoint_io: defaults to :class:`~lightning_easgd.checkpoint_io.AtomicCheckpointIO`, which never leaves
            a partial checkpoint file behind.
        accelerator, parallel_devices, cluster_environment, precision_plugin, process_group_backend,
        start_method: as for :class:`~lightning.pytorch.strategies.DDPStrategy`.

    Raises:
        ValueError: for an invalid ``tau``, ``alpha``, ``beta``, ``bucket_cap_mb`` or ``start_method``, and for
            options of DDP that have no meaning here (communication hooks, ``model_averaging_period``,
            DistributedDataParallel's own arguments such as ``find_unused_parameters``).
        TypeError: for any other unknown keyword argument.
    """

    strategy_name = "easgd"

    def __init__(
        self,
        tau: int = 10,
        alpha: float | None = None,
        beta: float = DEFAULT_BETA,
        overlap: bool = True,
        bucket_cap_mb: float = 25.0,
        save_worker_states: bool = True,
        on_nonfinite: NonFinitePolicy = "raise",
        center_momentum: float = 0.0,
        center_nesterov: bool = False,
        warmup_steps: int = 0,
        warmup_tau: int = 1,
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
        _refuse_ddp_options(kwargs)
        schedule = ExchangeSchedule(tau, warmup_steps, warmup_tau)  # validates all three
        self.tau, self.warmup_steps, self.warmup_tau = schedule.tau, schedule.warmup_steps, schedule.warmup_tau
        self.center_momentum = validate_center_momentum(center_momentum)
        self.center_nesterov = validate_center_nesterov(center_nesterov)
        self._alpha = None if alpha is None else validate_alpha(alpha)
        self.beta = validate_beta(beta)
        if not isinstance(overlap, bool):
            raise ValueError(f"overlap={overlap!r} is invalid: it must be True or False")
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r} is invalid: it must be a number > 0 (megabytes)")
        if not isinstance(save_worker_states, bool):
            raise ValueError(f"save_worker_states={save_worker_states!r} is invalid: it must be True or False")
        if on_nonfinite not in ("raise", "reset"):
            raise ValueError(f"on_nonfinite={on_nonfinite!r} is invalid: choose 'raise' or 'reset'")
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0):
            raise ValueError(f"timeout={timeout!r} is invalid: it must be a positive datetime.timedelta")
        if start_method not in _START_METHODS:
            raise ValueError(f"start_method={start_method!r} is invalid: choose one of {', '.join(_START_METHODS)}")
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
        self.overlap = overlap
        self.bucket_cap_mb = float(bucket_cap_mb)
        self.save_worker_states = save_worker_states
        self.on_nonfinite: NonFinitePolicy = on_nonfinite
        self._averager: ElasticWorker | None = None
        self._state_keys: dict[str, int] = {}  # state_dict key -> index of the averaged tensor it names
        self._loaded: dict[str, Any] | None = None  # this strategy's section of the checkpoint being resumed
        self._workers: list[dict[str, Any]] | None = None  # saved worker states awaiting the optimizer restore
        self._pending_rng: dict[str, Any] | None = None
        self._patched_loop: Any = None  # the training epoch loop whose per-batch SIGTERM broadcast is replaced

    # ------------------------------------------------------------------ properties

    @property
    def averager(self) -> ElasticWorker | None:
        """The exchange between this worker and the center; None outside ``setup``/``teardown``."""
        return self._averager

    @property
    def alpha(self) -> float | None:
        """The moving rate in use (resolved from β and the world size at setup when not given)."""
        return self._averager.alpha if self._averager is not None else self._alpha

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
        # port. Namespacing the store by attempt makes every restart rendezvous afresh.
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        assert self.cluster_environment is not None
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        timeout = self._timeout or default_pg_timeout
        store, _, _ = next(dist.rendezvous("env://", self.global_rank, self.world_size, timeout=timeout))
        dist.init_process_group(
            self._process_group_backend,
            store=dist.PrefixStore(f"lightning_easgd/attempt_{attempt}", store),
            rank=self.global_rank,
            world_size=self.world_size,
            timeout=timeout,
            device_id=self.root_device if self.root_device.type != "cpu" else None,
        )

    @override
    def setup(self, trainer: Trainer) -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)
        self._setup_averager()
        loaded, self._loaded = self._loaded, None
        self._workers = None
        if fitting and loaded is not None:
            self._resume_center_velocity(loaded.get("center_velocity"))
            self._resume_workers(loaded)

    def _setup_averager(self) -> None:
        module = self.lightning_module
        assert module is not None
        if self.world_size < 2:
            rank_zero_warn(
                "EASGDStrategy is running with a single worker: EASGD needs at least 2 workers to average; the "
                "elastic pull still runs, without any communication."
            )
        alpha, warning = resolve_alpha(self._alpha, self.beta, self.world_size)
        if self.center_momentum:  # momentum moves the overshoot threshold (and the divergence bound)
            warning = check_center_momentum(self.world_size * alpha, self.center_momentum, self.center_nesterov)
        if warning:
            rank_zero_warn(warning)
        state = module.state_dict(keep_vars=True)
        # Every rank starts from rank 0's parameters and buffers: the paper finds different starting points hurt.
        unique: dict[int, tuple[str, Tensor]] = {}
        for key, value in state.items():
            if isinstance(value, Tensor):
                unique.setdefault(id(value), (key, value))
        broadcast_tensors([t for _, t in unique.values()], src=0, bucket_cap_mb=self.bucket_cap_mb)
        elastic = [(key, t) for key, t in unique.values() if t.is_floating_point()]
        index = {id(t): i for i, (_, t) in enumerate(elastic)}
        self._state_keys = {key: index[id(v)] for key, v in state.items() if isinstance(v, Tensor) and id(v) in index}
        self._averager = self._create_averager(elastic, alpha)
        log.debug(
            "EASGD: %d workers, tau=%d, alpha=%g, %d tensors of %d bytes in %d buckets",
            self.world_size, self.tau, alpha, len(elastic), self._averager.layout.nbytes,
            len(self._averager.layout.buckets),
        )

    def _create_averager(self, elastic: list[tuple[str, Tensor]], alpha: float) -> ElasticWorker:
        """Build the exchange over ``elastic`` (all ranks hold equal values here); subclasses swap the algorithm."""
        return ElasticAverager(elastic, tau=self.tau, alpha=alpha, bucket_cap_mb=self.bucket_cap_mb,
                               overlap=self.overlap, on_nonfinite=self.on_nonfinite, timeout=self._timeout,
                               center_momentum=self.center_momentum, center_nesterov=self.center_nesterov,
                               warmup_steps=self.warmup_steps, warmup_tau=self.warmup_tau)

    @override
    def teardown(self) -> None:
        if self._patched_loop is not None:
            del self._patched_loop._broadcast_sigterm_tensor  # back to the class's method
            self._patched_loop = None
        if self._averager is not None:
            module = self.lightning_module
            if module is not None and module._trainer is not None and module.trainer.state.fn == TrainerFn.FITTING:
                # The center is the model: the user's module (and what spawn/fork send back) holds it after fit.
                self._averager.adopt_center()
            elif self._averager.center_in_use:
                self._averager.restore_local()
            self._averager = None
        super().teardown()

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
            output = super().optimizer_step(optimizer, closure, model, **kwargs)
        for step, ranks in self._averager.pop_resets():
            rank_zero_warn(
                f"EASGD: worker(s) {', '.join(map(str, ranks))} had non-finite weights at optimizer step {step}; "
                "their contribution was dropped and they were reset to the center with empty optimizer state."
            )
            if self.global_rank in ranks:
                for opt in self.optimizers:
                    opt.state.clear()
        return output

    @override
    def on_train_start(self) -> None:
        assert self._averager is not None and self.lightning_module is not None
        trainer = self.lightning_module.trainer
        # The clock is the number of optimizer steps taken, which Lightning restores on resume.
        self._averager.clock = trainer.global_step
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

    # ------------------------------------------------------------------ checkpoints

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The center, whatever the module holds right now (local weights, or the center during validation)."""
        state = super().lightning_module_state_dict()
        if self._averager is None:
            return state
        center = self._averager.center_values()
        for key, i in self._state_keys.items():
            state[key] = center[i].detach().clone()
        return state

    def _local_state_dict(self) -> dict[str, Tensor]:
        assert self._averager is not None and self.lightning_module is not None
        state = self.lightning_module.state_dict()
        local = self._averager.local_values()
        for key, i in self._state_keys.items():
            state[key] = local[i]
        return {key: value.detach().to("cpu", copy=True) for key, value in state.items()}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        # Called on every rank (rank 0 writes), so the workers' states can be gathered here.
        if self._averager is not None and "optimizer_states" in checkpoint:
            section: dict[str, Any] = {
                "format": CHECKPOINT_FORMAT,
                "world_size": self.world_size,
                "tau": self.tau,
                "alpha": self._averager.alpha,
                "clock": self._averager.clock,
            }
            velocity = self._averager.center_velocity()
            if velocity is not None:
                section["center_velocity"] = {k: v.detach().to("cpu", copy=True) for k, v in velocity.items()}
            if self.save_worker_states:
                mine = {
                    "state_dict": self._local_state_dict(),
                    "optimizer_states": apply_to_collection(
                        checkpoint["optimizer_states"], Tensor, lambda t: t.detach().to("cpu", copy=True)
                    ),
                    "rng": capture_rng_state(),
                }
                section["workers"] = self._gather_on_rank_zero(mine)
            checkpoint[CHECKPOINT_KEY] = section
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def _gather_on_rank_zero(self, obj: dict[str, Any]) -> list[dict[str, Any]] | None:
        if self.world_size == 1 or not dist.is_initialized():
            return [obj]
        gathered: list[Any] | None = [None] * self.world_size if self.is_global_zero else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as error:
            raise ValueError(
                f"{checkpoint_path} is not a readable checkpoint ({type(error).__name__}: {error}); the file may be "
                "truncated or corrupt, or not a PyTorch checkpoint"
            ) from error
        if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
            raise ValueError(f"{checkpoint_path} is not a Lightning checkpoint: it has no 'state_dict' mapping")
        section = checkpoint.get(CHECKPOINT_KEY)
        if section is not None:
            if not isinstance(section, Mapping) or section.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(
                    f"{checkpoint_path}: the checkpoint's '{CHECKPOINT_KEY}' section has an unknown format; this "
                    f"version of lightning-easgd reads format {CHECKPOINT_FORMAT}"
                )
            self._loaded = dict(section)
        return checkpoint

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        try:
            super().load_model_state_dict(checkpoint, strict=strict)
        except RuntimeError as error:
            raise ValueError(
                f"the checkpoint's weights do not fit this model ({type(self.lightning_module).__name__}); was it "
                f"saved from another model or configuration?\n{error}"
            ) from error

    def _resume_center_velocity(self, velocity: Mapping[str, Tensor] | None) -> None:
        """Restore the center momentum's velocity (zero from a checkpoint without one), or say that it is dropped."""
        assert self._averager is not None
        if velocity is not None and self._averager.center_momentum is None:
            rank_zero_warn("EASGD resume: the checkpoint holds a center-momentum velocity, but this run has "
                           "center_momentum=0: the velocity is dropped and the paper's rule is used.")
            return
        self._averager.load_center_velocity(velocity)

    def _resume_workers(self, section: dict[str, Any]) -> None:
        """Give this rank back its own weights; ranks the checkpoint did not have start from the center."""
        assert self._averager is not None and self.lightning_module is not None
        workers = section.get("workers")
        saved_p = int(section["world_size"])
        if workers is None:
            rank_zero_warn(
                f"EASGD resume: the checkpoint holds no worker states (saved with save_worker_states=False); all "
                f"{self.world_size} workers start from the center."
            )
            return
        self._workers = workers
        if saved_p != self.world_size:
            kept = min(saved_p, self.world_size)
            rank_zero_warn(
                f"EASGD resume: the checkpoint has {saved_p} workers and this run has {self.world_size}; "
                f"own weights and optimizer state restored: {_workers(0, kept)}"
                + (f"; starting from the center: {_workers(kept, self.world_size)}" if self.world_size > kept else "")
                + (f"; dropped: {_workers(kept, saved_p)}" if saved_p > kept else "")
                + f"; alpha is now {self._averager.alpha:g}."
            )
        if self.global_rank < len(workers):
            mine = workers[self.global_rank]
            self.lightning_module.load_state_dict(mine["state_dict"])
            self._pending_rng = mine["rng"]

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        workers = self._workers
        if workers is None:
            super().load_optimizer_state_dict(checkpoint)
            return
        if self.global_rank < len(workers):
            states = workers[self.global_rank]["optimizer_states"]
        else:
            # A new worker keeps the optimizer's hyperparameters (an LR schedule may have changed them) but no
            # per-parameter state: momentum belongs to another worker's trajectory.
            states = [{"state": {}, "param_groups": s["param_groups"]} for s in workers[0]["optimizer_states"]]
        for optimizer, state in zip(self.optimizers, states):
            optimizer.load_state_dict(state)
            _optimizer_to_device(optimizer, self.root_device)
        self._workers = None
        if self._pending_rng is not None:
            # This is the last restore step before the fit loop creates the first epoch's data iterator, which
            # draws its base seed from the global generator (the sanity check runs under isolate_rng).
            restore_rng_state(self._pending_rng)
            self._pending_rng = None

    # ------------------------------------------------------------------ registration

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        entries = [("easgd", "popen"), ("easgd_spawn", "spawn")]
        if "fork" in torch.multiprocessing.get_all_start_methods():
            entries.append(("easgd_fork", "fork"))
        for name, start_method in entries:
            strategy_registry.register(
                name,
                cls,
                description=f"Synchronous Elastic Averaging SGD with start_method '{start_method}'",
                start_method=start_method,
            )


def _workers(start: int, stop: int) -> str:
    return f"worker {start}" if stop - start == 1 else f"workers {start}-{stop - 1}"


def _refuse_ddp_options(kwargs: Mapping[str, Any]) -> None:
    for name in kwargs:
        if name in _DDP_COMM_OPTIONS:
            raise ValueError(f"EASGDStrategy does not accept {name}={kwargs[name]!r}: {_DDP_COMM_OPTIONS[name]}.")
        if name in _DDP_WRAPPER_OPTIONS:
            raise ValueError(
                f"EASGDStrategy does not accept {name}={kwargs[name]!r}: it is an option of DistributedDataParallel, "
                "and EASGD never wraps the model in DistributedDataParallel (workers train independently between "
                "exchanges)."
            )
    if kwargs:
        raise TypeError(f"EASGDStrategy got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
