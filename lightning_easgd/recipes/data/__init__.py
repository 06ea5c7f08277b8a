"""LightningDataModules for the recipes: CIFAR-10, ImageFolder (ImageNet) and synthetic data."""

from lightning_easgd.recipes.data.cifar10 import CIFAR10DataModule, cifar10_transforms
from lightning_easgd.recipes.data.imagefolder import ImageFolderDataModule, imagenet_transforms
from lightning_easgd.recipes.data.synthetic import SyntheticDataModule, SyntheticImages

__all__ = [
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "SyntheticDataModule",
    "SyntheticImages",
    "cifar10_transforms",
    "imagenet_transforms",
]
