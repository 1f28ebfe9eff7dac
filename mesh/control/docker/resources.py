"""What every container runtime (docker, swarm, kubernetes) checks of a service the same way.

An app's port must not be one of the sidecar's inside its container, task
or pod; ``memory`` is a size Docker accepts (`memory_bytes`); ``cpus`` is
positive; plugin folders lie inside the folder of mesh.toml, the only one
shipped to the sidecars.
"""

from __future__ import annotations

import re
from pathlib import Path

from mesh.config import MeshConfig, ServiceConfig
from mesh.control.docker.layout import DEFAULT_APP_PORT, SIDECAR_PORTS

__all__ = ["MIN_MEMORY", "inside", "memory_bytes", "plugin_path_problems", "service_problems"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
MIN_MEMORY = 6 << 20  # Docker refuses less


def memory_bytes(text: str | int) -> int:
    """``"512m"``, ``"512MB"``, ``"512MiB"``, ``"1.5g"`` or a number of bytes, in bytes (binary units,
    as Docker counts them). Raises ValueError saying what it expected."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _MEMORY.match(str(text))
        if not match:
            raise ValueError(f"expected a size like '256m', '1g' or '512MiB', found {text!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < MIN_MEMORY:
        raise ValueError(f"expected at least 6m (Docker's minimum), found {text!r}")
    return value


def service_problems(where: str, service: ServiceConfig, unit: str) -> list[str]:
    """What of ``service``'s port, memory and cpus a container cannot hold; ``unit``: "instance", "task", "pod"."""
    found = []
    port = service.port or DEFAULT_APP_PORT
    if port in SIDECAR_PORTS:
        found.append(f"{where}.port: {port} is the sidecar's inside the {unit} (it uses "
                     f"{', '.join(map(str, SIDECAR_PORTS))}); give the app another port")
    if service.memory is not None:
        try:
            memory_bytes(service.memory)
        except ValueError as exc:
            found.append(f"{where}.memory: {exc}")
    if service.cpus is not None and service.cpus <= 0:
        found.append(f"{where}.cpus: expected more than 0, found {service.cpus:g}")
    return found


def plugin_path_problems(config: MeshConfig, ships: str) -> list[str]:
    """``mesh.plugin_path`` folders outside the folder of mesh.toml; ``ships`` says what the runtime ships of it."""
    return [f"mesh.plugin_path: {folder} is outside {config.root}; {ships}"
            for folder in config.plugin_path if not inside(folder, config.root)]


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (its links followed) lies in ``root``."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True
