"""The package's layers, read from its source: no import circle, imports only point down, no private name shared.

Every ``import`` and ``from ... import`` in every module counts, at the top or inside a function (a lazy import is
a dependency all the same). A module belongs to the first unit of LAYERS its dotted name starts with (``farm.pool``
before ``farm``); a unit may import units of lower layers, and units of its own layer where the layer allows it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "edgeprune"

# Lowest first: (layer, its units, whether its units may import each other). A unit is a subpackage or a module.
LAYERS = (
    ("base", ("errors", "_torchvision_shim"), False),
    ("inputs", ("target", "text", "dataset", "tokens", "data", "model", "zoo", "config"), True),
    ("graph", ("graph",), False),  # torch-pruning's dependency graph, the plan, module helpers
    ("stages", ("score", "rewrite"), False),  # scoring and rewriting: independent of each other
    ("devices", ("farm.pool", "device", "board"), True),
    ("measurement", ("backends", "estimate"), True),
    ("farm", ("farm",), False),
    ("search", ("search", "aim", "context", "rounds", "loop", "budgets", "adapt"), True),
    (
        "build",
        (
            "options",
            "methods",
            "stages",
            "strategies",
            "prepare",
            "ship",
            "pipeline",
            "profile",
            "bench",
            "validate",
            "outdir",
            "report",
            "html",
            "jobs",
        ),
        True,
    ),  # fmt: skip
    ("cli", ("cli", "progress", "__init__"), True),
)

# Imports that break the rules today, each with what removes it. An entry whose import is gone fails the test, so
# that the list only shrinks.
ALLOWED = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import of the package in module ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "edgeprune"]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            if source.split(".")[0] != "edgeprune":
                continue
            names = [alias.name for alias in node.names]
            # ``from edgeprune.score import importance`` imports the module edgeprune.score.importance
            submodules = [f"{source}.{n}" for n in names if f"{source}.{n}" in MODULES]
            found += [(m, [], node.lineno) for m in submodules]
            if len(submodules) < len(names):
                found.append((source, [n for n in names if f"{source}.{n}" not in MODULES], node.lineno))
    return found


def edges() -> dict[tuple[str, str], int]:
    """(importer, imported) → the line of its first import, between modules of the package, self-imports left out."""
    found: dict[tuple[str, str], int] = {}
    for name in MODULES:
        for imported, _, line in imports_of(name):
            target = imported
            while target not in MODULES:  # ``import edgeprune.score.x.y`` of an attribute: the module holding it
                target = target.rpartition(".")[0]
            if target != name:
                found.setdefault((name, target), line)
    return found


def unit_of(name: str) -> str:
    inner = name.removeprefix("edgeprune").removeprefix(".") or "__init__"
    units = [unit for _, layer_units, _ in LAYERS for unit in layer_units]
    matching = [u for u in units if inner == u or inner.startswith(u + ".")]
    assert matching, f"{name} is in no layer: add its subpackage or module to LAYERS in tests/test_layers.py"
    return max(matching, key=len)


def layer_of(unit: str) -> tuple[int, bool]:
    return next((i, peers) for i, (_, units, peers) in enumerate(LAYERS) if unit in units)


def test_the_package_is_parsed_whole():
    names = set(MODULES)
    assert {"edgeprune.graph.groups", "edgeprune.graph.plan", "edgeprune.score.importance"} <= names
    assert ("edgeprune.rewrite.prune", "edgeprune.graph.groups") in edges()
    assert ("edgeprune.zoo", "edgeprune.text") in edges()  # imported inside a function: it counts too


def test_every_allowed_exception_is_still_needed():
    found = edges()
    stale = [f"{a} -> {b}" for a, b in ALLOWED if (a, b) not in found]
    assert not stale, f"these imports are gone: delete their ALLOWED entries in tests/test_layers.py: {stale}"


def test_no_import_circles():
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for a, b in edges():
        if (a, b) not in ALLOWED:
            graph[a].add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for imported in sorted(graph[name]):
            if state.get(imported) == 1:
                return path[path.index(imported) :] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            raise AssertionError("import circle: " + " -> ".join(cycle))


def test_imports_point_down_the_layers():
    wrong = []
    for (a, b), line in sorted(edges().items()):
        unit_a, unit_b = unit_of(a), unit_of(b)
        if unit_a == unit_b or (a, b) in ALLOWED:
            continue
        (layer_a, peers), (layer_b, _) = layer_of(unit_a), layer_of(unit_b)
        if layer_b > layer_a or (layer_b == layer_a and not peers):
            wrong.append(f"{a} (line {line}, layer {LAYERS[layer_a][0]}) imports {b} (layer {LAYERS[layer_b][0]})")
    assert not wrong, "imports that do not point down:\n" + "\n".join(wrong)


def test_no_private_name_is_imported_from_another_module():
    wrong = []
    for name in MODULES:
        for imported, names, line in imports_of(name):
            private = [n for n in names if n.startswith("_")]
            if private and imported != name:
                wrong.append(f"{name} (line {line}) imports {', '.join(private)} from {imported}")
    assert not wrong, "private names imported across modules:\n" + "\n".join(wrong)
