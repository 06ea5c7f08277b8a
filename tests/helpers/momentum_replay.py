"""An independent single-process replay of synchronous EASGD with momentum on the center and any exchange steps.

Like ``toy.replay_easgd`` it never touches lightning_easgd: p model copies fed the batches Lightning's
DistributedSampler gives each rank, the elastic difference taken before the local step and applied after it, and
the center updated from the plain increment s = α·Σ_i d_i through a velocity v, per tensor:

    heavy ball:  v ← μ·v + s;   x̃ ← x̃ + v
    Nesterov:    v ← μ·v + s;   x̃ ← x̃ + μ·v + s

Which steps start with an exchange is the caller's predicate, so the schedule under test is written out separately.
A worker whose d_i is not finite is left out of the sum and restarts from the new center with no optimizer state
(``on_nonfinite="reset"``).

The elastic family: with ``reset`` a worker ends an exchange at the new center plus its own update of the step,
x_i ← x̃_new + (x_i' − x_i) (local SGD, SlowMo, DiLoCo); with ``sync_steps`` = N the steps t < N are DDP's: every
worker's gradient is computed at its own batch, the gradients and the floating-point buffers (updated by each
worker's forward) are averaged over the workers, and every worker steps with the average.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from helpers.replay import rank_batches, replicas
from helpers.toy import Shards, ToyRegressor


@dataclass
class MomentumReplay:
    center: dict[str, Tensor]
    velocity: dict[str, Tensor]
    workers: list[dict[str, Tensor]]
    exchange_steps: list[int] = field(default_factory=list)
    epoch_centers: list[dict[str, Tensor]] = field(default_factory=list)
    epoch_velocities: list[dict[str, Tensor]] = field(default_factory=list)


def every(tau: int, after: int = 0) -> Callable[[int], bool]:
    """The exchange schedule for ``due``, written from the issue's rule rather than the strategy's clock: step t
    exchanges when t > ``after`` and (t − ``after``) % τ == 0 (``after``: the synchronous start's length)."""
    return lambda t: t > after and (t - after) % tau == 0


def replay_center_momentum(
    module: ToyRegressor,
    dataset: TensorDataset,
    *,
    p: int,
    alpha: float,
    momentum: float,
    nesterov: bool,
    due: Callable[[int], bool],
    epochs: int,
    batch_size: int,
    seed: int,
    reset: bool = False,
    sync_steps: int = 0,
    ranks_per_worker: int = 1,
    union_batches: bool = True,
) -> MomentumReplay:
    """Run p workers for ``epochs`` epochs; step t starts with an exchange when ``due(t)``, and steps t <
    ``sync_steps`` average gradients instead. With ``ranks_per_worker`` = k, worker g's batch is the union of the
    DistributedSampler shards of ranks g·k ... g·k + k − 1 (the gradient DDP computes inside a worker, for a mean loss
    over equal batches); with ``union_batches=False`` the ranks' batches stay apart (:class:`Shards`: each rank's
    forward from the worker's first rank's buffers, the worker keeping its first rank's, as under DDP), for
    BatchNorm."""
    workers, states, floats, center = replicas(module, p)
    velocity = {k: torch.zeros_like(v) for k, v in center.items()}
    result = MomentumReplay(center=center, velocity=velocity, workers=[])
    k_ = ranks_per_worker
    t = 0
    for epoch in range(epochs):
        shards = [rank_batches(dataset, p * k_, r, epoch, batch_size, seed) for r in range(p * k_)]
        per_rank = [[[torch.cat(parts) for parts in zip(*batches)] if union_batches else Shards(batches)
                     for batches in zip(*shards[g * k_ : (g + 1) * k_])] for g in range(p)]
        for i in range(len(per_rank[0])):
            if t < sync_steps:
                assert not due(t), f"step {t} of the synchronous start cannot exchange"
                _synchronous_step(workers, [per_rank[r][i] for r in range(p)])
                for k in floats:  # the center follows the identical workers
                    center[k].copy_(states[0][k])
                t += 1
                continue
            exchange = due(t)
            for r, w in enumerate(workers):
                w.replay_position = (r, t)  # read by NaNLossRegressor
            with torch.no_grad():
                diffs = [{k: s[k] - center[k] for k in floats} for s in states] if exchange else []
                before = [{k: s[k].clone() for k in floats} for s in states] if exchange else []
            for r, w in enumerate(workers):
                for step in w.replay_steps([per_rank[r][i]]):
                    step()
            if exchange:
                bad = [not all(d[k].isfinite().all() for k in floats) for d in diffs]
                with torch.no_grad():
                    for k in floats:
                        s_k = alpha * sum(d[k] for d, b in zip(diffs, bad) if not b)
                        velocity[k] = momentum * velocity[k] + s_k
                        center[k] += momentum * velocity[k] + s_k if nesterov else velocity[k]
                        for s, d, b, x in zip(states, diffs, bad, before):
                            if b:
                                s[k].copy_(center[k])
                            elif reset:
                                s[k].copy_(center[k] + (s[k] - x[k]))
                            else:
                                s[k] -= alpha * d[k]
                for w, b in zip(workers, bad):
                    if b:
                        for opt in w._replay_optimizers:
                            opt.state.clear()
                result.exchange_steps.append(t)
            t += 1
        result.epoch_centers.append({k: v.clone() for k, v in center.items()})
        result.epoch_velocities.append({k: v.clone() for k, v in velocity.items()})
    result.workers = [{k: v.clone() for k, v in s.items()} for s in states]
    return result


def _synchronous_step(workers: list[ToyRegressor], batches: list[Any]) -> None:
    """DDP's step: each worker's gradient at its own batch, then the mean gradient (and mean buffers) everywhere."""
    for w, batch in zip(workers, batches):
        (optimizer,) = w._replay_optimizers
        optimizer.zero_grad()
        w.replay_backward(batch, 1)
    with torch.no_grad():
        for tensors in zip(*[[p.grad for p in w.parameters()] for w in workers]):
            mean = sum(tensors) / len(workers)
            for t in tensors:
                t.copy_(mean)
        for tensors in zip(*[[b for b in w.buffers() if b.is_floating_point()] for w in workers]):
            mean = sum(tensors) / len(workers)
            for t in tensors:
                t.copy_(mean)
    for w in workers:
        w._replay_optimizers[0].step()
