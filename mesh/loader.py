"""Find plugin classes from the ``use`` strings of mesh.toml.

``use`` is one of:

- a short name of a first-party plugin (``jwt``, ``ratelimit``, ``cache``,
  ``router``) or of an installed package's ``mesh.plugins`` entry point;
- ``package.module:Class``, imported normally;
- ``file.py:Class``, a file found on the mesh's ``plugin_path``.

A short name is only ever a name: a module called ``jwt.py`` on the path
cannot shadow the pyjwt library the first-party ``jwt`` plugin needs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mesh.errors import PluginError
from mesh.plugin import Plugin

__all__ = ["FIRST_PARTY", "known_names", "load_class", "load_object"]

# The first-party plugins, by short name, in the order the docs list them.
FIRST_PARTY: dict[str, str] = {
    "jwt": "mesh_plugins.jwt:JWT",
    "ratelimit": "mesh_plugins.ratelimit:RateLimit",
    "cache": "mesh_plugins.cache:Cache",
    "router": "mesh_plugins.router:Router",
    "stamp": "mesh_plugins.stamp:Stamp",
}


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points  # here: only plugins named by a package's entry point need it

    return {ep.name: ep for ep in entry_points(group="mesh.plugins")}


def known_names() -> list[str]:
    return sorted(set(FIRST_PARTY) | set(_entry_points()))


def _import_file(path: Path) -> Any:
    # A unique module name per file and content: two meshes' `auth.py` never collide, and a file
    # edited since it was imported is imported afresh (`mesh reload`), while an unchanged one is not.
    digest = hashlib.sha1(str(path).encode() + b"\0" + path.read_bytes()).hexdigest()[:12]
    name = f"mesh_user_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _class_from(module: Any, attr: str, use: str) -> type:
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise PluginError(f"'{use}': no class '{attr}' in {module.__name__}") from None
    return obj


def load_object(use: str, plugin_path: Sequence[Path] = ()) -> Any:
    """What ``module:Name`` or ``file.py:Name`` (found on ``plugin_path``) names; PluginError if not."""
    target, sep, attr = use.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise PluginError(f"'{use}': expected 'file.py:Class' or 'module:Class'")
    if target.endswith(".py"):
        for folder in plugin_path:
            candidate = (folder / target).resolve()
            if candidate.is_file():
                break
        else:
            searched = ", ".join(str(p) for p in plugin_path) or "(plugin_path is empty)"
            raise PluginError(f"'{use}': {target} not found on plugin_path: {searched}")
        try:
            module = _import_file(candidate)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"'{use}': importing {candidate} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(target)
        except Exception as exc:
            raise PluginError(f"'{use}': cannot import module '{target}': "
                              f"{type(exc).__name__}: {exc}") from exc
    return _class_from(module, attr, use)


def load_class(use: str, plugin_path: Sequence[Path] = ()) -> type:
    """Return the plugin class that ``use`` names, or raise `PluginError` saying why."""
    if ":" not in use:
        if use in FIRST_PARTY:
            module_name, attr = FIRST_PARTY[use].split(":")
            cls = _class_from(importlib.import_module(module_name), attr, use)
        elif (ep := _entry_points().get(use)) is not None:
            cls = ep.load()
        else:
            import difflib

            close = difflib.get_close_matches(use, known_names(), n=1)
            hint = f", did you mean '{close[0]}'?" if close else (
                f" (known: {', '.join(known_names())}; or use 'module:Class' or 'file.py:Class')")
            raise PluginError(f"unknown plugin '{use}'{hint}")
    else:
        cls = load_object(use, plugin_path)
    if not (isinstance(cls, type) and issubclass(cls, Plugin)) and not (
        isinstance(cls, type) and callable(getattr(cls, "handle", None))
    ):
        raise PluginError(f"'{use}' is not a plugin: it needs an async handle(request, call_next)")
    return cls
