"""An independent single-process replay of the paper's asynchronous EASGD (Algorithm 1), in round-robin order.

It never touches lightning_easgd. p model copies are fed exactly the batches Lightning's DistributedSampler gives
each rank. At step t (t > 0, τ | t) the workers call the master one after the other, 0, 1, ..., p−1: worker i takes
x = x_i, the master applies x̃ ← x̃ + α·(x − x̃) using the center as the previous worker left it, and worker i's
gradient step is taken at x, after which x_i ← x_i − α·(x − x̃). Algorithm 2 is the same around Nesterov SGD.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from helpers.replay import Replay, rank_batches, replicas
from helpers.toy import ToyRegressor


def replay_async_easgd(
    module: ToyRegressor, dataset: TensorDataset, *, p: int, tau: int, alpha: float, epochs: int, batch_size: int,
    seed: int,
) -> Replay:
    workers, states, floats, center = replicas(module, p)
    result = Replay(center=center, workers=[])
    t = 0
    for epoch in range(epochs):
        per_rank = [rank_batches(dataset, p, r, epoch, batch_size, seed) for r in range(p)]
        for b in range(len(per_rank[0])):
            diffs: list[dict[str, Tensor]] = []
            if t > 0 and t % tau == 0:
                with torch.no_grad():
                    for rank, s in enumerate(states):  # the master serves the workers in round-robin order
                        d = {k: s[k] - center[k] for k in floats}
                        cnorm = torch.sqrt(sum((center[k] ** 2).sum() for k in floats))
                        dist = torch.sqrt(sum((d[k] ** 2).sum() for k in floats))
                        result.exchanges.append({"step": t, "rank": rank, "distance": float(dist),
                                                 "center_norm": float(cnorm)})
                        for k in floats:
                            center[k] += alpha * d[k]
                        diffs.append(d)
            for rank, w in enumerate(workers):  # gradient at x = x_i before the elastic pull
                for step in w.replay_steps([per_rank[rank][b]]):
                    step()
            with torch.no_grad():
                for s, d in zip(states, diffs):
                    for k in floats:
                        s[k] -= alpha * d[k]
            t += 1
        result.epoch_centers.append({k: v.clone() for k, v in center.items()})
        result.epoch_workers.append([{k: v.clone() for k, v in s.items()} for s in states])
    result.workers = [{k: v.clone() for k, v in s.items()} for s in states]
    return result
