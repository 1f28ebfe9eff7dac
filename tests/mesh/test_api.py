"""The public API is what `mesh.__all__` says, and first-party plugins use nothing else."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import mesh

ROOT = Path(__file__).resolve().parents[2]


def test_public_names_are_locked():
    assert sorted(mesh.__all__) == [
        "BodyTooLarge", "CallNext", "ConfigError", "Context", "Duration", "Handler", "Headers",
        "MeshError", "Plugin", "PluginError", "Rate", "Request", "Response", "UpstreamError",
    ]
    for name in mesh.__all__:
        assert hasattr(mesh, name)


ALLOWED_THIRD_PARTY = {"jwt", "limits", "cachetools", "cryptography", "multidict"}


def test_plugins_import_only_the_public_api():
    problems = []
    for file in sorted((ROOT / "plugins").glob("*.py")):
        tree = ast.parse(file.read_text(), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    problems.append(f"{file.name}: relative import")
                    continue
                modules = [(node.module or "", [a.name for a in node.names])]
            else:
                continue
            for module, names in modules:
                top = module.split(".")[0]
                if module == "mesh":
                    for name in names or []:
                        if name not in mesh.__all__:
                            problems.append(f"{file.name}: imports mesh.{name}, which is not public")
                elif top == "mesh" or top == "aiohttp":
                    problems.append(f"{file.name}: imports {module}")
                elif top not in sys.stdlib_module_names and top not in ALLOWED_THIRD_PARTY:
                    problems.append(f"{file.name}: imports {module}")
    assert problems == []
