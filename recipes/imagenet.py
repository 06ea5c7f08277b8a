"""Train on ImageNet (or any ImageFolder dataset) with EASGD/EAMSGD (or a baseline) from Hydra configs in ``conf/``.

    python recipes/imagenet.py data.data_dir=/data/imagenet     # the paper's EAMSGD run, p = 4, tau = 10
    python recipes/imagenet.py experiment=imagenet_resnet50_eamsgd data.data_dir=/data/imagenet trainer=gpu
    python recipes/imagenet.py -m experiment=imagenet_paper_eamsgd_p_sweep data.data_dir=/data/imagenet

See docs/recipes.md for every config group, multi-node launches and plotting.
"""

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("lightning_easgd") is None:  # running from a source checkout, not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The kit first: without the recipes extra its ImportError says what to install.
from lightning_easgd.recipes.train import train  # noqa: E402, I001

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(version_base="1.3", config_path="../conf", config_name="imagenet")
def main(cfg: DictConfig) -> float | None:
    """Fit, test the center, and return its test accuracy (the objective for Hydra sweepers)."""
    return train(cfg).get("test/acc")


if __name__ == "__main__":
    main()
