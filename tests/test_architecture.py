"""The shape of mesh/, read from its source: no import cycle, one direction between planes.

The packages are the planes:

- ``mesh`` itself (its top-level modules) and ``mesh.config``: the core and
  public API every side uses (messages, plugins, chains, options, errors,
  configuration, the lifecycle hooks' base class);
- ``mesh.http``: HTTP/1.1 on the wire (listener protocol, response writer,
  client pool, framing, the WebSocket tunnel), which knows nothing of meshes;
- ``mesh.sidecar``: the data plane, what a sidecar runs on every request
  (chain layers, policy, balancing, identity, admin, the keyed front);
- ``mesh.control``: the control plane, what `mesh up` runs (controller,
  instances, runtimes, supervision, scaling, keyed services, images).

Each plane imports only the ones before it: the data plane never imports
the control plane, so a sidecar loads nothing that manages processes or
containers. The entry points (``mesh.cli``, ``mesh.__main__``) and
``mesh.testing`` sit outside and may import anything. Imports under
``if TYPE_CHECKING:`` are annotations only and do not count. No module
imports another's underscore names, and no module imports itself in a cycle.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MESH = ROOT / "mesh"

# The planes in order: each may import its own and the ones before it.
PLANES = ["core", "http", "sidecar", "control"]
ENTRY = {"mesh.cli", "mesh.__main__", "mesh.testing"}

# Modules over ~600 lines, each at most its size today: they are to be split, never to grow.
OVERSIZED: dict[str, int] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(path): (path, ast.parse(path.read_text(encoding="utf-8")))
            for path in sorted(MESH.rglob("*.py"))}


def plane(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in PLANES else "core"


def imports(module: str, path: Path, tree: ast.Module, known: set[str]) -> list[tuple[str, list[str]]]:
    """(mesh module, names) for every import of a mesh module that runs (not TYPE_CHECKING)."""
    annotations_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            annotations_only.update(id(child) for child in ast.walk(node))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("mesh"):
                continue
            names = [alias.name for alias in node.names]
            submodules = [f"{base}.{name}" for name in names if f"{base}.{name}" in known]
            found += [(sub, []) for sub in submodules]
            found.append((base, [name for name in names if f"{base}.{name}" not in known]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("mesh")]
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: {target for target, _ in imports(name, path, tree, known) if target in known and target != name}
            for name, (path, tree) in found.items()}


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


def test_each_plane_imports_only_itself_and_the_planes_before_it():
    edges = graph()
    wrong = sorted(f"{source} ({plane(source)}) -> {target} ({plane(target)})"
                   for source, targets in edges.items() if source not in ENTRY
                   for target in targets if target != "mesh"
                   if PLANES.index(plane(target)) > PLANES.index(plane(source)))
    assert not wrong, wrong


def test_the_data_plane_never_imports_the_control_plane():
    edges = graph()
    wrong = sorted(f"{source} -> {target}" for source, targets in edges.items()
                   if plane(source) == "sidecar" for target in targets if plane(target) == "control")
    assert not wrong, wrong


def test_no_module_imports_another_modules_private_names():
    found = modules()
    known = set(found)
    wrong = [f"{name} imports {target}.{imported}" for name, (path, tree) in found.items()
             for target, names in imports(name, path, tree, known) for imported in names
             if imported.startswith("_") and not imported.startswith("__") and target != name]
    assert not wrong, wrong


def test_modules_stay_small():
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, (path, _) in modules().items()}
    wrong = {name: size for name, size in sizes.items() if size > OVERSIZED.get(name, 600)}
    assert not wrong, f"over their limit (600 lines, or the size they are to shrink from): {wrong}"


def test_every_package_is_installed():
    """A package missing from pyproject's list would be left out of the wheel (and the Docker images)."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(path) for path in MESH.rglob("__init__.py")}
    assert packages <= listed, sorted(packages - listed)
