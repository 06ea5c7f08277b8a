"""An independent single-process replay of synchronous EASGD with momentum on the center and any exchange steps.

Like ``toy.replay_easgd`` it never touches lightning_easgd: p model copies fed the batches Lightning's
DistributedSampler gives each rank, the elastic difference taken before the local step and applied after it, and
the center updated from the plain increment s = α·Σ_i d_i through a velocity v, per tensor:

    heavy ball:  v ← μ·v + s;   x̃ ← x̃ + v
    Nesterov:    v ← μ·v + s;   x̃ ← x̃ + μ·v + s

Which steps start with an exchange is the caller's predicate, so the schedule under test is written out separately.
A worker whose d_i is not finite is left out of the sum and restarts from the new center with no optimizer state
(``on_nonfinite="reset"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from helpers.replay import rank_batches, replicas
from helpers.toy import ToyRegressor


@dataclass
class MomentumReplay:
    center: dict[str, Tensor]
    velocity: dict[str, Tensor]
    workers: list[dict[str, Tensor]]
    exchange_steps: list[int] = field(default_factory=list)
    epoch_centers: list[dict[str, Tensor]] = field(default_factory=list)
    epoch_velocities: list[dict[str, Tensor]] = field(default_factory=list)


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
) -> MomentumReplay:
    """Run p workers for ``epochs`` epochs; step t starts with an exchange when ``due(t)``."""
    workers, states, floats, center = replicas(module, p)
    velocity = {k: torch.zeros_like(v) for k, v in center.items()}
    result = MomentumReplay(center=center, velocity=velocity, workers=[])
    t = 0
    for epoch in range(epochs):
        per_rank = [rank_batches(dataset, p, r, epoch, batch_size, seed) for r in range(p)]
        for i in range(len(per_rank[0])):
            exchange = due(t)
            for r, w in enumerate(workers):
                w.replay_position = (r, t)  # read by NaNLossRegressor
            with torch.no_grad():
                diffs = [{k: s[k] - center[k] for k in floats} for s in states] if exchange else []
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
                        for s, d, b in zip(states, diffs, bad):
                            if b:
                                s[k].copy_(center[k])
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
