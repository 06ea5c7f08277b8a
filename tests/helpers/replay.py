"""An independent single-process replay of the paper's synchronous EASGD rule.

The replay never touches lightning_easgd: it implements Eq. 5-6 with plain tensor arithmetic on p model copies fed
exactly the batches Lightning's shuffling DistributedSampler gives each rank, so the tests can compare every weight
of every worker and of the center against it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from helpers.toy import Shards, ToyRegressor


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
