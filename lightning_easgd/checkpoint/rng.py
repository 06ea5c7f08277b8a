"""Capture and restore a process's random number generators in a form ``torch.load(weights_only=True)`` accepts.

Resuming a run that uses dropout or random augmentation only reproduces the uninterrupted run if every rank gets
its own generator states back. Lightning's checkpoints do not hold them, and numpy's state is an ndarray inside a
tuple, which ``weights_only`` loading refuses; here everything is a tensor, an int, a float or a str.

Only the current CUDA device's generator is kept: a rank draws from the device it trains on, and the number of
visible devices may differ on resume (SLURM's ``--gpus-per-task=1`` shows each rank a single device 0).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, numpy's, torch's CPU and (if CUDA is initialised) the current CUDA device's
    generators."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; the CUDA state goes to the current device.

    States saved by lightning-easgd 0.1 hold a list with every visible device's state; the entry of the current
    device's index is taken when it exists (otherwise the CUDA generator keeps its seeded state, with a warning).
    """
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available():
        return
    if isinstance(cuda, (list, tuple)):
        device = torch.cuda.current_device()
        if device >= len(cuda):
            rank_zero_warn(
                f"The checkpoint holds the CUDA random state of {len(cuda)} device(s) and this process uses device "
                f"{device}; its CUDA generator keeps its seeded state (the state was saved by lightning-easgd 0.1, "
                "which kept every visible device's state)."
            )
            return
        cuda = cuda[device]
    torch.cuda.set_rng_state(cuda)
