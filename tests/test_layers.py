"""The package's import graph: layers that only import downward, no import circle, and the Trainer package
(``lightning.pytorch``) imported only where the Trainer is the point.

Layers, bottom to top: ``core`` (the algorithm, torch only) < ``adapter`` (what both framework adapters share) <
``checkpoint`` (the on-disk format) < ``trainer`` | ``fabric`` (side by side: neither imports the other) <
``recipes``. The package's ``__init__`` registers the strategies, so it may import everything but ``recipes``.
Modules are parsed with :mod:`ast`, not imported, and every import counts: inside functions and under
``if TYPE_CHECKING:`` too (a typing-only import still ties the layers together and can close a circle).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_easgd"
LAYERS = {"core": 0, "adapter": 1, "checkpoint": 2, "trainer": 3, "fabric": 3, "recipes": 4}
ROOT = "lightning_easgd"
TRAINER_PACKAGE_ALLOWED = ("trainer", "recipes", "")
"""Where ``lightning.pytorch`` (or ``lightning``, which imports it) may be imported: "" is the package's __init__."""


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path) -> Iterator[str]:
    """Every module ``name`` imports (absolute names; ``from a import b`` yields ``a`` and ``a.b``)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


def layer(name: str) -> str:
    """The layer of an internal module: its folder under the package ("" for the package's __init__)."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports."""
    known = modules()
    return {name: {m for m in imports(name, path) if m in known and m != name} for name, path in known.items()}


def test_the_package_is_laid_out_by_layer() -> None:
    assert {layer(name) for name in modules()} == {"", *LAYERS}


def test_no_import_runs_back_up_a_layer() -> None:
    wrong = []
    for source, targets in graph().items():
        for target in targets:
            here, there = layer(source), layer(target)
            if here == "":
                allowed = there != "recipes"
            elif there == "":
                allowed = here == "recipes"  # the package's __init__ imports trainer and fabric: only recipes is above
            else:
                allowed = LAYERS[there] < LAYERS[here] or there == here
            if not allowed:
                wrong.append(f"{source} ({here or '__init__'}) imports {target} ({there or '__init__'})")
    assert not wrong, "imports running back up a layer (or across trainer | fabric):\n" + "\n".join(sorted(wrong))


def test_no_import_circle() -> None:
    edges = graph()
    # Tarjan's strongly connected components: a component of more than one module is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in edges:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_the_trainer_package_is_imported_only_by_the_trainer_side() -> None:
    wrong = []
    for name, path in modules().items():
        if layer(name) in TRAINER_PACKAGE_ALLOWED:
            continue
        for module in imports(name, path):
            if module == "lightning" or module.startswith(("lightning.pytorch", "pytorch_lightning")):
                wrong.append(f"{name} imports {module}")
    assert not wrong, "lightning.pytorch outside trainer/ and recipes/:\n" + "\n".join(sorted(set(wrong)))


def test_the_core_imports_torch_only() -> None:
    wrong = sorted({f"{name} imports {module}" for name, path in modules().items() if layer(name) == "core"
                    for module in imports(name, path) if module.split(".")[0] in ("lightning", "pytorch_lightning",
                                                                                 "hydra", "omegaconf")})
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(("source", "target"), [
    ("lightning_easgd.core.averager", "lightning_easgd.trainer.strategy"),
    ("lightning_easgd.trainer.strategy", "lightning_easgd.fabric.strategy"),
])
def test_the_check_sees_an_upward_import(source: str, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks are not vacuous: an added upward (or sideways) import is reported."""
    real = graph()
    monkeypatch.setitem(globals(), "graph", lambda: {**real, source: real[source] | {target}})
    with pytest.raises(AssertionError, match=f"{source} .* imports {target}"):
        test_no_import_runs_back_up_a_layer()
