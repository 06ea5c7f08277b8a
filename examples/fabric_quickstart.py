"""Quickstart with Fabric: two CPU workers train a small classifier with EASGD in a plain training loop.

    python examples/fabric_quickstart.py

Evaluation runs on the center (``fabric.strategy.center()``); checkpoints hold the center plus each worker's own
state for exact resume; after the loop the model holds the center for good (``adopt_center()``).
"""

import os

import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import lightning_easgd  # noqa: F401  (registers Fabric(strategy="easgd"); or pass EASGDFabricStrategy(tau=...))

OUT = "outputs/fabric_quickstart"


def data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = (x[:, :4] * torch.arange(1, 5)).argmax(1)  # a learnable rule
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=seed == 0)


def main() -> None:
    # tau = 10 optimizer steps between exchanges, alpha = 0.9 / 2 (beta = 0.9, the paper's value).
    fabric = Fabric(accelerator="cpu", devices=2, strategy="easgd", loggers=CSVLogger(OUT))
    fabric.launch()
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)  # EAMSGD
    model, optimizer = fabric.setup(model, optimizer)  # every worker starts from rank 0's weights
    # The loop owns the training sampler and sets its epoch, so a run resumed at epoch e in a new process draws
    # epoch e's order (fabric.setup_dataloaders would number the epochs by its own count of iterations, from 0).
    train_set = data(8192, 0).dataset
    sampler = DistributedSampler(train_set, num_replicas=fabric.world_size, rank=fabric.global_rank, seed=0)
    train = DataLoader(train_set, batch_size=64, sampler=sampler)
    val = fabric.setup_dataloaders(data(1024, 1))
    averager = fabric.strategy.averager
    averager.track_distances()  # measured inside the exchange: no extra communication

    for epoch in range(5):
        sampler.set_epoch(epoch)
        model.train()
        for batch in train:
            x, y = fabric.to_device(batch)
            optimizer.zero_grad()
            fabric.backward(nn.functional.cross_entropy(model(x), y))
            optimizer.step()  # one tick of EASGD's clock
        distance = max(float(s.distances.max()) for s in averager.pop_stats())
        model.eval()
        with fabric.strategy.center(), torch.no_grad():  # the center's weights, then this worker's back
            correct = sum((model(x).argmax(1) == y).sum() for x, y in val)
        accuracy = float(fabric.all_reduce(correct, reduce_op="sum")) / len(val.dataset)
        fabric.log_dict({"center_acc": accuracy, "max_distance": distance}, step=epoch)
        fabric.print(f"epoch {epoch}: center accuracy {accuracy:.3f}, largest worker-center distance {distance:.3f}")
        fabric.save(f"{OUT}/last.ckpt", {"model": model, "optimizer": optimizer, "epoch": epoch})

    fabric.strategy.adopt_center()  # the model holds the center for good, on every rank
    fabric.save(f"{OUT}/center.ckpt", {"model": model})
    # Fabric's CSVLogger writes its buffer every 100 steps or here, at finalize(): without this call a short run
    # leaves no metrics.csv. (Rank 0 writes; on the others finalize does nothing.)
    fabric.logger.finalize("success")
    if fabric.is_global_zero:  # log_dir only on rank 0, which created it
        out, logs = os.path.abspath(OUT), os.path.abspath(fabric.logger.log_dir)
        print(f"metrics: {logs}/metrics.csv\ncheckpoints: {out}/last.ckpt with last.ckpt.workers/ (model, "
              f"optimizer, epoch: for resume), "
              f"{out}/center.ckpt (the center)")


if __name__ == "__main__":
    main()
