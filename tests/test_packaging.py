"""The plugin installs light: ``import lightning_easgd`` needs torch and Lightning, not the recipe kit's stack.

Both checks run in a fresh interpreter, so nothing this test process already imported can hide an import.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from pathlib import Path

from helpers.bounded import run_bounded

REPO = Path(__file__).resolve().parents[1]

# Top-level modules of the `recipes` extra's distributions (torchmetrics is left out: Lightning itself needs it).
KIT_MODULES = ("torchvision", "hydra", "omegaconf", "matplotlib", "tensorboard")


def _python(code: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    result = run_bounded([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


def test_the_plugin_imports_nothing_from_the_recipe_kit_stack() -> None:
    # Every module of the plugin (whatever is added at the top level later) is imported. Two views: which new
    # modules appear in sys.modules, and which import statements the plugin's own code executes. The second one
    # matters where the kit's packages are installed: Lightning and torchmetrics then import torchvision and
    # matplotlib themselves, which would hide a plugin module importing them too.
    out = _python(
        """
        import builtins, importlib, json, pkgutil, sys
        KIT = sys.argv[1:]
        direct = []
        original = builtins.__import__
        def recording(name, globals=None, locals=None, fromlist=(), level=0):
            importer = (globals or {}).get("__name__", "")
            if level == 0 and importer.startswith("lightning_easgd") and name.split(".")[0] in KIT:
                direct.append(f"{importer} imports {name}")
            return original(name, globals, locals, fromlist, level)
        builtins.__import__ = recording
        import lightning.pytorch, lightning.fabric
        before = set(sys.modules)
        import lightning_easgd
        plugin, packages = [], [lightning_easgd]
        while packages:  # pkgutil.walk_packages would import the kit's packages to look inside them
            package = packages.pop()
            for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
                if info.name != "lightning_easgd.recipes":
                    plugin.append(info.name)
                    module = importlib.import_module(info.name)
                    if info.ispkg:
                        packages.append(module)
        new = sorted(m for m in set(sys.modules) - before if m.split(".")[0] in KIT)
        kit = "lightning_easgd.recipes" in sys.modules
        print(json.dumps({"plugin": plugin, "kit": kit, "new": new, "direct": direct}))
        """,
        *KIT_MODULES,
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert ("lightning_easgd.trainer.strategy" in report["plugin"]
            and "lightning_easgd.core.averager" in report["plugin"])
    assert report["kit"] is False and report["new"] == [] and report["direct"] == [], report


def test_importing_the_kit_without_its_extra_says_what_to_install() -> None:
    # sys.modules[name] = None makes `import name` fail and find_spec return None: a machine without torchvision.
    out = _python("""
        import sys
        import lightning_easgd
        sys.modules["torchvision"] = None
        try:
            import lightning_easgd.recipes.train
        except ImportError as error:
            print("ImportError:", error)
        else:
            print("imported")
        print("strategy:", lightning_easgd.EASGDStrategy.__name__)
    """)
    # (On a plugin-only install hydra-core and matplotlib are named too.)
    assert re.search(r"ImportError: lightning_easgd\.recipes needs [\w, -]*\btorchvision\b", out), out
    assert 'pip install "lightning-easgd[recipes]"' in out, out
    assert "strategy: EASGDStrategy" in out, out
