"""The two networks of Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD" (NIPS 2015).

Shapes follow the paper's notation ``(channels, spatial size)`` per layer, where ``C`` is a convolution,
``P`` a max-pooling, ``D`` a fully-connected layer with dropout 0.5 and ``S`` the softmax classifier.
Both networks check their input size, because their first fully-connected layer is sized for exactly one
input resolution and a mismatch otherwise surfaces as an opaque matrix-shape error.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PaperCIFAR10Net", "PaperImageNetNet"]


def _check_args(num_classes: int, dropout: float) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def _check_input(net: nn.Module, x: Tensor, expected: tuple[int, int, int]) -> None:
    if x.dim() != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(
            f"{type(net).__name__} expects inputs of shape [batch, {expected[0]}, {expected[1]}, {expected[2]}], "
            f"got {list(x.shape)}. Use the matching preprocessing (e.g. data.preprocessing=paper for CIFAR-10, "
            f"data.crop_size={expected[1]} for ImageFolder data)."
        )


class PaperCIFAR10Net(nn.Module):
    """The paper's 7-layer CIFAR-10 network, ``(3,28)C(64,24)P(64,12)C(128,8)P(128,4)C(64,2)D(256,1)S(10,1)``.

    conv 5×5 3→64, max-pool 2, conv 5×5 64→128, max-pool 2, conv 3×3 128→64, linear 256→256 with ReLU and
    dropout 0.5, linear 256→``num_classes``. 351,946 parameters for 10 classes (the paper's "about 0.35 M").
    Biases start at 0 as in the paper; weights keep PyTorch's default initialisation, which the paper does not
    specify.

    Args:
        num_classes: Width of the classifier layer.
        dropout: Dropout probability of the fully-connected layer (the paper uses 0.5).
    """

    input_shape: tuple[int, int, int] = (3, 28, 28)

    def __init__(self, num_classes: int = 10, dropout: float = 0.5) -> None:
        super().__init__()
        _check_args(num_classes, dropout)
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=5),  # 28 -> 24
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 24 -> 12
            nn.Conv2d(64, 128, kernel_size=5),  # 12 -> 8
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8 -> 4
            nn.Conv2d(128, 64, kernel_size=3),  # 4 -> 2
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # 64 * 2 * 2 = 256
            nn.Linear(256, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits for a batch of ``[batch, 3, 28, 28]`` images."""
        _check_input(self, x, self.input_shape)
        return self.classifier(self.features(x))


class PaperImageNetNet(nn.Module):
    """The paper's OverFeat-like 11-layer ImageNet network.

    ``(3,221)C(96,108)P(96,36)C(256,32)P(256,16)C(384,14)C(384,13)C(256,12)P(256,6)D(4096,1)D(4096,1)S(1000,1)``.
    The kernel sizes and strides are the ones that produce exactly these spatial sizes without padding:
    conv 7×7/2, max-pool 3/3, conv 5×5, max-pool 2/2, conv 3×3, conv 2×2, conv 2×2, max-pool 2/2, then two
    4096-wide fully-connected layers with ReLU and dropout 0.5 and the classifier. Biases start at 0.1 as in the
    paper; weights keep PyTorch's default initialisation.

    Args:
        num_classes: Width of the classifier layer (1000 for ImageNet-1k).
        dropout: Dropout probability of the two fully-connected layers (the paper uses 0.5).
    """

    input_shape: tuple[int, int, int] = (3, 221, 221)

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        _check_args(num_classes, dropout)
        self.features = nn.Sequential(
            nn.Conv2d(3, 96, kernel_size=7, stride=2),  # 221 -> 108
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=3),  # 108 -> 36
            nn.Conv2d(96, 256, kernel_size=5),  # 36 -> 32
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 32 -> 16
            nn.Conv2d(256, 384, kernel_size=3),  # 16 -> 14
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 384, kernel_size=2),  # 14 -> 13
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=2),  # 13 -> 12
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 12 -> 6
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # 256 * 6 * 6 = 9216
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.constant_(module.bias, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        """Return class logits for a batch of ``[batch, 3, 221, 221]`` images."""
        _check_input(self, x, self.input_shape)
        return self.classifier(self.features(x))
