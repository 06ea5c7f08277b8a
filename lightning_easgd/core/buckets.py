"""Flat, bucketed storage for a list of tensors, so that a whole model moves in a few large collectives.

One collective per parameter would pay the per-message latency hundreds of times per exchange; one collective for
the whole model cannot start until everything is flattened and needs a single dtype. Like DDP's gradient buckets,
we group tensors by (device, dtype) and cut each group into buckets of at most ``bucket_cap_mb`` megabytes.

With worker groups of k ranks, rank j of a group owns slice j of every bucket (:class:`ShardLayout`): the bucket is
padded to a multiple of k so that the k slices have equal length, as ``all_gather`` and the column all-reduces need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_easgd.core.pinned import pinned_empty

DEFAULT_BUCKET_CAP_MB = 25.0
"""Bucket size for host tensors (gloo), where it was measured to be as fast as one flat buffer."""
DEFAULT_CUDA_BUCKET_CAP_MB = 256.0
"""Bucket size for CUDA tensors: NCCL's per-call cost is paid ~100 times for a 7 B-parameter float32 model instead
of ~1,100 times with 25 MB, and the one transient bucket the sharded exchange needs stays small next to the model."""


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the center and d_i are kept in: float32 for 16-bit tensors (a bf16 center would lose the small
    α·Σd updates and an fp16 sum can overflow), the tensors' own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def resolve_bucket_cap_mb(bucket_cap_mb: float | None, tensors: Sequence[Tensor]) -> float:
    """``bucket_cap_mb`` itself, or the default for where ``tensors`` live (larger on CUDA) when it is None."""
    if bucket_cap_mb is not None:
        return bucket_cap_mb
    return DEFAULT_CUDA_BUCKET_CAP_MB if any(t.device.type == "cuda" for t in tensors) else DEFAULT_BUCKET_CAP_MB


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

    def __init__(self, tensors: Sequence[Tensor], bucket_cap_mb: float | None = DEFAULT_BUCKET_CAP_MB) -> None:
        bucket_cap_mb = resolve_bucket_cap_mb(bucket_cap_mb, tensors)
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
        self.bucket_cap_mb = bucket_cap_mb
        self.buckets: tuple[Bucket, ...] = tuple(buckets)
        self.num_tensors = len(tensors)

    @staticmethod
    def _bucket(device: torch.device, dtype: torch.dtype, indices: list[int], tensors: Sequence[Tensor]) -> Bucket:
        return Bucket(device, dtype, tuple(indices), tuple(tensors[i].numel() for i in indices))

    @property
    def nbytes(self) -> int:
        """Bytes one copy of all tensors occupies (what one exchange all-reduces)."""
        return sum(b.numel * torch.empty((), dtype=b.dtype).element_size() for b in self.buckets)

    def allocate(self, dtypes: Sequence[torch.dtype] | None = None) -> list[Tensor]:
        """One zero-filled flat buffer per bucket, in the bucket's dtype or ``dtypes[b]``."""
        if dtypes is None:
            dtypes = [b.dtype for b in self.buckets]
        return [torch.zeros(b.numel, device=b.device, dtype=dtype) for b, dtype in zip(self.buckets, dtypes)]

    @property
    def master_dtypes(self) -> list[torch.dtype]:
        """Per bucket, the dtype a center of these tensors is kept in (:func:`master_dtype`)."""
        return [master_dtype(b.dtype) for b in self.buckets]

    def views(self, flats: Sequence[Tensor]) -> list[Tensor]:
        """Per-tensor views into ``flats``, in the order of the tensors the layout was built from."""
        out: list[Tensor | None] = [None] * self.num_tensors
        for index, flat in enumerate(flats):
            for i, view in zip(self.buckets[index].indices, self.bucket_views(index, flat)):
                out[i] = view
        return out  # type: ignore[return-value]

    def bucket_views(self, index: int, flat: Tensor) -> list[Tensor]:
        """Views of bucket ``index``'s tensors (in the bucket's order) into ``flat``, which may be longer (padded)."""
        bucket = self.buckets[index]
        pieces = flat[: bucket.numel].split(bucket.numels)
        return [piece.view(self.shapes[i]) for i, piece in zip(bucket.indices, pieces)]


@dataclass(frozen=True)
class Segment:
    """The part of one tensor that falls into this rank's slice of a bucket."""

    tensor: int  # index into the layout's tensors
    bucket: int
    start: int  # range in the flattened tensor
    stop: int
    offset: int  # where it starts in the slice
    whole: bool  # the slice holds the entire tensor


class ShardLayout:
    """Rank ``index`` of ``parts``' slice of every bucket of a :class:`FlatLayout`.

    Every bucket of n elements is cut into ``parts`` slices of ⌈n/parts⌉ elements (the last one padded with zeros), so
    that all ranks of a group hold equal slices and a group all-gather of the slices rebuilds the padded bucket.
    With ``parts`` = 1 the slice is the whole bucket and every segment is a whole tensor.
    """

    def __init__(self, layout: FlatLayout, parts: int, index: int) -> None:
        if not 0 <= index < parts:
            raise ValueError(f"index={index!r} is invalid for {parts} parts")
        self.layout = layout
        self.parts = parts
        self.index = index
        self.slice_numels: tuple[int, ...] = tuple(-(-b.numel // parts) for b in layout.buckets)
        segments: list[Segment] = []
        bounds: list[tuple[int, int]] = []
        for b, (bucket, size) in enumerate(zip(layout.buckets, self.slice_numels)):
            lo, hi = index * size, (index + 1) * size
            first = len(segments)
            offset = 0
            for i, n in zip(bucket.indices, bucket.numels):
                start, stop = max(lo, offset), min(hi, offset + n)
                if start < stop:
                    segments.append(Segment(i, b, start - offset, stop - offset, start - lo, stop - start == n))
                offset += n
            bounds.append((first, len(segments)))
        self.segments: tuple[Segment, ...] = tuple(segments)
        self.bucket_segments: tuple[tuple[int, int], ...] = tuple(bounds)
        """For each bucket, the range of :attr:`segments` that lies in it."""

    def allocate(self, dtypes: Sequence[torch.dtype], device: torch.device | None = None,
                 pin: bool = False) -> list[Tensor]:
        """One zero-filled slice per bucket, in ``dtypes[b]``, on the bucket's device unless ``device`` is given;
        ``pin``: page-locked host memory of the slice's exact size
        (:func:`~lightning_easgd.core.pinned.pinned_empty`)."""
        return [
            pinned_empty(n, dtype) if pin else
            torch.zeros(n, dtype=dtype, device=bucket.device if device is None else device)
            for bucket, n, dtype in zip(self.layout.buckets, self.slice_numels, dtypes)
        ]

    def nbytes(self, dtypes: Sequence[torch.dtype]) -> int:
        """Bytes of one slice per bucket in ``dtypes``."""
        return sum(n * torch.empty((), dtype=dtype).element_size() for n, dtype in zip(self.slice_numels, dtypes))

    def views(self, slices: Sequence[Tensor]) -> list[Tensor]:
        """One view per segment into ``slices`` (shaped like the tensor where the segment is a whole tensor)."""
        return [self._slice_view(slices[s.bucket], s) for s in self.segments]

    def slice_views(self, bucket: int, flat: Tensor) -> list[Tensor]:
        """Views of ``bucket``'s segments into ``flat``, a buffer holding this rank's slice of that bucket."""
        return [self._slice_view(flat, self.segments[i]) for i in self.segments_in(bucket)]

    def tensor_views(self, tensors: Sequence[Tensor], names: Sequence[str] | None = None) -> list[Tensor]:
        """One writable view per segment into ``tensors``; a tensor split between slices must be contiguous."""
        out = []
        for s in self.segments:
            t = tensors[s.tensor]
            if s.whole:
                out.append(t)
                continue
            if not t.is_contiguous():
                name = repr(names[s.tensor]) if names is not None else f"#{s.tensor}"
                raise ValueError(
                    f"tensor {name} is not contiguous (strides {t.stride()}) and is split between the slices of "
                    "a worker group's ranks; make it contiguous (e.g. do not use channels_last) or use "
                    "ranks_per_worker=1"
                )
            out.append(t.view(-1)[s.start : s.stop])
        return out

    def value_views(self, values: Sequence[Tensor]) -> list[Tensor]:
        """One read-only view (or copy, for non-contiguous values) per segment of ``values``."""
        return [
            values[s.tensor] if s.whole else values[s.tensor].reshape(-1)[s.start : s.stop] for s in self.segments
        ]

    def segments_in(self, bucket: int) -> range:
        """Indices into :attr:`segments` of the segments in ``bucket``."""
        return range(*self.bucket_segments[bucket])

    def _slice_view(self, flat: Tensor, s: Segment) -> Tensor:
        piece = flat[s.offset : s.offset + s.stop - s.start]
        return piece.view(self.layout.shapes[s.tensor]) if s.whole else piece


def check_device(named_tensors: Sequence[tuple[str, Tensor]], device: torch.device) -> None:
    """Refuse a floating-point tensor that is not on ``device``: it would land in a bucket on another device, which
    the exchange's collectives cannot reduce together with the rest (NCCL cannot reduce host tensors at all)."""
    for name, t in named_tensors:
        if t.is_floating_point() and t.device != device:
            raise ValueError(
                f"tensor {name!r} is on {t.device} but the model runs on {device}: EASGD averages every floating-point "
                f"parameter and buffer on one device; move it to {device} (register it as a parameter or buffer so "
                "that Lightning moves it) or make it non-floating-point"
            )


def broadcast_tensors(
    tensors: Sequence[Tensor], src: int = 0, group: dist.ProcessGroup | None = None,
    bucket_cap_mb: float | None = DEFAULT_BUCKET_CAP_MB,
) -> None:
    """Overwrite ``tensors`` in place with global rank ``src``'s values (``src`` must be in ``group``), one broadcast
    per bucket."""
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
