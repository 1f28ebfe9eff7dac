"""The public API is what `mesh.__all__` says, and first-party plugins use nothing else."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import mesh
from mesh.loader import FIRST_PARTY

ROOT = Path(__file__).resolve().parents[2]


PUBLIC = [
    "AVOID", "BACKEND", "BodyTooLarge", "CLAIMS", "CallNext", "ConfigError", "Context", "DEADLINE", "Duration",
    "Handler", "Headers", "LISTENER", "LOG_FIELDS", "MeshError", "Plugin", "PluginError", "RETRIES", "Rate",
    "Request", "Response",
    "Retries", "StateKey", "TIMEOUT", "TRY_TIMEOUT", "UPSTREAM", "UpstreamError",
]

# Documented submodules, and the names their users rely on.
SUBMODULES = {
    "mesh.testing": ["ReplayReport", "Replayed", "TestMesh", "echo", "make_request", "ok", "replay", "run_chain",
                     "run_mesh", "run_plugin", "started", "stream"],
    "mesh.sidecar.inbound": ["CallerDeadline", "PeerIdentity", "RoutePolicy"],
    "mesh.sidecar.resilience": ["CircuitBreaker", "Deadline", "Retry"],
    "mesh.lifecycle": ["Lifecycle"],
}


def test_public_names_are_locked():
    assert sorted(mesh.__all__) == PUBLIC
    for name in mesh.__all__:
        assert hasattr(mesh, name)


def test_the_public_names_are_the_documented_ones():
    text = (ROOT / "docs" / "plugins.md").read_text()
    section = text.split("## The public API", 1)[1]
    listed, modules = section.split("Public too", 1)
    assert sorted(re.findall(r"`(\w+)`", listed)) == PUBLIC
    assert sorted(re.findall(r"`(mesh(?:\.\w+)+)`", modules)) == sorted(SUBMODULES)


def test_documented_submodules_import_with_their_names():
    for module, names in SUBMODULES.items():
        imported = importlib.import_module(module)
        for name in names:
            assert hasattr(imported, name), f"{module}.{name}"
    assert sorted(importlib.import_module("mesh.testing").__all__) == SUBMODULES["mesh.testing"]


ALLOWED_THIRD_PARTY = {"jwt", "limits", "cachetools", "cryptography", "multidict"}
# The modules of plugins/ that no short name loads: helpers a plugin may import (they are held to this rule too).
PLUGIN_HELPERS = ({f"mesh_plugins.{path.stem}" for path in (ROOT / "plugins").glob("*.py")}
                  - {"mesh_plugins.__init__"} - {target.split(":")[0] for target in FIRST_PARTY.values()})


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
                elif module in PLUGIN_HELPERS:
                    continue
                elif top not in sys.stdlib_module_names and top not in ALLOWED_THIRD_PARTY:
                    problems.append(f"{file.name}: imports {module}")
    assert problems == []
