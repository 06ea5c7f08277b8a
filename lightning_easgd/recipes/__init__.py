"""The recipe kit behind ``recipes/*.py``: models, data modules, the classifier, the Hydra training function,
schedulers, the wall-clock logger and the plots.

The plugin (``import lightning_easgd``: the strategies, the core, the callbacks) needs only torch and Lightning;
the kit needs the ``recipes`` extra, ``pip install "lightning-easgd[recipes]"``. Importing any part of the kit
without it fails here, naming what to install, rather than deep inside torchvision or Hydra.
"""

from importlib.util import find_spec

# What the kit imports -> the distribution that provides it.
_REQUIREMENTS = {
    "hydra": "hydra-core",
    "matplotlib": "matplotlib",
    "torchmetrics": "torchmetrics",
    "torchvision": "torchvision",
}

_missing = [distribution for module, distribution in _REQUIREMENTS.items() if find_spec(module) is None]
if _missing:
    raise ImportError(
        f"lightning_easgd.recipes needs {', '.join(_missing)}, which the plugin alone does not install; "
        'install the recipe kit with: pip install "lightning-easgd[recipes]"'
    )
