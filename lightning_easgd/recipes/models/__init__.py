"""Networks for the recipes: the paper's CIFAR-10 and ImageNet nets and a CIFAR ResNet.

torchvision's ResNet-50 needs no wrapper: ``conf/model/resnet50.yaml`` targets
``torchvision.models.resnet50`` directly.
"""

from lightning_easgd.recipes.models.paper import PaperCIFAR10Net, PaperImageNetNet
from lightning_easgd.recipes.models.resnet_cifar import CIFARResNet

__all__ = ["CIFARResNet", "PaperCIFAR10Net", "PaperImageNetNet"]
