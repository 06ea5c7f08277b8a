"""Fit with Trainer(strategy="easgd") (the popen launcher re-runs this script for rank 1), then save rank 0's
module, which is the user's module in the launching process."""

import sys
from pathlib import Path

import lightning as L
import torch

import lightning_easgd  # noqa: F401
from helpers.launch import SEED, loaders
from helpers.toy import ToyRegressor, make_dataset

if __name__ == "__main__":
    import os

    os.environ["PL_GLOBAL_SEED"] = str(SEED)
    out = Path(sys.argv[1])
    torch.manual_seed(23)
    module = ToyRegressor()
    init = {k: v.clone() for k, v in module.state_dict().items()}
    train, val = loaders(make_dataset(48), 2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="easgd", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        default_root_dir=str(out))
    trainer.fit(module, train, val)
    if trainer.global_rank == 0:
        torch.save({"init": init, "after_fit": module.state_dict()}, out / "popen.pt")
