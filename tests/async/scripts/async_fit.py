"""Fit with the popen launcher and asynchronous EASGD, normally or failing, to test shutdown (the launcher re-runs
this script for rank 1). Usage: async_fit.py OUT MODE, MODE one of ok, raise0, raise1, sigint."""

import os
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed.rpc
from lightning.pytorch.strategies import StrategyRegistry

import lightning_easgd  # noqa: F401
from helpers.launch import SEED, loaders
from helpers.toy import ToyRegressor, make_dataset
from lightning_easgd.trainer.async_strategy import AsyncEASGDStrategy

FAIL_AT = 5


class Failing(ToyRegressor):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == FAIL_AT and self.current_epoch == 0:
            if self.mode == f"raise{self.global_rank}":
                raise RuntimeError(f"planned failure on rank {self.global_rank}")
            if self.mode == "sigint" and self.global_rank == 0:
                os.killpg(os.getpgrp(), signal.SIGINT)  # what Ctrl+C in the terminal does
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    os.environ["PL_GLOBAL_SEED"] = str(SEED)
    out, mode = Path(sys.argv[1]), sys.argv[2]
    # A shell starts background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt handler: a
    # suite run with `&` would see the simulated Ctrl+C do nothing. Both ranks (the launcher re-runs this script)
    # take Python's own handler back, as in an interactive terminal.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.manual_seed(23)
    if "easgd_async" not in StrategyRegistry:
        AsyncEASGDStrategy.register_strategies(StrategyRegistry)
    strategy: Any = "easgd_async"
    if mode != "ok":
        strategy = AsyncEASGDStrategy(tau=2, timeout=timedelta(seconds=60), start_method="popen")
    module = Failing(mode)
    train, val = loaders(make_dataset(48), 2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
                        default_root_dir=str(out))
    assert type(trainer.strategy) is AsyncEASGDStrategy
    trainer.fit(module, train, val)
    torch.save(module.state_dict(), out / f"after_fit{trainer.global_rank}.pt")
    # Non-daemon threads would keep the process alive after fit; the RPC agent must be gone.
    alive = [t.name for t in threading.enumerate() if not t.daemon and not isinstance(t, threading._DummyThread)]
    try:
        torch.distributed.rpc.get_worker_info()
        agent = "running"
    except RuntimeError:
        agent = "stopped"
    print(f"THREADS rank{trainer.global_rank} {alive} RPC {agent}", flush=True)
