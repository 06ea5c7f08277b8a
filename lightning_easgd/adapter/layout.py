"""The worker layout and the start of the exchange, shared by the Trainer and the Fabric strategies.

Both adapters are a ``DDPStrategy`` of their framework (Lightning's or Fabric's) with the same EASGD options; what
differs is only when they set the exchange up (the Trainer's ``setup``, Fabric's ``setup_module``) and how a step is
framed. Keeping which worker a rank belongs to, and the checks, warnings and construction of the exchange, in one
mixin keeps the two from drifting apart: this module imports nothing from ``lightning.pytorch``.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_easgd.adapter.module_state import elastic_tensors
from lightning_easgd.adapter.options import AdapterOptions, refuse_unused_worker_ddp_options, worker_ddp_options
from lightning_easgd.core import ElasticAverager
from lightning_easgd.core.buckets import check_device
from lightning_easgd.core.config import ExchangeConfig
from lightning_easgd.core.topology import WorkerTopology
from lightning_easgd.core.worker import ElasticWorker

log = logging.getLogger(__name__)

W = TypeVar("W", bound=ElasticWorker)

_CONFIG_OPTIONS = frozenset(ExchangeConfig.option_names())


@functools.cache  # once per process
def destroy_world_at_exit() -> None:
    """Destroy the default process group at interpreter exit, while Python is still whole.

    A gloo group left to the interpreter's finalization can abort the process with SIGABRT ("terminate called without
    an active exception"): its worker threads can still hold the work objects of collectives that have finished, and
    releasing their tensors then needs a GIL that is being torn down. Spawned workers exit that way after every
    ``fit``, and the exchange's collectives are asynchronous, so a run that trained correctly could end in a crash.
    Lightning registers the same handler for NCCL only; destroying an already destroyed world is a no-op here.
    """
    atexit.register(_destroy_world)


def _destroy_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class WorkerLayout:
    """Mixin for an EASGD strategy: its options, where this rank sits among the workers, and the exchange built on
    that.

    The class that mixes it in is a ``DDPStrategy`` (``world_size``, ``global_rank``, ``num_processes``,
    ``root_device``, ``_timeout``); its constructor calls :meth:`_keep_options` first, then sets :attr:`config`.
    Every option of :class:`~lightning_easgd.core.config.ExchangeConfig` reads as an attribute of the strategy
    (``strategy.tau``, ``strategy.beta``, ...), straight from :attr:`config`: there is one copy of each.
    """

    unsupported_options: ClassVar[Mapping[str, tuple[Any, str]]] = {}
    """Options this adapter accepts only at one value: name -> (that value, why). A subclass that builds another
    exchange declares what it does not implement here."""

    config: ExchangeConfig
    """The exchange's options, validated once; handed whole to the averager."""
    _adapter: AdapterOptions
    _worker_ddp_kwargs: dict[str, Any]  # for the DDP inside a worker group
    _topology: WorkerTopology | None  # resolved, with its process groups, from setup to teardown
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

    def _keep_options(self, arguments: Mapping[str, Any]) -> None:
        """Validate the adapter's own options among the constructor's arguments (its ``locals()``: the named
        options and ``kwargs``) and keep them, refusing first what this class does not implement
        (:attr:`unsupported_options`); the strategy then builds :attr:`config` from the same arguments.

        Raises:
            ValueError: naming the first invalid option, the value given and what is allowed (the same message
                from every adapter).
            TypeError: for an unknown keyword argument.
        """
        owner = type(self).__name__
        kwargs: Mapping[str, Any] = arguments["kwargs"]
        self._worker_ddp_kwargs = worker_ddp_options(kwargs, owner, grouped=arguments["ranks_per_worker"] != 1)
        self._adapter = AdapterOptions.validated(
            owner=owner, ranks_per_worker=arguments["ranks_per_worker"],
            save_worker_states=arguments["save_worker_states"], start_method=arguments["start_method"],
            unsupported=self.unsupported_options, given=arguments,
        )
        self._topology = None
        self._followers = ()
        self._state_keys = {}

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: the exchange's options, read from the one validated config.
        config = self.__dict__.get("config")
        if config is not None and name in _CONFIG_OPTIONS:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CONFIG_OPTIONS and "config" in self.__dict__:
            # A second copy would drift from the config the averager was (or will be) built from.
            raise AttributeError(
                f"{type(self).__name__}.{name} is read-only: the exchange's options are validated once, into "
                f"strategy.config; pass {name}=... to the constructor"
            )
        super().__setattr__(name, value)

    @property
    def save_worker_states(self) -> bool:
        """Whether checkpoints carry every worker's own state (local weights, optimizer, RNG)."""
        return self._adapter.save_worker_states

    def setup_environment(self) -> None:
        """The framework's own (which brings the default process group up on every path, a TorchElastic restart's
        included), then :func:`destroy_world_at_exit`."""
        super().setup_environment()  # type: ignore[misc]
        destroy_world_at_exit()

    # ------------------------------------------------------------------ the layout

    @property
    def topology(self) -> WorkerTopology:
        """Where this rank sits among the workers: resolved once at setup (``"node"`` included) with its process
        groups, and read from there by everything; before setup, from the processes known so far (no groups)."""
        if self._topology is not None:
            return self._topology
        return WorkerTopology.resolve(self._adapter.ranks_per_worker, self.world_size, self.global_rank,
                                      self.num_processes)

    @property
    def ranks_per_worker(self) -> int | str:
        """k, the ranks of one worker: an int after setup (``"node"`` resolves to the processes per node)."""
        return self._topology.ranks_per_worker if self._topology is not None else self._adapter.ranks_per_worker

    @property
    def num_workers(self) -> int:
        """p, the number of EASGD workers (world size / ranks per worker)."""
        return self.topology.num_workers

    @property
    def worker_index(self) -> int:
        """g, this rank's worker (global rank // ranks per worker)."""
        return self.topology.worker_index

    @property
    def rank_in_worker(self) -> int:
        """j, this rank's place in its worker (global rank % ranks per worker); it owns slice j of the center."""
        return self.topology.rank_in_worker

    @property
    def worker_group(self) -> dist.ProcessGroup | None:
        """The process group of this rank's worker after setup (None with one rank per worker)."""
        return self._topology.worker_group if self._topology is not None else None

    @property
    def state_keys(self) -> Mapping[str, int]:
        """For every ``state_dict`` key that names an averaged tensor, that tensor's index in the exchange (after
        setup; what a checkpoint needs to put the center's values under the module's keys)."""
        return self._state_keys

    @property
    def alpha(self) -> float | None:
        """The moving rate in use (resolved from β and the number of workers at setup when not given)."""
        return self._averager.alpha if self._averager is not None else self.config.alpha

    # ------------------------------------------------------------------ the exchange

    def _start_exchange(self, module: Module, name: str, create: Callable[[list[tuple[str, Tensor]]], W]) -> W:
        """Check the module, resolve the worker layout and build its process groups (collective), warn about what
        deserves it, and return the exchange that ``create`` builds over the module's elastic tensors (which then
        hold rank 0's values).

        Args:
            module: the model whose parameters and floating-point buffers the exchange averages.
            name: the strategy's name in the single-worker warning.
            create: builds the exchange from the elastic tensors (``self._topology`` and ``self._followers`` are
                set by then); the Trainer's is its overridable ``_create_averager``.
        """
        config = self.config
        check_device([*module.named_parameters(), *module.named_buffers()], self.root_device)
        if self._topology is None:  # once per setup; _release_groups destroys the groups at teardown
            self._topology = self.topology.with_groups(timeout=self._timeout)
        topology = self._topology
        refuse_unused_worker_ddp_options(self._worker_ddp_kwargs, self._adapter.ranks_per_worker,
                                         grouped=topology.worker_group is not None)
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
        warning = config.check_moving_rate(p)
        if warning:
            rank_zero_warn(warning)
        elastic, self._state_keys = elastic_tensors(module, config.bucket_cap_mb)  # collective: rank 0's values
        buffers = {id(t) for _, t in module.named_buffers()}
        self._followers = tuple(key for key, t in elastic if id(t) in buffers)
        averager = create(elastic)
        log.debug(
            "EASGD: %d workers of %d ranks, tau=%d, alpha=%g, %d tensors of %d bytes in %d buckets",
            p, topology.ranks_per_worker, config.tau, averager.alpha, len(elastic), averager.layout.nbytes,
            len(averager.layout.buckets),
        )
        return averager

    def _elastic_averager(self, elastic: list[tuple[str, Tensor]]) -> ElasticAverager:
        """The synchronous exchange over ``elastic`` with the whole config; with worker groups the float buffers
        follow the worker's first rank, as DDP broadcasts them."""
        topology = self._topology
        assert topology is not None
        return ElasticAverager(elastic, self.config, group=topology.column_group, worker_group=topology.worker_group,
                               follow_first_rank=self._followers if topology.worker_group is not None else ())

    def _release_groups(self, destroy: bool = True) -> None:
        """Destroy the worker and column process groups built at setup (teardown): on NCCL each holds a
        communicator, and a strategy set up again (``fit`` then ``validate``) builds its own. After a failure
        (``destroy=False``) they are only dropped: a peer may be gone, and destroying a communicator with a
        collective still in flight can block; the process group's teardown at exit takes them with it."""
        if self._topology is not None and destroy:
            self._topology.destroy_groups()
        self._topology = None

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
