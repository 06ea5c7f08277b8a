"""A long 2-worker EASGD fit (popen launcher) for signal tests: marks when training runs and when it finishes."""

import sys
import time
from pathlib import Path

import lightning as L

from helpers.launch import loaders
from helpers.toy import ToyRegressor, make_dataset
from lightning_easgd import EASGDStrategy


class Slow(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == 3 and trainer.global_rank == 0:
            (OUT / "training").touch()
        time.sleep(0.05)


if __name__ == "__main__":
    OUT = Path(sys.argv[1])
    train, _ = loaders(make_dataset(4000), 4)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=EASGDStrategy(tau=2), max_epochs=100, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[Slow()],
                        default_root_dir=str(OUT))
    trainer.fit(ToyRegressor(), train)
    (OUT / "finished").touch()
