"""Reading a checkpoint's worker files the plain way (torch.load), independently of lightning_easgd."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def worker_states(path: Path) -> list[dict[str, Any]]:
    """Every worker's saved state, in worker order, from the files the checkpoint at ``path`` names."""
    section = torch.load(path, weights_only=True)["easgd"]
    return [torch.load(path.parent / name, weights_only=True) for name in section["worker_files"]]
