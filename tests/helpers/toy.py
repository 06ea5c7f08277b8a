"""The toy model and its data: a small regressor (and variants that fail or use two optimizers) the tests train."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import TensorDataset

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


def leave_collectives_in_flight(count: int = 20) -> None:
    """Start ``count`` all-reduces on the world group, wait for none and drop their work objects, as the exchange drops
    its own: only gloo's threads then hold them, the case in which a process group left to the interpreter's
    finalization aborted the process at exit. (Kept alive in Python, they did not crash it.)"""
    for _ in range(count):
        dist.all_reduce(torch.ones(1000), async_op=True)


class InFlightAtExitRegressor(ToyRegressor):
    """Ends ``fit`` with collectives in flight (:func:`leave_collectives_in_flight`)."""

    def on_fit_end(self) -> None:
        leave_collectives_in_flight()


class Shards(tuple):
    """The batches of a worker's ranks at one micro-batch, kept apart (see ToyRegressor.replay_backward)."""


def twins(cls: type[ToyRegressor], seed: int, **kwargs: Any) -> tuple[ToyRegressor, ToyRegressor]:
    """A freshly initialised module to train and an identical copy for the replay."""
    torch.manual_seed(seed)
    module = cls(**kwargs)
    copy_ = cls(**kwargs)
    copy_.load_state_dict(module.state_dict())
    return module, copy_
