"""The Lightning Fabric adapter: :class:`EASGDFabricStrategy`. Imports ``lightning.fabric``, never
``lightning.pytorch``."""

from lightning_easgd.fabric.strategy import EASGDFabricStrategy

__all__ = ["EASGDFabricStrategy"]
