"""fit, validate, test and validate again on one Trainer in the same processes (the popen launcher re-runs this
script for ranks 1-3), with worker groups of 2 ranks; every rank writes how many process groups it knew and how many
it created around and during each stage."""

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

import lightning_easgd
from helpers.launch import SEED, loaders
from helpers.toy import ToyRegressor, make_dataset

CREATED = [0]


def _counting(new_group: Any) -> Any:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        CREATED[0] += 1
        return new_group(*args, **kwargs)

    return wrapper


def live_groups() -> int:
    return len(distributed_c10d._world.pg_map) if dist.is_initialized() else 0


class During(L.Callback):
    """The groups a rank knows while a stage runs (its worker's and its column's on top of the world)."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append(live_groups())

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append(live_groups())

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append(live_groups())


if __name__ == "__main__":
    import os

    os.environ["PL_GLOBAL_SEED"] = str(SEED)
    distributed_c10d.new_group = _counting(distributed_c10d.new_group)  # what new_subgroups_by_enumeration calls
    out = Path(sys.argv[1])
    torch.manual_seed(5)
    module = ToyRegressor()
    train, val = loaders(make_dataset(32), 2)
    during = During()
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=lightning_easgd.EASGDStrategy(tau=2, ranks_per_worker=2),
                        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, default_root_dir=str(out), callbacks=[during])
    after = []
    trainer.fit(module, train, val)
    after.append((live_groups(), CREATED[0]))
    trainer.validate(module, val)
    after.append((live_groups(), CREATED[0]))
    trainer.test(module, val)
    after.append((live_groups(), CREATED[0]))
    trainer.validate(module, val)
    after.append((live_groups(), CREATED[0]))
    (out / f"groups{trainer.global_rank}.json").write_text(json.dumps({"after": after, "during": during.seen}))
