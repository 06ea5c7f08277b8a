"""LightningCLI over the toy regressor: ``python tests/scripts/cli_fit.py fit --trainer.strategy=... ...``.

The popen launcher re-runs this command line for the other ranks, as it does for any script.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

import lightning_easgd  # noqa: F401  (registers easgd, easgd_spawn, easgd_fork)
from helpers.toy import ToyRegressor, make_dataset


class ToyData(L.LightningDataModule):
    """The toy regression set, for training and validation."""

    def __init__(self, n: int = 48, batch_size: int = 4) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(self.n), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(make_dataset(self.n), batch_size=self.batch_size)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(ToyRegressor, ToyData, args=args, run=run, seed_everything_default=7)


if __name__ == "__main__":
    main()
