"""A toy model, its data, and an independent single-process replay of the paper's synchronous EASGD rule.

The replay never touches lightning_easgd: it implements Eq. 5-6 with plain tensor arithmetic on p model copies fed
exactly the batches Lightning's shuffling DistributedSampler gives each rank, so the tests can compare every weight
of every worker and of the center against it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

IN, HIDDEN = 6, 8


def make_dataset(n: int = 48, dtype: torch.dtype = torch.float64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g, dtype=dtype)
    w = torch.randn(IN, 1, generator=g, dtype=dtype)
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, 1, generator=g, dtype=dtype)
    return TensorDataset(x, y)


class ToyRegressor(L.LightningModule):
    """A small MLP; options add BatchNorm (buffers), dropout (randomness) and momentum (optimizer state)."""

    def __init__(
        self,
        lr: float = 0.05,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        batchnorm: bool = False,
        dropout: float = 0.0,
        dtype: str = "float64",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(IN, HIDDEN)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(HIDDEN))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(HIDDEN, 1))
        self.net = nn.Sequential(*layers).to(getattr(torch, dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch), sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        h = self.hparams
        return torch.optim.SGD(
            self.parameters(), lr=h.lr, momentum=h.momentum, nesterov=h.nesterov, weight_decay=h.weight_decay
        )

    # The replay's view of optimizer steps, yielded to the driver, which wraps each in the exchange. As in
    # Lightning's automatic optimization, all but the last accumulated micro-batch run before the step, and the
    # last one runs inside it (the closure), so buffers are measured before that forward pass.
    def replay_steps(self, micro_batches: list[Any]) -> Iterator[Callable[[], None]]:
        (optimizer,) = self._replay_optimizers
        optimizer.zero_grad()
        for batch in micro_batches[:-1]:
            self.replay_backward(batch, len(micro_batches))

        def closure_and_step() -> None:
            self.replay_backward(micro_batches[-1], len(micro_batches))
            optimizer.step()

        yield closure_and_step

    def replay_backward(self, batch: Any, divisor: int) -> None:
        """Backward of one micro-batch's loss / ``divisor``; for :class:`Shards`, what DDP does inside a worker:
        every rank starts from the first rank's buffers and updates them with its own batch, the gradient is the
        mean of the ranks' gradients, and the worker keeps its first rank's buffers."""
        if not isinstance(batch, Shards):
            (self.loss(batch) / divisor).backward()
            return
        start = {name: b.clone() for name, b in self.named_buffers()}
        first: dict[str, Tensor] = {}
        for j, shard in enumerate(batch):
            with torch.no_grad():
                for name, b in self.named_buffers():
                    b.copy_(start[name])
            (self.loss(shard) / divisor / len(batch)).backward()
            if j == 0:
                first = {name: b.clone() for name, b in self.named_buffers()}
        with torch.no_grad():
            for name, b in self.named_buffers():
                b.copy_(first[name])


class NaNLossRegressor(ToyRegressor):
    """Worker ``nan_rank``'s loss is NaN at optimizer step ``nan_step``: a diverging worker."""

    def __init__(self, nan_rank: int = 1, nan_step: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.nan_rank, self.nan_step = nan_rank, nan_step
        self.replay_position: tuple[int, int] | None = None  # (rank, step), set by the replay

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.poison(self.loss(batch), (self.global_rank, self.global_step))

    def poison(self, loss: Tensor, position: tuple[int, int] | None) -> Tensor:
        return loss * float("nan") if position == (self.nan_rank, self.nan_step) else loss

    def replay_steps(self, micro_batches: list[Any]) -> Iterator[Callable[[], None]]:
        (optimizer,) = self._replay_optimizers
        (batch,) = micro_batches
        optimizer.zero_grad()

        def closure_and_step() -> None:
            self.poison(self.loss(batch), self.replay_position).backward()
            optimizer.step()

        yield closure_and_step


class TwoOptimizerRegressor(ToyRegressor):
    """Manual optimization with two optimizers, each stepping its own layer once per batch."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        first, second = self.optimizers()
        for opt in (first, second):
            opt.zero_grad()
            self.manual_backward(self.loss(batch))
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        lr = self.hparams.lr
        return [torch.optim.SGD(self.net[0].parameters(), lr=lr), torch.optim.SGD(self.net[-1].parameters(), lr=lr)]

    def replay_steps(self, micro_batches: list[Any]) -> Iterator[Callable[[], None]]:
        (batch,) = micro_batches
        for opt in self._replay_optimizers:
            opt.zero_grad()
            self.loss(batch).backward()
            yield opt.step


class Shards(tuple):
    """The batches of a worker's ranks at one micro-batch, kept apart (see ToyRegressor.replay_backward)."""


def twins(cls: type[ToyRegressor], seed: int, **kwargs: Any) -> tuple[ToyRegressor, ToyRegressor]:
    """A freshly initialised module to train and an identical copy for the replay."""
    torch.manual_seed(seed)
    module = cls(**kwargs)
    copy_ = cls(**kwargs)
    copy_.load_state_dict(module.state_dict())
    return module, copy_


def rank_batches(dataset: TensorDataset, p: int, rank: int, epoch: int, batch_size: int, seed: int) -> list[Any]:
    """The batches Lightning's injected DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED) gives ``rank``."""
    sampler = DistributedSampler(dataset, num_replicas=p, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(DataLoader(dataset, batch_size=batch_size, sampler=sampler))


@dataclass
class Replay:
    center: dict[str, Tensor]
    workers: list[dict[str, Tensor]]
    epoch_centers: list[dict[str, Tensor]] = field(default_factory=list)
    epoch_workers: list[list[dict[str, Tensor]]] = field(default_factory=list)
    exchanges: list[dict[str, Any]] = field(default_factory=list)  # per exchange: step, distances, norms, ...


def replicas(
    module: ToyRegressor, p: int
) -> tuple[list[ToyRegressor], list[dict[str, Tensor]], list[str], dict[str, Tensor]]:
    """What every replay starts from: p training copies of ``module`` holding their optimizers, their state dicts
    (detached views sharing storage with each copy's tensors), the names of the floating-point entries (what the
    exchange averages) and a center that starts at the copies' common value."""
    workers = [copy.deepcopy(module) for _ in range(p)]
    for w in workers:
        w.train()
        opts = w.configure_optimizers()
        w._replay_optimizers = opts if isinstance(opts, list) else [opts]
    states = [w.state_dict() for w in workers]
    floats = [k for k, v in states[0].items() if v.is_floating_point()]
    center = {k: states[0][k].clone() for k in floats}
    return workers, states, floats, center


def replay_easgd(
    module: ToyRegressor,
    dataset: TensorDataset,
    *,
    p: int,
    tau: int,
    alpha: float,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    accumulate: int = 1,
    autocast: torch.dtype | None = None,
    reset_nonfinite: bool = False,
    ranks_per_worker: int = 1,
    exchange_dtype: torch.dtype | None = None,
    union_batches: bool = True,
) -> Replay:
    """Run Eq. 5-6 of the paper on p copies of ``module`` in one process.

    At the start of step t with t > 0 and t % tau == 0: d_i = x_i − x̃ (parameters and floating-point buffers,
    before the step), then the local step, then x_i −= α·d_i and x̃ += α·Σ_i d_i. With ``reset_nonfinite``, a
    worker whose d_i is not finite is left out of the sum and restarts from the new center with no optimizer state.

    With ``ranks_per_worker`` = k, worker g is ranks g·k ... g·k + k − 1 of p·k DistributedSampler shards, and its
    batch is the union of theirs: for a mean loss over equal-sized batches the gradient of the union is the mean of
    the ranks' gradients, which is what DDP computes inside a worker. With ``exchange_dtype``, every d_i is rounded
    to it and summed in it (a p = 2 sum rounds once, so it is exact whatever order a collective adds in).
    With ``union_batches=False`` the ranks' batches stay apart (:class:`Shards`), for models whose loss is not a
    mean over samples (BatchNorm), at the cost of a backward per rank.
    """
    workers, states, floats, center = replicas(module, p)
    # 16-bit weights: the center and d in float32, the pull computed there and rounded once into the weights.
    center = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in center.items()}
    result = Replay(center=center, workers=[])
    size = ranks_per_worker
    t = 0
    for epoch in range(epochs):
        shards = [rank_batches(dataset, p * size, r, epoch, batch_size, seed) for r in range(p * size)]
        per_rank = [
            [[torch.cat(parts) for parts in zip(*batches)] if union_batches else Shards(batches)
             for batches in zip(*shards[g * size : (g + 1) * size])]
            for g in range(p)
        ]
        for start in range(0, len(per_rank[0]), accumulate):
            ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
            with ctx:
                gens = [w.replay_steps(per_rank[r][start : start + accumulate]) for r, w in enumerate(workers)]
                for steps in zip(*gens):
                    for r, w in enumerate(workers):
                        w.replay_position = (r, t)
                    with torch.no_grad():
                        exchange = t > 0 and t % tau == 0
                        diffs = ([{k: s[k].to(center[k].dtype) - center[k] for k in floats} for s in states]
                                 if exchange else [])
                    for step in steps:
                        step()
                    with torch.no_grad():
                        if exchange:
                            bad = [not all(d[k].isfinite().all() for k in floats) for d in diffs]
                            assert reset_nonfinite or not any(bad)
                            wire = exchange_dtype
                            total = {
                                k: sum((d[k] if wire is None else d[k].to(wire)) for d, b in zip(diffs, bad) if not b)
                                for k in floats
                            }
                            for s, d in zip(states, diffs):
                                for k in floats:
                                    s[k].copy_(s[k].to(d[k].dtype) - alpha * d[k])
                            norms = [torch.sqrt(sum((d[k].double() ** 2).sum() for k in floats)) for d in diffs]
                            layers = [{k: float(d[k].double().norm()) for k in floats} for d in diffs]
                            cnorm = torch.sqrt(sum((center[k].double() ** 2).sum() for k in floats))
                            result.exchanges.append(
                                {"step": t, "distances": [float(n) for n in norms], "center_norm": float(cnorm),
                                 "layers": layers}
                            )
                            for k in floats:
                                center[k].add_(alpha * torch.as_tensor(total[k]).to(center[k].dtype))
                            for s, w, b in zip(states, workers, bad):
                                if b:
                                    for k in floats:
                                        s[k].copy_(center[k])
                                    for opt in w._replay_optimizers:
                                        opt.state.clear()
                    t += 1
        result.epoch_centers.append({k: v.clone() for k, v in center.items()})
        result.epoch_workers.append([{k: v.clone() for k, v in s.items()} for s in states])
    result.workers = [{k: v.clone() for k, v in s.items()} for s in states]
    return result


class Recorder(L.Callback):
    """Saves, on every rank, what the tests compare: local weights, the center, and what evaluation saw."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.val_seen: list[dict[str, Tensor]] = []
        self.collectives: list[tuple[int, dict[str, int]]] = []
        self.traffic: list[tuple[int, list[tuple[str, tuple[int, ...], int]]]] = []  # per batch, see TRAFFIC
        self._traffic_at = 0
        self.start_state: dict[str, Tensor] = {}
        self._before: dict[str, int] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.start_optim = [copy.deepcopy(o.state_dict()) for o in trainer.optimizers]

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not trainer.sanity_checking and args[-1] == 0:  # first batch of a real validation run
            self.val_seen.append({k: v.clone() for k, v in pl_module.state_dict().items()})

    # Collectives are counted over the whole training loop iteration of each batch: from the end of the previous
    # batch (or the start of the epoch, or the end of a validation run) to the end of this one, so that whatever
    # the loop does before `on_train_batch_start` counts too.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before = dict(COUNTS)
        self._traffic_at = len(TRAFFIC)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._before = dict(COUNTS)
        self._traffic_at = len(TRAFFIC)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        diff = {k: COUNTS.get(k, 0) - self._before.get(k, 0) for k in COUNTS}
        self.collectives.append((trainer.global_step, {k: v for k, v in diff.items() if v}))
        self.traffic.append((trainer.global_step, TRAFFIC[self._traffic_at :]))
        self._before = dict(COUNTS)
        self._traffic_at = len(TRAFFIC)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = trainer.strategy
        averager = strategy.averager
        torch.save(
            {
                "local": {k: v.clone() for k, v in pl_module.state_dict().items()},
                "center": {n: v.clone() for n, v in zip(averager.names, averager.center_values())},
                "val_seen": self.val_seen,
                "collectives": self.collectives,
                "traffic": self.traffic,
                "bytes_per_exchange": averager.bytes_per_exchange,
                "start_state": self.start_state,
                "start_optim": self.start_optim,
                "optim": [o.state_dict() for o in trainer.optimizers],
                "alpha": averager.alpha,
                "buckets": len(averager.layout.buckets),
                "wrapped": type(strategy.model).__name__,
                "topology": (strategy.num_workers, strategy.ranks_per_worker, strategy.worker_index,
                             strategy.rank_in_worker),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


COUNTS: dict[str, int] = {}
COLLECTIVES = (
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
    "reduce", "gather", "scatter", "barrier", "send", "recv", "isend", "irecv", "all_to_all", "all_to_all_single",
    "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "monitored_barrier",
    "all_gather_single",
)
TRAFFIC: list[tuple[str, tuple[int, ...], int]] = []
"""(collective, ranks of its group, bytes of its tensor) of every reduction and gather, in call order."""


def count_collectives(monkeypatch: Any) -> None:
    """Wrap every torch.distributed collective so that calls are counted (forked workers inherit the patch)."""
    import torch.distributed as dist

    COUNTS.clear()
    TRAFFIC.clear()
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def wrapper(*args: Any, __name: str = name, __original: Any = original, **kwargs: Any) -> Any:
            COUNTS[__name] = COUNTS.get(__name, 0) + 1
            if __name in ("all_reduce", "all_gather_single", "all_gather_into_tensor"):
                tensor = args[1] if __name != "all_reduce" else args[0]  # the input
                group = kwargs.get("group")
                ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else tuple(
                    range(dist.get_world_size()))
                TRAFFIC.append((__name, ranks, tensor.numel() * tensor.element_size()))
            return __original(*args, **kwargs)

        monkeypatch.setattr(dist, name, wrapper)
