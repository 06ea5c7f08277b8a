"""Synthetic, learnable image classification data for smoke tests and benchmarks without a dataset."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_easgd.recipes.data._base import ClassificationDataModule

__all__ = ["SyntheticDataModule", "SyntheticImages"]


class SyntheticImages(Dataset[tuple[Tensor, Tensor]]):
    """Noisy copies of one smooth random template per class, generated on the fly from ``(seed, index)``.

    Sample ``i`` has label ``i % num_classes`` and is a deterministic function of the templates, the seed and
    ``i``, so every process sees the same dataset without storing it. Splits share the templates (the classes)
    and differ in their noise seed. A network can actually learn it (accuracy rises), which pure noise would not
    show.

    Args:
        templates: ``[num_classes, channels, h, w]`` class templates, upsampled to ``image_size``.
        size: Number of samples.
        image_size: Height and width of the square images.
        seed: Seed of the per-sample noise.
        noise: Standard deviation of the per-sample Gaussian noise (templates have unit scale).
    """

    def __init__(self, templates: Tensor, size: int, image_size: int, seed: int, noise: float) -> None:
        self.templates = templates
        self.size = size
        self.image_size = image_size
        self.seed = seed
        self.noise = noise

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} samples")
        label = index % len(self.templates)
        size = (self.image_size, self.image_size)
        template = F.interpolate(self.templates[label : label + 1], size=size, mode="bilinear")[0]
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        image = template + self.noise * torch.randn(template.shape, generator=generator)
        return image, torch.tensor(label)


class SyntheticDataModule(ClassificationDataModule):
    """Train/val/test splits of :class:`SyntheticImages` with different seeds.

    Args:
        num_classes: Number of classes.
        image_size: Height and width of the square images (28 for the paper's CIFAR-10 net, 221 for its
            ImageNet net).
        channels: Image channels.
        train_size: Training samples.
        val_size: Validation samples.
        test_size: Test samples.
        noise: Per-sample noise standard deviation; larger is harder.
        seed: Seed of the class templates; the splits' noise uses ``seed + 1``, ``seed + 2`` and ``seed + 3``.
        batch_size: Per-worker training batch size.
        eval_batch_size: Validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader workers per training process.
        pin_memory: Pin host memory (useful with GPUs).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 28,
        channels: int = 3,
        train_size: int = 512,
        val_size: int = 128,
        test_size: int = 128,
        noise: float = 1.0,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory)
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_classes < 2 or image_size < 1 or channels < 1 or noise < 0:
            raise ValueError(
                "need num_classes >= 2, image_size >= 1, channels >= 1 and noise >= 0, got "
                f"num_classes={num_classes}, image_size={image_size}, channels={channels}, noise={noise}"
            )
        self.num_classes = num_classes
        self.image_size = image_size
        self.channels = channels
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.noise = noise
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        """Create the three splits (cheap: samples are generated when loaded)."""
        # 4x4 templates upsampled on demand keep memory small even for 1000 classes at 221x221.
        generator = torch.Generator().manual_seed(self.seed)
        templates = torch.randn(self.num_classes, self.channels, 4, 4, generator=generator)
        self.train_set, self.val_set, self.test_set = (
            SyntheticImages(templates, self.sizes[split], self.image_size, self.seed + offset, self.noise)
            for offset, split in enumerate(("train", "val", "test"), start=1)
        )
