"""The layers of docs/architecture.md ("Layers"), checked: which package may import which, and no import circles.

Every import counts, also one inside a function (a lazy import is still a dependency). A module may import its own
floor and the floors below; the few upward imports are listed in ALLOWED_UPWARD with the reason for each.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Bottom to top. A name matches a module and everything under it; the longest matching name wins.
FLOORS = [
    ("base", ["tltrain.errors", "tltrain.safe_io", "tltrain.safe_load", "tltrain.timm_names", "tltrain.run_folder",
              "tltrain.contracts", "tltrain.checks"]),
    ("definitions", ["tltrain.preprocess_config", "tltrain.preprocess", "tltrain.preprocess_cpu", "tltrain.metrics",
                     "tltrain.stats", "tltrain.kernels"]),
    ("engine", ["tltrain.engine"]),
    ("data", ["tltrain.data"]),
    ("models", ["tltrain.models", "tltrain.transfer", "tltrain.export.load", "tltrain.export.package_format"]),
    ("apps", ["tltrain"]),
]

#: (importer, imported) pairs that go up a floor, and why. At most two.
ALLOWED_UPWARD = {
    ("tltrain.engine.synthetic", "tltrain.models"):
        "the engine's command-line smoke test (python -m tltrain.engine.synthetic --arch resnet18) builds a timm "
        "model by name; the training loop itself never imports models",
}


def _floor_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is on no floor: add it to FLOORS and to docs/architecture.md"
    return best


def _modules() -> dict[str, Path]:
    found = {}
    for base, package in ((ROOT / "tltrain", "tltrain"), (ROOT / "kernels", "tltrain.kernels")):
        for path in base.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the tltrain modules it imports (resolved to the longest existing module name)."""
    def resolve(name: str) -> str | None:
        while name:
            if name in modules:
                return name
            name = name.rpartition(".")[0]
        return None

    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets.update(resolve(f"{base}.{alias.name}") or resolve(base) for alias in node.names)
        edges[name] = {t for t in targets if t and t != name and t.startswith("tltrain")}
    return edges


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return _imports(_modules())


def test_every_module_is_on_a_floor(edges):
    for module in edges:
        _floor_of(module)


def test_no_module_imports_a_floor_above_its_own(edges):
    # `import tltrain` (its __version__) is left out: the package __init__ imports nothing when it loads
    upward = {(a, b) for a, targets in edges.items() for b in targets
              if b != "tltrain" and _floor_of(b) > _floor_of(a)}
    unexplained = sorted(upward - set(ALLOWED_UPWARD))
    assert not unexplained, "imports that go up a floor (docs/architecture.md, Layers):\n" + "\n".join(
        f"  {a} ({FLOORS[_floor_of(a)][0]}) -> {b} ({FLOORS[_floor_of(b)][0]})" for a, b in unexplained)
    assert len(ALLOWED_UPWARD) <= 2
    assert set(ALLOWED_UPWARD) <= upward, "an allowed upward import no longer exists: remove it from the list"


def test_no_import_circles(edges):
    """Strongly connected components of the import graph (the package __init__ left out: it only re-exports)."""
    graph = {a: {b for b in targets if b != "tltrain"} for a, targets in edges.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
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

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def test_the_package_init_imports_nothing_when_it_loads():
    """What lets every floor `import tltrain` for its version: the package's own imports are all lazy."""
    tree = ast.parse((ROOT / "tltrain" / "__init__.py").read_text())
    assert not [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]


def test_the_checker_sees_lazy_imports(edges):
    """The trainer's imports, read from the source (a lazy import would be missed by a checker of the top only)."""
    assert "tltrain.engine.checkpoint" in edges["tltrain.engine.trainer"]
    assert "tltrain.models" in edges["tltrain.engine.synthetic"]  # imported inside main()
