"""ImageNet (or any ``train/`` + ``val/`` class-per-folder dataset) through torchvision's ImageFolder."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from lightning_easgd.recipes.data._base import ClassificationDataModule

__all__ = ["ImageFolderDataModule", "imagenet_transforms"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LAYOUT = (
    "<data_dir>/train/<class>/<image> and <data_dir>/val/<class>/<image> (torchvision ImageFolder), "
    "with the same class folders in both"
)


def imagenet_transforms(resize: int, crop_size: int, normalize: bool, train: bool) -> v2.Compose:
    """Shorter side resized to ``resize``, then a random crop + horizontal flip (train) or a centre crop (eval).

    Args:
        resize: Target length of the shorter image side (the paper: 256).
        crop_size: Side of the square crop (the paper's net: 221; ResNet-50: 224).
        normalize: Standardise with the ImageNet channel means and stds; otherwise pixels stay in [0, 1].
        train: Training (random) or evaluation (deterministic) pipeline.
    """
    crop = [v2.RandomCrop(crop_size), v2.RandomHorizontalFlip()] if train else [v2.CenterCrop(crop_size)]
    tail = [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)] if normalize else []
    return v2.Compose(
        [v2.ToImage(), v2.Resize(resize, antialias=True), *crop, v2.ToDtype(torch.float32, scale=True), *tail]
    )


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir() and not entry.name.startswith("."))


class ImageFolderDataModule(ClassificationDataModule):
    """ImageNet-style data in ImageFolder layout: ``train/`` for training, ``val/`` for validation and test.

    ImageNet's test labels are not public, so the center is tested on ``val/`` (the usual ImageNet protocol).
    The folder layout and the class count are checked when the module is built, so a wrong path fails before
    any worker process starts, and a ``val/`` whose classes differ from ``train/`` is refused instead of
    silently shifting the label indices (ImageFolder numbers classes by sorted folder name per split).

    Args:
        data_dir: Folder with ``train/`` and ``val/``, each holding one sub-folder of images per class.
        num_classes: Expected number of class folders (1000 for ImageNet-1k).
        resize: Shorter side after resizing (the paper: 256).
        crop_size: Square crop side (the paper's net: 221; ResNet-50: 224).
        normalize: Standardise with ImageNet channel statistics.
        batch_size: Per-worker training batch size (the paper: 128).
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader workers per training process (JPEG decoding needs several).
        pin_memory: Pin host memory (useful with GPUs).
    """

    def __init__(
        self,
        data_dir: str | Path,
        num_classes: int = 1000,
        resize: int = 256,
        crop_size: int = 224,
        normalize: bool = True,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        if crop_size < 1 or resize < crop_size:
            raise ValueError(f"need 1 <= crop_size <= resize, got crop_size={crop_size}, resize={resize}")
        self.data_dir = Path(data_dir).expanduser()
        self.num_classes = num_classes
        self.resize = resize
        self.crop_size = crop_size
        self.normalize = normalize
        self.classes = self._check_layout()

    def _check_layout(self) -> list[str]:
        if not self.data_dir.is_dir():
            raise FileNotFoundError(f"data_dir={str(self.data_dir)!r} is not a directory; expected {_LAYOUT}")
        classes: dict[str, list[str]] = {}
        for split in ("train", "val"):
            split_dir = self.data_dir / split
            if not split_dir.is_dir():
                below = sorted(path.parent for path in self.data_dir.glob(f"*/{split}")
                               if (path.parent / "val").is_dir() and (path.parent / "train").is_dir())
                hint = f"; it is one level down: did you mean data_dir={str(below[0])!r}?" if below else ""
                raise FileNotFoundError(
                    f"data_dir={str(self.data_dir)!r} has no {split}/ folder; expected {_LAYOUT}{hint}"
                )
            classes[split] = _class_folders(split_dir)
            if not classes[split]:
                raise FileNotFoundError(
                    f"{str(split_dir)!r} holds no class folders (images must sit one folder per class); "
                    f"expected {_LAYOUT}"
                )
        if classes["train"] != classes["val"]:
            only_train = sorted(set(classes["train"]) - set(classes["val"]))
            only_val = sorted(set(classes["val"]) - set(classes["train"]))
            raise ValueError(
                f"train/ and val/ in {str(self.data_dir)!r} have different class folders (only in train: "
                f"{only_train[:5]}, only in val: {only_val[:5]}); label indices would not match. Expected {_LAYOUT}"
            )
        if len(classes["train"]) != self.num_classes:
            raise ValueError(
                f"num_classes={self.num_classes} but {str(self.data_dir)!r} has {len(classes['train'])} class "
                f"folders; set data.num_classes={len(classes['train'])}"
            )
        return classes["train"]

    def setup(self, stage: str | None = None) -> None:
        """Build the ImageFolder datasets; validation and test both read ``val/``."""
        eval_tf = imagenet_transforms(self.resize, self.crop_size, self.normalize, train=False)
        if self.val_set is None:
            self.val_set = ImageFolder(str(self.data_dir / "val"), transform=eval_tf)
            self.test_set = self.val_set
        if stage in (None, "fit") and self.train_set is None:
            train_tf = imagenet_transforms(self.resize, self.crop_size, self.normalize, train=True)
            self.train_set = ImageFolder(str(self.data_dir / "train"), transform=train_tf)
