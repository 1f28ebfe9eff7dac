"""The shape of mesh/, read from its source: no import cycle, one direction between planes.

Modules fall in three groups:

- the core every side uses (messages, plugins, config, options, errors, the
  lifecycle hooks' base class);
- the data plane: what a sidecar runs on every request (listeners, upstream
  client, chain layers, policy, balancing, identity, admin);
- the control plane: what `mesh up` runs (controller, instances, runtimes,
  supervision, scaling, keyed services, images, the CLI).

The control plane may import the data plane (it starts sidecars, keyed
fronts proxy); the data plane never imports the control plane, so a sidecar
loads nothing that manages processes or containers. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count. No module
imports another's underscore names.
"""

from __future__ import annotations

import ast
from pathlib import Path

MESH = Path(__file__).resolve().parent.parent / "mesh"

CORE = {"__init__", "errors", "messages", "plugin", "chain", "options", "loader", "lifecycle", "config",
        "keys"}
CONTROL = {"controller", "instances", "supervisor", "autoscale", "runtime", "runtimes", "docker_runtime",
           "images", "keyed", "cli", "__main__"}
# Everything else is the data plane (and mesh.testing, which runs real sidecars in a test's loop).

# Modules over ~600 lines, each at most its size today: they are to be split, never to grow.
OVERSIZED = {"docker_runtime": 1090, "runtime": 880, "images": 800, "server": 760, "controller": 715,
             "upstream": 670}


def modules() -> dict[str, ast.Module]:
    return {path.stem: ast.parse(path.read_text(encoding="utf-8")) for path in MESH.glob("*.py")}


def imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module within mesh, names) for every import of a mesh module that runs (not TYPE_CHECKING)."""
    annotations_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            annotations_only.update(id(child) for child in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            module = node.module or ""
            if node.level == 1:
                found += [(module.split(".")[0], names)] if module else [(name, []) for name in names]
            elif node.level == 0 and module.startswith("mesh"):
                parts = module.split(".")
                found += [(parts[1], names)] if len(parts) > 1 else [(name, []) for name in names]
        elif isinstance(node, ast.Import):
            found += [(alias.name.split(".")[1], []) for alias in node.names
                      if alias.name.startswith("mesh.")]
    return found


def graph() -> dict[str, set[str]]:
    trees = modules()
    return {name: {target for target, _ in imports(tree) if target in trees and target != name}
            for name, tree in trees.items()}


def test_no_import_cycle():
    edges = graph()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for target in sorted(edges[module]):
            if seen.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in seen:
                visit(target, path + [target])
        seen[module] = 2

    for module in sorted(edges):
        if module not in seen:
            visit(module, [module])


def test_the_data_plane_never_imports_the_control_plane():
    edges = graph()
    wrong = sorted(f"{source} -> {target}" for source, targets in edges.items() for target in targets
                   if source not in CONTROL and target in CONTROL)
    assert not wrong, wrong


def test_the_core_imports_only_the_core():
    edges = graph()
    wrong = sorted(f"{source} -> {target}" for source, targets in edges.items() for target in targets
                   if source in CORE and target not in CORE)
    assert not wrong, wrong


def test_no_module_imports_another_modules_private_names():
    wrong = [f"{name} imports {target}.{imported}" for name, tree in modules().items()
             for target, names in imports(tree) for imported in names
             if imported.startswith("_") and not imported.startswith("__")]
    assert not wrong, wrong


def test_modules_stay_small():
    sizes = {path.stem: len(path.read_text(encoding="utf-8").splitlines()) for path in MESH.glob("*.py")}
    wrong = {name: size for name, size in sizes.items() if size > OVERSIZED.get(name, 600)}
    assert not wrong, f"over their limit (600 lines, or the size they are to shrink from): {wrong}"
