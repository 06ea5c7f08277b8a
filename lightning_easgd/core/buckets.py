"""Flat, bucketed storage for a list of tensors, so that a whole model moves in a few large collectives.

One collective per parameter would pay the per-message latency hundreds of times per exchange; one collective for
the whole model cannot start until everything is flattened and needs a single dtype. Like DDP's gradient buckets,
we group tensors by (device, dtype) and cut each group into buckets of at most ``bucket_cap_mb`` megabytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Bucket:
    """Which tensors (by index into the layout's tensor list) one flat buffer holds, and where."""

    device: torch.device
    dtype: torch.dtype
    indices: tuple[int, ...]
    numels: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.numels)


class FlatLayout:
    """Assigns tensors to buckets and makes flat buffers with per-tensor views into them."""

    def __init__(self, tensors: Sequence[Tensor], bucket_cap_mb: float = 25.0) -> None:
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb!r} is invalid: it must be > 0")
        self.shapes: tuple[torch.Size, ...] = tuple(t.shape for t in tensors)
        cap_bytes = int(bucket_cap_mb * 1024 * 1024)
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.device, t.dtype), []).append(i)
        buckets: list[Bucket] = []
        for (device, dtype), members in groups.items():
            itemsize = torch.empty((), dtype=dtype).element_size()
            current: list[int] = []
            size = 0
            for i in members:
                nbytes = tensors[i].numel() * itemsize
                if current and size + nbytes > cap_bytes:
                    buckets.append(self._bucket(device, dtype, current, tensors))
                    current, size = [], 0
                current.append(i)
                size += nbytes
            if current:
                buckets.append(self._bucket(device, dtype, current, tensors))
        self.buckets: tuple[Bucket, ...] = tuple(buckets)
        self.num_tensors = len(tensors)

    @staticmethod
    def _bucket(device: torch.device, dtype: torch.dtype, indices: list[int], tensors: Sequence[Tensor]) -> Bucket:
        return Bucket(device, dtype, tuple(indices), tuple(tensors[i].numel() for i in indices))

    @property
    def nbytes(self) -> int:
        """Bytes one copy of all tensors occupies (what one exchange all-reduces)."""
        return sum(b.numel * torch.empty((), dtype=b.dtype).element_size() for b in self.buckets)

    def allocate(self) -> list[Tensor]:
        """One zero-filled flat buffer per bucket."""
        return [torch.zeros(b.numel, device=b.device, dtype=b.dtype) for b in self.buckets]

    def views(self, flats: Sequence[Tensor]) -> list[Tensor]:
        """Per-tensor views into ``flats``, in the order of the tensors the layout was built from."""
        out: list[Tensor | None] = [None] * self.num_tensors
        for bucket, flat in zip(self.buckets, flats):
            for i, piece in zip(bucket.indices, flat.split(bucket.numels)):
                out[i] = piece.view(self.shapes[i])
        return out  # type: ignore[return-value]


def broadcast_tensors(
    tensors: Sequence[Tensor], src: int = 0, group: dist.ProcessGroup | None = None, bucket_cap_mb: float = 25.0
) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values, one broadcast per bucket."""
    if not tensors or not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    layout = FlatLayout(tensors, bucket_cap_mb)
    flats = layout.allocate()
    views = layout.views(flats)
    with torch.no_grad():
        torch._foreach_copy_(views, list(tensors))
        for flat in flats:
            dist.broadcast(flat, src=src, group=group)
        torch._foreach_copy_(list(tensors), views)
