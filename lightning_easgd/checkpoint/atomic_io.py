"""A checkpoint writer that never leaves a partial file where a checkpoint should be.

Lightning's TorchCheckpointIO writes through an fsspec transaction whose temporary file lives in the system's
temp directory; committing it is a ``shutil.move``, which becomes a copy when that directory is on another
filesystem than the checkpoint (a crash during the copy leaves a truncated checkpoint), and it first serialises
the whole checkpoint into memory. Here the temporary file sits next to the target, is fsynced, and replaces the
target with one atomic ``os.replace``: after a crash the path holds either the old checkpoint or the new one.
Remote (fsspec) paths are left to Lightning's writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.fabric.plugins.io.TorchCheckpointIO` with atomic local writes."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem) or storage_options is not None:
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
