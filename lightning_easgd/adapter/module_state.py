"""Which of a module's tensors take part in the elastic exchange, and its state dict with other values for them.

Shared by the adapters: every parameter and floating-point buffer is averaged (so the center is a complete model);
integer buffers (BatchNorm's ``num_batches_tracked``) stay local. Tensors registered under several names (tied
weights) take part once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor
from torch.nn import Module

from lightning_easgd.core import broadcast_tensors


def elastic_tensors(module: Module, bucket_cap_mb: float | None) -> tuple[list[tuple[str, Tensor]], dict[str, int]]:
    """Give every rank rank 0's parameters and buffers (collective), and pick the tensors to average.

    Every worker starts from the same point: the paper finds different starting points hurt.

    Returns:
        The named floating-point tensors, each once, and for every ``state_dict`` key that names one of them the
        index of that tensor in the list.
    """
    state = module.state_dict(keep_vars=True)
    unique: dict[int, tuple[str, Tensor]] = {}
    for key, value in state.items():
        if isinstance(value, Tensor):
            unique.setdefault(id(value), (key, value))
    broadcast_tensors([t for _, t in unique.values()], src=0, bucket_cap_mb=bucket_cap_mb)
    elastic = [(key, t) for key, t in unique.values() if t.is_floating_point()]
    index = {id(t): i for i, (_, t) in enumerate(elastic)}
    keys = {key: index[id(v)] for key, v in state.items() if isinstance(v, Tensor) and id(v) in index}
    return elastic, keys


def state_with(state: Mapping[str, Any], keys: Mapping[str, int], values: Sequence[Tensor]) -> dict[str, Any]:
    """``state`` with every averaged entry replaced by ``values[keys[key]]``, detached (a view: callers that keep it
    past the next optimizer step or exchange copy it, e.g. to the host for a file)."""
    out = dict(state)
    for key, i in keys.items():
        out[key] = values[i].detach()
    return out
