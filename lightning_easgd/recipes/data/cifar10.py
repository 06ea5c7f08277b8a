"""CIFAR-10 through torchvision, with the paper's preprocessing or the usual normalized 32×32 pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Subset
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2

from lightning_easgd.recipes.data._base import ClassificationDataModule

__all__ = ["CIFAR10DataModule", "cifar10_transforms"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
_FILES = tuple(name for name, _ in CIFAR10.train_list + CIFAR10.test_list) + (CIFAR10.meta["filename"],)


class _CIFAR10(CIFAR10):
    """torchvision's CIFAR10 whose md5 check the DataModule has already done (or was told to skip)."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name in _FILES)


def cifar10_transforms(preprocessing: Literal["paper", "standard"], train: bool) -> v2.Compose:
    """Build the CIFAR-10 transform pipeline.

    Args:
        preprocessing: ``"paper"``: pixels in [0, 1], random 28×28 crop + horizontal flip for training and a
            centre 28×28 crop for evaluation (Zhang et al. 2015, for the 7-layer net). ``"standard"``: 32×32,
            4-pixel padded random crop + flip for training, per-channel normalization (for ResNets).
        train: Training (random) or evaluation (deterministic) pipeline.
    """
    scale = v2.ToDtype(torch.float32, scale=True)
    if preprocessing == "paper":
        crop = [v2.RandomCrop(28), v2.RandomHorizontalFlip()] if train else [v2.CenterCrop(28)]
        return v2.Compose([v2.ToImage(), *crop, scale])
    if preprocessing == "standard":
        augment = [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()] if train else []
        return v2.Compose([v2.ToImage(), *augment, scale, v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    raise ValueError(f"preprocessing must be 'paper' or 'standard', got {preprocessing!r}")


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 from torchvision's python layout, downloaded when asked or read from a local copy.

    The layout is checked when the module is built, so a wrong path fails before any worker process starts.

    Args:
        data_dir: Folder that contains ``cifar-10-batches-py/`` (torchvision's ``root``).
        preprocessing: ``"paper"`` (28×28 crops of [0, 1] pixels, for the paper's net) or ``"standard"``
            (normalized 32×32, for ResNets); see :func:`cifar10_transforms`.
        num_classes: Must be 10; present so configs can interpolate ``${data.num_classes}`` for every dataset.
        val_size: Training images held out for validation. ``0`` validates on the test split, which is the
            paper's protocol (its curves are the center's test error over time).
        download: Fetch the dataset from the internet if it is not in ``data_dir``.
        verify_integrity: Check torchvision's md5 sums. Set ``False`` for a faithful rebuild whose bytes differ
            from the original archive (such as the JPEG-degraded copy in ``shared/data``); the files must then
            still all be present.
        seed: Seed of the train/validation split.
        batch_size: Per-worker training batch size (the paper: 128).
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader workers per training process.
        pin_memory: Pin host memory (useful with GPUs).
    """

    def __init__(
        self,
        data_dir: str | Path,
        preprocessing: Literal["paper", "standard"] = "paper",
        num_classes: int = 10,
        val_size: int = 0,
        download: bool = False,
        verify_integrity: bool = True,
        seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        if num_classes != 10:
            raise ValueError(f"num_classes must be 10 for CIFAR-10, got {num_classes}")
        if not 0 <= val_size < 50_000:
            raise ValueError(f"val_size must be in [0, 50000), got {val_size}")
        cifar10_transforms(preprocessing, train=False)  # validates `preprocessing`
        self.data_dir = Path(data_dir).expanduser()
        self.preprocessing = preprocessing
        self.num_classes = num_classes
        self.val_size = val_size
        self.download = download
        self.verify_integrity = verify_integrity
        self.seed = seed
        if not download:
            self._check_files()

    def _check_files(self) -> None:
        folder = self.data_dir / CIFAR10.base_folder
        missing = [name for name in _FILES if not (folder / name).is_file()]
        if missing:
            below = (sorted(self.data_dir.glob(f"*/{CIFAR10.base_folder}/data_batch_1")) if self.data_dir.is_dir()
                     else [])
            if self.data_dir.name == CIFAR10.base_folder:
                hint = f" data_dir itself is named {CIFAR10.base_folder}; point it at the parent folder."
            elif below:  # e.g. data_dir is the folder above cifar10/
                hint = f" It is one level down: did you mean data_dir={str(below[0].parent.parent)!r}?"
            else:
                hint = ""
            raise FileNotFoundError(
                f"data_dir={str(self.data_dir)!r} does not hold CIFAR-10 in torchvision's python layout: expected "
                f"<data_dir>/{CIFAR10.base_folder}/ with data_batch_1 ... data_batch_5, test_batch and "
                f"batches.meta; missing {missing}.{hint} Set download=true to fetch it."
            )
        if self.verify_integrity:
            files = CIFAR10.train_list + CIFAR10.test_list
            bad = [name for name, md5 in files if not check_integrity(str(folder / name), md5)]
            if bad:
                raise RuntimeError(
                    f"CIFAR-10 files {bad} in {str(folder)!r} fail torchvision's md5 check. If this is a faithful "
                    "rebuild rather than the original archive (e.g. the JPEG-degraded copy in shared/data), set "
                    "verify_integrity=false (data.verify_integrity=false on the command line)."
                )

    def prepare_data(self) -> None:
        """Download (once per node) when ``download`` is set, then verify the files."""
        if self.download:
            # Without the md5 check, files that are present (a rebuilt copy) count as downloaded.
            dataset = CIFAR10 if self.verify_integrity else _CIFAR10
            dataset(str(self.data_dir), train=True, download=True)
            dataset(str(self.data_dir), train=False, download=True)
            self._check_files()

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets; held-out validation images come from the training split."""
        root = str(self.data_dir)
        eval_tf = cifar10_transforms(self.preprocessing, train=False)
        if self.test_set is None:
            self.test_set = _CIFAR10(root, train=False, transform=eval_tf)
        if stage in (None, "fit", "validate") and self.train_set is None:
            train_set = _CIFAR10(root, train=True, transform=cifar10_transforms(self.preprocessing, train=True))
            if self.val_size == 0:
                self.train_set, self.val_set = train_set, self.test_set
            else:
                order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(self.seed)).tolist()
                self.train_set = Subset(train_set, order[self.val_size :])
                self.val_set = Subset(_CIFAR10(root, train=True, transform=eval_tf), order[: self.val_size])
