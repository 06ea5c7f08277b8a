"""The paper's networks, the CIFAR ResNet and the DataModules (shared data when present)."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers.recipes import (
    CIFAR10_DIR,
    IMAGENET_SAMPLE_DIR,
    IMAGENETTE_DIR,
    needs_cifar10,
    needs_imagenet_sample,
    needs_imagenette,
)
from lightning_easgd.recipes.data import (
    CIFAR10DataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    cifar10_transforms,
)
from lightning_easgd.recipes.models import CIFARResNet, PaperCIFAR10Net, PaperImageNetNet


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_paper_cifar10_net_has_the_papers_shapes() -> None:
    net = PaperCIFAR10Net()
    assert _count(net) == 351_946  # "about 0.35 M"
    shapes = []
    x = torch.randn(2, 3, 28, 28)
    for layer in net.features:
        x = layer(x)
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            shapes.append(tuple(x.shape[1:]))
    # (3,28)C(64,24)P(64,12)C(128,8)P(128,4)C(64,2)D(256,1)S(10,1)
    assert shapes == [(64, 24, 24), (64, 12, 12), (128, 8, 8), (128, 4, 4), (64, 2, 2)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 256), (256, 10)]
    assert all(torch.all(m.bias == 0) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.5]
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_paper_imagenet_net_has_the_papers_shapes() -> None:
    net = PaperImageNetNet()
    shapes = []
    x = torch.randn(1, 3, 221, 221)
    for layer in net.features:
        x = layer(x)
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d)):
            shapes.append(tuple(x.shape[1:]))
    # (3,221)C(96,108)P(96,36)C(256,32)P(256,16)C(384,14)C(384,13)C(256,12)P(256,6)D(4096,1)D(4096,1)S(1000,1)
    assert shapes == [
        (96, 108, 108), (96, 36, 36), (256, 32, 32), (256, 16, 16),
        (384, 14, 14), (384, 13, 13), (256, 12, 12), (256, 6, 6),
    ]  # fmt: skip
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(9216, 4096), (4096, 4096), (4096, 1000)]
    assert all(torch.all(m.bias == 0.1) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert [m.p for m in net.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]


@pytest.mark.parametrize(("net", "size"), [(PaperCIFAR10Net(), 32), (PaperImageNetNet(num_classes=10), 224)])
def test_paper_nets_reject_other_input_sizes_readably(net: nn.Module, size: int) -> None:
    with pytest.raises(ValueError, match=r"expects inputs of shape \[batch, 3, (28, 28|221, 221)\]"):
        net(torch.randn(1, 3, size, size))


def test_cifar_resnet() -> None:
    net = CIFARResNet(depth=20)
    assert _count(net) == 269_722
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert len([m for m in net.modules() if isinstance(m, nn.Conv2d)]) == 19  # + the classifier = 20 layers
    with pytest.raises(ValueError, match="depth must be 6n"):
        CIFARResNet(depth=18)


def test_synthetic_data_is_deterministic_and_learnable() -> None:
    data = SyntheticDataModule(num_classes=4, image_size=8, train_size=64, val_size=16, test_size=16, noise=0.1)
    data.setup("fit")
    x0, y0 = data.train_set[5]
    x1, y1 = data.train_set[5]
    assert torch.equal(x0, x1) and y0 == y1 == 1
    assert x0.shape == (3, 8, 8)
    # Splits share the class templates: a sample is closest to the mean of its own class in the other split.
    means = torch.stack([torch.stack([data.train_set[i][0] for i in range(c, 64, 4)]).mean(0) for c in range(4)])
    for index in range(16):
        x, y = data.val_set[index]
        assert torch.argmin(((means - x) ** 2).flatten(1).sum(1)) == y
    batch, labels = next(iter(data.train_dataloader()))
    assert batch.shape == (32, 3, 8, 8) and labels.dtype == torch.int64


def test_cifar10_missing_dir_explains_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data_dir=.*nowhere.*cifar-10-batches-py/ with data_batch_1"):
        CIFAR10DataModule(tmp_path / "nowhere")
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match="point it at the parent folder"):
        CIFAR10DataModule(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "data_batch_1").touch()
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"It is one level down: did you mean data_dir={str(tmp_path / 'cifar10')!r}?")):
        CIFAR10DataModule(tmp_path)  # the folder above cifar10/, as paths.data_dir is


def test_cifar10_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="preprocessing must be 'paper' or 'standard', got 'fancy'"):
        CIFAR10DataModule(tmp_path, preprocessing="fancy", download=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes must be 10"):
        CIFAR10DataModule(tmp_path, num_classes=100, download=True)


def test_cifar10_transforms_match_the_paper() -> None:
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    train = cifar10_transforms("paper", train=True)(image)
    evaluation = cifar10_transforms("paper", train=False)(image)
    assert train.shape == evaluation.shape == (3, 28, 28)
    assert evaluation.min() >= 0 and evaluation.max() <= 1  # [0, 1] pixels, no normalization
    assert torch.allclose(evaluation, image[:, 2:30, 2:30].float() / 255)  # the centre crop
    standard = cifar10_transforms("standard", train=False)(image)
    assert standard.shape == (3, 32, 32) and standard.min() < 0  # normalized


@needs_cifar10
def test_cifar10_shared_copy_needs_the_explicit_integrity_opt_out() -> None:
    with pytest.raises(RuntimeError, match="verify_integrity=false"):
        CIFAR10DataModule(CIFAR10_DIR)
    data = CIFAR10DataModule(CIFAR10_DIR, verify_integrity=False, num_workers=0, batch_size=16)
    data.setup("fit")
    assert len(data.train_set) == 50_000 and data.val_set is data.test_set and len(data.test_set) == 10_000
    # Same images and labels as the raw pickle: train labels start 6, 9, 9, 4, 1.
    assert [data.train_set[i][1] for i in range(5)] == [6, 9, 9, 4, 1]
    with (CIFAR10_DIR / "cifar-10-batches-py" / "test_batch").open("rb") as file:
        raw = pickle.load(file, encoding="latin1")
    first = torch.tensor(raw["data"][0]).reshape(3, 32, 32)
    x, y = data.test_set[0]
    assert y == raw["labels"][0] == 3
    assert torch.allclose(x, first[:, 2:30, 2:30].float() / 255)
    held_out = CIFAR10DataModule(CIFAR10_DIR, verify_integrity=False, val_size=5000, num_workers=0)
    held_out.setup("fit")
    assert len(held_out.train_set) == 45_000 and len(held_out.val_set) == 5000
    assert not set(held_out.train_set.indices) & set(held_out.val_set.indices)


def _image_tree(root: Path, classes: dict[str, list[str]]) -> Path:
    for split, names in classes.items():
        for name in names:
            (root / split / name).mkdir(parents=True)
    return root


def test_imagefolder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"is not a directory; expected <data_dir>/train/<class>/<image>"):
        ImageFolderDataModule(tmp_path / "nowhere")
    only_val = _image_tree(tmp_path / "a", {"val": ["x"]})
    with pytest.raises(FileNotFoundError, match="has no train/ folder") as refused:
        ImageFolderDataModule(only_val)
    assert "one level down" not in str(refused.value)
    _image_tree(tmp_path / "above" / "imagenet", {"train": ["x"], "val": ["x"]})
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"; it is one level down: did you mean data_dir={str(tmp_path / 'above' / 'imagenet')!r}?")):
        ImageFolderDataModule(tmp_path / "above")
    flat = _image_tree(tmp_path / "b", {"train": [], "val": ["x"]})
    (flat / "train").mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="holds no class folders"):
        ImageFolderDataModule(flat)
    mismatch = _image_tree(tmp_path / "c", {"train": ["cat", "dog"], "val": ["cat", "eel"]})
    with pytest.raises(ValueError, match=r"different class folders \(only in train: \['dog'\], only in val: \['eel'\]"):
        ImageFolderDataModule(mismatch, num_classes=2)
    two = _image_tree(tmp_path / "d", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    with pytest.raises(ValueError, match="set data.num_classes=2"):
        ImageFolderDataModule(two)


@needs_imagenette
def test_imagefolder_on_the_imagenet_subset() -> None:
    data = ImageFolderDataModule(IMAGENETTE_DIR, num_classes=10, crop_size=221, batch_size=4, num_workers=0)
    data.setup("fit")
    assert len(data.train_set) == 400 and len(data.val_set) == 200 and data.classes[0] == "n01440764"
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 3, 221, 221) and y.shape == (4,)
    x, _ = next(iter(data.val_dataloader()))
    assert x.shape == (4, 3, 221, 221)
    # The subset has grayscale JPEGs; ImageFolder's loader converts them, so every image has 3 channels.
    assert all(data.val_set[i][0].shape[0] == 3 for i in range(0, 200, 10))


@needs_imagenet_sample
def test_imagefolder_1000_classes_with_the_paper_imagenet_net(tmp_path: Path) -> None:
    # The sample only has val/; link it as both splits (links, not copies).
    (tmp_path / "train").symlink_to(IMAGENET_SAMPLE_DIR / "val")
    (tmp_path / "val").symlink_to(IMAGENET_SAMPLE_DIR / "val")
    data = ImageFolderDataModule(tmp_path, num_classes=1000, crop_size=221, batch_size=2, num_workers=0)
    assert data.classes[0] == "n01440764" and data.classes[-1] == "n15075141"
    data.setup("validate")
    x, y = next(iter(data.val_dataloader()))
    assert x.shape == (2, 3, 221, 221) and y.tolist() == [0, 1]
    net = PaperImageNetNet().eval()
    with torch.no_grad():
        assert net(x).shape == (2, 1000)
