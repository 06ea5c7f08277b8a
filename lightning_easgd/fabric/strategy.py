"""EASGDFabricStrategy: Elastic Averaging SGD for a training loop written with Lightning Fabric.

The Fabric twin of :class:`~lightning_easgd.EASGDStrategy`, over the same core
(:class:`~lightning_easgd.core.ElasticAverager`). It subclasses Fabric's
:class:`~lightning.fabric.strategies.DDPStrategy` for the launchers, cluster environments, process-group setup and
the DistributedSampler. With one rank per worker it never wraps the module in DistributedDataParallel, so between
exchanges nothing is communicated; with worker groups it wraps it in DistributedDataParallel on the worker's own
process group only.

Where the exchange happens in a Fabric loop (``forward → fabric.backward → optimizer.step``): the strategy opens
the step at the step's first training forward pass (module in training mode, autograd on), and measures d_i = x_i − x̃
there, before that forward changes BatchNorm's running statistics, which is where the Trainer strategy measures
it; if the step has no such forward (a closure passed to ``optimizer.step``), at ``optimizer.step()``. The step
closes after the optimizer's update, with the elastic pull. So with ``overlap=True`` the all-reduce runs during the
forward, the backward and the optimizer update.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.fabric.strategies.strategy import _BackwardSyncControl, _validate_keys_for_strict_loading
from lightning.fabric.utilities.types import _PATH, Optimizable, _Stateful
from torch.nn import Module
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_easgd.adapter.layout import WorkerLayout
from lightning_easgd.adapter.options import register_start_methods
from lightning_easgd.checkpoint.atomic_io import AtomicCheckpointIO
from lightning_easgd.checkpoint.routines import WorkerCheckpointing, hyperparameters_only
from lightning_easgd.checkpoint.section import CHECKPOINT_KEY, check_section
from lightning_easgd.checkpoint.worker_files import CHECKPOINT_FORMAT
from lightning_easgd.core import DEFAULT_BETA, ElasticAverager, ExchangeConfig
from lightning_easgd.core.family import WorkerPull
from lightning_easgd.core.worker import NonFinitePolicy


class EASGDFabricStrategy(WorkerLayout, DDPStrategy):
    """Synchronous Elastic Averaging SGD (Zhang, Choromanska & LeCun, NIPS 2015, Eq. 5-6) for Fabric.

    Each of the p workers trains its own copy x_i with its own optimizer. Every ``optimizer.step()`` is one tick
    of the clock t; at the start of every step with t > 0 and t % tau == 0 each worker takes d_i = x_i − x̃ and,
    after its optimizer's update, x_i −= α·d_i and x̃ += α·Σ_i d_i, with Σ_i d_i from one SUM all-reduce. The center
    x̃ is replicated, bit-identical, on every rank. ``torch.optim.SGD`` gives EASGD, ``SGD(momentum=δ,
    nesterov=True)`` gives EAMSGD.

    Use::

        fabric = Fabric(strategy=EASGDFabricStrategy(tau=4))  # or Fabric(strategy="easgd")
        fabric.launch()
        model, optimizer = fabric.setup(model, optimizer)      # one model per run
        ...                                                    # forward, fabric.backward(loss), optimizer.step()
        with fabric.strategy.center():                         # evaluate the center
            ...
        fabric.save(path, {"model": model, "optimizer": optimizer, ...})   # center + each worker's state
        fabric.strategy.adopt_center()                         # end: the model holds the center for good

    What takes part in the exchange: every parameter and floating-point buffer of the model; integer buffers stay
    local. All ranks start from rank 0's weights (broadcast by ``fabric.setup``).

    Args:
        tau: communication period τ, in ``optimizer.step()`` calls (every call of every set-up optimizer counts).
        alpha: moving rate α = ηρ in (0, 1). Default: α = β/p.
        beta: β = p·α used when ``alpha`` is None; the paper uses 0.9. Must be < 2; values above 1 warn.
        overlap: start the all-reduce when the step opens (its first training forward pass) and wait for it after
            the optimizer's update (True), or wait for it before the step's forward runs (False). Same arithmetic.
            Default: True, and False with ``center_device="cpu"`` (True is refused there).
        bucket_cap_mb: size of the flat buffers that each all-reduce carries. Default: 25 MB on CPU, 256 MB on CUDA.
        save_worker_states: ``fabric.save`` also writes every worker's local weights, optimizer state and RNG state,
            each by its own rank to its own file beside the checkpoint (see
            :mod:`lightning_easgd.checkpoint.worker_files`), so that ``fabric.load`` reproduces the uninterrupted run.
            Without them a resumed run restarts every worker from the center.
        on_nonfinite: the divergence guard. ``"raise"`` (default): every rank raises
            :class:`~lightning_easgd.core.NonFiniteWorkerError` naming the workers and the step. ``"reset"``: the
            diverged workers' contributions are dropped, they restart from the center with empty optimizer state,
            and a warning names them.
        ranks_per_worker: k, the ranks that form one EASGD worker, or ``"node"``; as for
            :class:`~lightning_easgd.EASGDStrategy`. With k > 1 ``fabric.setup`` wraps the model in
            DistributedDataParallel on the worker's process group, and ``fabric.no_backward_sync`` is its ``no_sync``.
        center_device, exchange_dtype, center_momentum, center_nesterov, warmup_steps, warmup_tau,
        per_tensor_distances: as for :class:`~lightning_easgd.EASGDStrategy` (a host-resident center, a bfloat16
            exchange, momentum on the center, whose velocity travels in ``fabric.save`` checkpoints, a warm-up
            exchange schedule, and every tensor's distance to the center measured at each exchange).
        worker_pull, sync_steps: as for :class:`~lightning_easgd.EASGDStrategy` (the reset rule of local SGD, SlowMo
            and DiLoCo; a synchronous start). In the synchronous start the gradients are averaged over the workers at
            ``fabric.clip_gradients`` if the step clips (so clipping sees DDP's averaged gradients), else at
            ``optimizer.step()`` (inside the closure when one is passed).
        sync_epochs: refused unless 0: Fabric never sees the loop's length, so pass
            ``sync_steps = epochs × optimizer steps per epoch`` instead.
        timeout: how long collectives, the exchange included, may wait for a peer before failing with an error.
        accelerator, parallel_devices, cluster_environment, checkpoint_io, precision, process_group_backend,
        start_method: as for :class:`~lightning.fabric.strategies.DDPStrategy`; ``checkpoint_io`` defaults to
            :class:`~lightning_easgd.checkpoint.atomic_io.AtomicCheckpointIO`.
        **kwargs: with ``ranks_per_worker`` > 1, ``find_unused_parameters``, ``gradient_as_bucket_view`` and
            ``static_graph`` are passed to the DistributedDataParallel inside each worker.

    Raises:
        ValueError: for an invalid option (same checks and messages as :class:`~lightning_easgd.EASGDStrategy`:
            :class:`~lightning_easgd.core.config.ExchangeConfig` and
            :class:`~lightning_easgd.adapter.options.AdapterOptions`), and options of DistributedDataParallel
            other than those the DDP inside a worker group takes. At setup: a world size that ``ranks_per_worker``
            does not divide.
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
        precision: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
        **kwargs: Any,
    ) -> None:
        self._keep_options(locals())  # the adapter's own options, and those this class does not implement
        self.config = ExchangeConfig.from_options(locals())  # the exchange's options, validated once, in the core
        if self.config.sync_epochs:
            raise ValueError(
                f"{type(self).__name__} does not accept sync_epochs={self.config.sync_epochs}: Fabric never sees the "
                "training loop's length, so the epochs cannot be turned into optimizer steps; pass sync_steps = "
                "epochs x optimizer steps per epoch instead"
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=AtomicCheckpointIO() if checkpoint_io is None else checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self._backward_sync_control = _WorkerGradientSync()
        self._checkpointing = WorkerCheckpointing(self)
        self._averager: ElasticAverager | None = None
        self._module: Module | None = None
        self._wrapped: Module | None = None  # what setup_module returned: the module, or its DDP in a worker group
        self._optimizers: list[Optimizer] = []
        self._hook: RemovableHandle | None = None
        self._step: ExitStack | None = None  # the optimizer step in progress (opened, not yet closed)
        self._exchange_in_flight = False  # whether that step started an exchange

    # ------------------------------------------------------------------ properties

    @property
    def averager(self) -> ElasticAverager | None:
        """The exchange between this worker and the center (statistics: ``averager.track_distances()`` and
        ``averager.pop_stats()``); None before ``fabric.setup`` and after :meth:`adopt_center`."""
        return self._averager

    # ------------------------------------------------------------------ setup

    @override
    def setup_module(self, module: Module) -> Module:
        """Broadcast rank 0's weights and start the exchange over the module's tensors. The module is wrapped in
        DistributedDataParallel on its worker's process group with worker groups, and not wrapped otherwise."""
        if self._module is not None:
            raise ValueError(
                f"{type(self).__name__} trains one model per run, and fabric.setup() was already called with a "
                f"{type(self._module).__name__}; EASGD averages that model's weights with its center."
            )
        self._averager = self._start_exchange(module, type(self).__name__, self._elastic_averager)
        self._module = module
        self._hook = module.register_forward_pre_hook(self._open_step_on_forward)
        if self.worker_group is not None:
            # Inside a worker, gradients are averaged every step by DDP on the worker's own process group.
            self._ddp_kwargs = {"process_group": self.worker_group, **self._worker_ddp_kwargs}
            self._wrapped = super().setup_module(module)
        else:
            self._wrapped = module
        return self._wrapped

    @override
    def teardown(self) -> None:
        super().teardown()
        self._release_groups()

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        self._optimizers.append(optimizer)
        return optimizer

    # ------------------------------------------------------------------ training

    def _open_step_on_forward(self, module: Module, args: Any) -> None:
        # The first training forward after a step opens the next one: d_i is measured before this forward updates
        # any buffer, and the all-reduce overlaps the forward and backward. Evaluation passes (eval mode or no grad)
        # and passes on the swapped-in center do not count. A training-mode forward may change buffers (BatchNorm)
        # without a step: a save after it writes its own worker files rather than sharing the last save's.
        if module.training:
            self._checkpointing.touch()
        if self._step is None and module.training and torch.is_grad_enabled():
            assert self._averager is not None
            if not self._averager.center_in_use:
                self._open_step()

    def _open_step(self) -> ExitStack:
        if self._step is None:
            averager = self._require_averager("optimizer.step()")
            if averager.center_in_use:
                raise RuntimeError(
                    "optimizer.step() was called inside `with fabric.strategy.center():`; the center's values are "
                    "swapped into the model there. Step outside the block."
                )
            due = averager.exchange_due
            stack = ExitStack()
            stack.enter_context(averager.step())
            self._step, self._exchange_in_flight = stack, due
        return self._step

    @override
    def optimizer_step(self, optimizer: Optimizable, **kwargs: Any) -> Any:
        """Close the step the first forward pass opened (or open it now), around the optimizer's update."""
        step = self._open_step()
        try:
            with step:
                assert self._averager is not None
                if self._averager.synchronous:
                    kwargs = self._average_gradients(optimizer, kwargs)
                output = super().optimizer_step(optimizer, **kwargs)
        finally:
            self._step, self._exchange_in_flight = None, False
        self._apply_resets(self._optimizers)
        return output

    def _average_gradients(self, optimizer: Optimizable, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The synchronous start's gradient average for ``optimizer``'s parameters: now, or after the closure that
        ``optimizer.step(closure)`` computes the gradients in. Returns the step's keyword arguments."""
        averager = self._require_averager("optimizer.step()")
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        closure = kwargs.get("closure")
        if closure is None:
            averager.average_gradients(parameters)
            return kwargs

        def averaged() -> Any:
            output = closure()
            averager.average_gradients(parameters)
            return output

        return {**kwargs, "closure": averaged}

    def _average_before_clipping(self, optimizer: Optimizer) -> None:
        """In the synchronous start, clip DDP's averaged gradients rather than this worker's own."""
        if self._averager is not None and self._averager.synchronous:
            self._open_step()
            self._average_gradients(optimizer, {})

    @override
    def clip_gradients_norm(
        self,
        module: Module,
        optimizer: Optimizer,
        max_norm: float,
        norm_type: float = 2.0,
        error_if_nonfinite: bool = True,
    ) -> torch.Tensor:
        self._average_before_clipping(optimizer)
        return super().clip_gradients_norm(module, optimizer, max_norm, norm_type, error_if_nonfinite)

    @override
    def clip_gradients_value(self, module: Module, optimizer: Optimizer, clip_val: float) -> None:
        self._average_before_clipping(optimizer)
        super().clip_gradients_value(module, optimizer, clip_val)

    # ------------------------------------------------------------------ the center

    @contextmanager
    def center(self) -> Iterator[None]:
        """Run a block with the center's values in the set-up model (e.g. to evaluate it).

        The same Parameter objects receive the center's values and get this worker's own values back, exactly,
        when the block ends; the optimizer and its state are not touched. Collective-free.
        """
        averager = self._require_averager("fabric.strategy.center()")
        self._refuse_in_flight("fabric.strategy.center()")
        with averager.center_weights():
            yield

    def adopt_center(self) -> None:
        """End EASGD: the model holds the center for good, on every rank (call it on all ranks after the loop).

        The local weights are dropped and the exchange stops: further ``optimizer.step()`` calls raise, and
        ``fabric.save`` then writes the model as it is, like any unwrapped model.
        """
        averager = self._require_averager("fabric.strategy.adopt_center()")
        self._refuse_in_flight("fabric.strategy.adopt_center()")
        averager.adopt_center()
        assert self._hook is not None
        self._hook.remove()
        self._averager = self._hook = None

    def _require_averager(self, what: str) -> ElasticAverager:
        if self._averager is None:
            raise RuntimeError(
                f"{what} needs the model set up with EASGD: call fabric.setup(model, optimizer) first"
                + ("; EASGD ended when fabric.strategy.adopt_center() was called" if self._module is not None else "")
            )
        return self._averager

    def _refuse_in_flight(self, what: str) -> None:
        if self._exchange_in_flight:
            raise RuntimeError(
                f"{what} was called in the middle of an optimizer step: an exchange started at the step's first "
                "training forward pass and completes at optimizer.step(). Call it between optimizer steps."
            )

    def _is_set_up(self, obj: object) -> bool:
        """Whether ``obj`` is the set-up model (Fabric hands the strategy the DDP wrapper in a worker group)."""
        return self._module is not None and (obj is self._module or obj is self._wrapped)

    # ------------------------------------------------------------------ checkpoints (checkpoint/routines.py)

    @override
    def get_module_state_dict(self, module: Module) -> dict[str, Any]:
        """The set-up model's state with the center's values, whatever the model holds right now."""
        state = super().get_module_state_dict(module)
        if not self._is_set_up(module) or self._averager is None:
            return state
        return self._checkpointing.center_state(self._averager, state)

    @override
    def save_checkpoint(
        self,
        path: _PATH,
        state: dict[str, Module | Optimizer | Any],
        storage_options: Any | None = None,
        filter: dict[str, Any] | None = None,
    ) -> None:
        """Rank 0 writes the center (as the model's entry), the user's other entries and EASGD's metadata; with
        ``save_worker_states`` every rank first writes its own state to its own file (collective), and the main
        file keeps only the optimizers' hyperparameters."""
        averager = self._averager
        if averager is None:
            super().save_checkpoint(path, state, storage_options, filter)
            return
        if CHECKPOINT_KEY in state:
            raise ValueError(f"fabric.save(): the state key {CHECKPOINT_KEY!r} is reserved for EASGD's metadata")
        if not any(self._is_set_up(obj) for obj in state.values()):
            raise ValueError(
                f"fabric.save(): the state ({', '.join(map(repr, state))}) has no entry holding the model set up "
                "with EASGD; its entry carries the center, so include it (e.g. state={'model': model, ...})"
            )
        self._refuse_in_flight("fabric.save()")
        assert self._module is not None
        optimizer_states = [opt.state_dict() for opt in self._optimizers]
        section = self._checkpointing.save(path, averager, module_state=self._module.state_dict,
                                           optimizer_states=optimizer_states, storage_options=storage_options)
        if "worker_files" in section:
            # Rank 0's per-parameter state (CUDA tensors on its GPU) would otherwise be loaded by every rank.
            stripped = {id(opt): hyperparameters_only(s) for opt, s in zip(self._optimizers, optimizer_states)}
            state = {key: stripped.get(id(obj), obj) for key, obj in state.items()}
        super().save_checkpoint(path, {**state, CHECKPOINT_KEY: section}, storage_options, filter)
        self._checkpointing.saved(path, section)

    @override
    def load_module_state_dict(self, module: Module, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Loading weights into the set-up model moves the center and this worker there (every rank loads the same
        file, so the center stays identical everywhere). The center takes the given values as they are, before
        the model's precision rounds them."""
        if not self._is_set_up(module) or self._averager is None:
            super().load_module_state_dict(module, state_dict, strict)
            return
        if self._averager.center_in_use:
            raise RuntimeError("cannot load weights into the model inside `with fabric.strategy.center():`")
        self._refuse_in_flight("loading the model's weights")
        super().load_module_state_dict(module, state_dict, strict)
        assert self._module is not None
        self._checkpointing.touch()
        current = self._module.state_dict()
        center = {name: state_dict.get(name, current[name]) for name in self._averager.names}
        self._averager.load_state_dict({"clock": self._averager.clock, "center": center})

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        state: Module | Optimizer | dict[str, Module | Optimizer | Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Restore the center and the clock, and give every worker back its own weights, optimizer state and RNG
        state (workers the checkpoint did not have start from the center with empty optimizer state). Every rank
        reads the main file into host memory (``map_location="cpu"``), not onto the device it was saved from."""
        if self._averager is None or not isinstance(state, dict) or not state:
            return super().load_checkpoint(path, state, strict, weights_only)
        if self._step is not None:
            raise RuntimeError("fabric.load() was called between a training forward pass and optimizer.step()")
        remainder = self._load_entries(path, state, strict, weights_only)
        section = remainder.pop(CHECKPOINT_KEY, None)
        if section is None or not any(self._is_set_up(obj) for obj in state.values()):
            return remainder
        section = check_section(path, section, formats=(CHECKPOINT_FORMAT,))
        assert self._module is not None
        resume = self._checkpointing.resume(os.fspath(path), section, self._averager, self._module)
        if resume is not None:
            resume.restore(self._optimizers, only=[obj for obj in state.values() if isinstance(obj, Optimizer)])
        return remainder

    def _load_entries(self, path: _PATH, state: dict[str, Any], strict: bool, weights_only: bool | None
                      ) -> dict[str, Any]:
        """Fabric's own restore of ``state``'s entries (``Strategy.load_checkpoint``), from a file read to the host."""
        torch.cuda.empty_cache()
        checkpoint = self.checkpoint_io.load_checkpoint(path, map_location="cpu", weights_only=weights_only)
        _validate_keys_for_strict_loading(state.keys(), checkpoint.keys(), strict=strict)
        for name, obj in state.copy().items():
            if name not in checkpoint:
                continue
            if isinstance(obj, Module):
                self.load_module_state_dict(module=obj, state_dict=checkpoint.pop(name), strict=strict)
            elif isinstance(obj, _Stateful):
                obj.load_state_dict(checkpoint.pop(name))
            else:
                state[name] = checkpoint.pop(name)
        return checkpoint

    # ------------------------------------------------------------------ registration

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        register_start_methods(strategy_registry, cls, "easgd", "Synchronous Elastic Averaging SGD (Fabric)")


class _WorkerGradientSync(_BackwardSyncControl):
    """``fabric.no_backward_sync(model)``: with worker groups, DDP's ``no_sync`` inside the worker; with one rank
    per worker a no-op (EASGD never synchronises gradients between workers), so loops written for DDP (skipping
    the sync on accumulation steps) run unchanged."""

    @override
    def no_backward_sync(self, module: Module, enabled: bool) -> AbstractContextManager:
        if enabled and isinstance(module, DistributedDataParallel):
            return module.no_sync()
        return nullcontext()
