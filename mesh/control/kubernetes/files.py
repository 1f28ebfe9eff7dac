"""The mesh's ConfigMap: mesh.toml, the files its sidecars read, and their registry.

The sidecar reads mesh.toml, plugins and lifecycle hooks on ``plugin_path``,
and files that plugin options name (a JWKS, say) relative to the folder of
mesh.toml. The ConfigMap holds each under a key of its own (keys cannot hold
``/``), and the ``items`` of the pod's volume put each back at its path under
the sidecar's working directory. Nothing from the state folder (``.mesh``),
and no file holding a private key, ever goes in: a ConfigMap is configuration,
readable by whoever may read the namespace's.

``registry.json`` lists each service once, as its headless Service's DNS name
on the mesh port: a new connection resolves it to one of the ready pods.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mesh.config import MeshConfig, ServiceConfig
from mesh.control.docker.layout import MESH_PORT
from mesh.control.docker.resources import inside, plugin_path_problems
from mesh.control.kubernetes.names import REGISTRY, is_job, metadata, object_name

__all__ = ["CONFIGMAP_LIMIT", "checksum", "config_map", "mounted_files"]

CONFIGMAP_LIMIT = 1 << 20  # what the API server keeps in one object, metadata included

_SKIP_NAMES = {"__pycache__"}


def mounted_files(config: MeshConfig) -> tuple[dict[str, Path], list[str], list[str]]:
    """What the sidecar finds in its working directory (path there -> file here): mesh.toml, every
    file on ``plugin_path``, every file a plugin option names; then notes, then problems."""
    root = config.root.resolve()
    files: dict[str, Path] = {config.path.name: config.path}
    notes: list[str] = []
    problems: list[str] = plugin_path_problems(config, "the pods get only files under the folder of mesh.toml")
    candidates: list[Path] = []
    for folder in config.plugin_path:
        if inside(folder, root) and folder.is_dir():
            candidates += _walk(folder)
    for service in config.services.values():
        for table in [*service.plugins, *service.outbound]:
            candidates += (root / value for value in _strings(table) if _names_file(value, root))
    for path in candidates:
        if not inside(path, root):
            notes.append(f"{path}: left out of the ConfigMap: a link to outside {config.root}")
            continue
        relative = path.resolve().relative_to(root).as_posix()
        if relative in files:
            continue
        # SECURITY: a ConfigMap is readable by whoever may read the namespace's configuration.
        if b"PRIVATE KEY-----" in path.read_bytes():
            notes.append(f"{relative}: left out of the ConfigMap: it holds a private key (mount it from "
                         f"a Secret of your own at that path under the sidecar's working directory)")
            continue
        files[relative] = path
    size = sum(path.stat().st_size for path in files.values())
    if size > CONFIGMAP_LIMIT * 9 // 10:
        problems.append(f"the files the sidecars need (mesh.toml, plugin_path, files plugin options "
                        f"name) come to {size} bytes; a ConfigMap holds at most about 1 MiB")
    return files, notes, problems


def _names_file(value: str, root: Path) -> bool:
    """Whether a plugin option's value is the path of a file under ``root`` (not in its state folder)."""
    if len(value) > 255 or "\n" in value or value.startswith("/") or "://" in value:
        return False
    path = root / value
    return path.is_file() and inside(path, root) and ".mesh" not in path.resolve().relative_to(root).parts


def _walk(folder: Path) -> Iterator[Path]:
    """The files under ``folder`` but caches and hidden ones (a ``.env`` may hold secrets)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_NAMES and not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and not name.endswith((".pyc", ".pyo")):
                yield Path(dirpath) / name


def _strings(value: Any) -> Iterator[str]:
    """Every string among a plugin table's option values, nested ones included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key != "use":
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def config_map(config: MeshConfig, services: dict[str, ServiceConfig],
               files: dict[str, Path]) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The ConfigMap, and the ``items`` of a volume that put each file back at its path."""
    data: dict[str, str] = {}
    binary: dict[str, str] = {}
    items = []
    for relative, path in sorted(files.items()):
        key = _key(relative, data.keys() | binary.keys())
        content = path.read_bytes()
        try:
            data[key] = content.decode("utf-8")
        except UnicodeDecodeError:
            binary[key] = base64.b64encode(content).decode("ascii")
        items.append({"key": key, "path": relative})
    registry = {"services": {name: [f"{object_name(config, name)}:{MESH_PORT}"]
                             for name, service in services.items() if not is_job(service)}}
    data[REGISTRY] = json.dumps(registry, indent=2) + "\n"
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap",
                           "metadata": metadata(config, config.name), "data": data}
    if binary:
        doc["binaryData"] = binary
    return doc, items


def _key(relative: str, taken: set[str]) -> str:
    """A ConfigMap key for a file's path: only ``-._a-zA-Z0-9``, unique."""
    base = re.sub(r"[^-._a-zA-Z0-9]", "_", relative).lstrip(".") or "file"
    key, n = base, 1
    while key in taken or key == REGISTRY:
        n += 1
        key = f"{base}-{n}"
    return key


def checksum(doc: dict[str, Any]) -> str:
    """Changes whenever the ConfigMap's content does: in the pod template, so that applying a
    changed ConfigMap rolls the pods (a sidecar reads these files when it starts)."""
    text = json.dumps([doc["data"], doc.get("binaryData")], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
