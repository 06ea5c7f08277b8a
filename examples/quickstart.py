"""Quickstart: two CPU workers train a small classifier with EASGD; validation and the saved model use the center.

    python examples/quickstart.py
"""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_easgd import EASGDStrategy, ElasticDistanceMonitor


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True, prog_bar=True)

    def configure_optimizers(self):  # EAMSGD: EASGD around a Nesterov-momentum local optimizer
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True)


def data(n: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = (x[:, :4] * torch.arange(1, 5)).argmax(1)  # a learnable rule
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=seed == 0)


if __name__ == "__main__":
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=EASGDStrategy(tau=4),  # alpha = 0.9 / 2 by default (beta = 0.9, the paper's value)
        callbacks=[ElasticDistanceMonitor()],
        max_epochs=5,
        default_root_dir="outputs/quickstart",
    )
    model = Classifier()
    trainer.fit(model, data(8192, 0), data(1024, 1))
    if trainer.is_global_zero:
        accuracy = trainer.callback_metrics["val_acc"]
        print(f"center val_acc={accuracy:.3f}; checkpoint: {trainer.checkpoint_callback.best_model_path}")
