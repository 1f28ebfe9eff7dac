"""The version of a mesh: a hash of its mesh.toml and of the plugin code on its ``plugin_path``.

`mesh reload` applies a version; each sidecar reports the version it runs
(``GET /config``, ``mesh ps``). Two sidecars with the same version run the
same configuration and the same plugin code. The code is every ``.py``
file directly in a ``plugin_path`` folder and in the packages below it
(folders with an ``__init__.py``), read in a fixed order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from mesh.config.model import MeshConfig

__all__ = ["code_files", "version"]

MAX_FILES = 5000  # a plugin_path pointed at a huge tree is hashed this far, not forever


def code_files(folder: Path) -> Iterator[Path]:
    """The ``.py`` files of ``folder`` and of the packages in it, sorted, at most `MAX_FILES`."""
    seen = 0
    pending = [folder]
    while pending and seen < MAX_FILES:
        current = pending.pop(0)
        try:
            entries = sorted(current.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or entry.name == "__pycache__":
                continue
            if entry.suffix == ".py" and entry.is_file():
                seen += 1
                yield entry
            elif entry.is_dir() and (entry / "__init__.py").is_file():
                pending.append(entry)


def version(config: MeshConfig, text: bytes | None = None) -> str:
    """12 hex digits that change when mesh.toml (``text``, else the file) or the plugin code changes."""
    digest = hashlib.sha256(config.path.read_bytes() if text is None else text)
    for folder in config.plugin_path:
        for file in code_files(folder):
            try:
                content = file.read_bytes()
            except OSError:
                continue
            digest.update(b"\0" + str(file.relative_to(folder)).encode() + b"\0" + content)
    return digest.hexdigest()[:12]
