"""`mesh reload` on swarm: a rolling update of each Swarm service whose tasks see a change, and of no other.

A task's sidecar is given everything at its start (`mesh.control.swarm.services`):
its Swarm service's spec (image, command, environment, ports, health check,
resources, the services it resolves) and the folder of mesh.toml as a Docker
config, which Docker never changes in place. So on swarm every change is a
rolling update: new tasks with the new spec and the new folder, one at a time,
a new task first where the service publishes no port (an exposed one on a
one-node swarm: the old task first, so its port is down for a few seconds).

The folder is the same for every service, but not all of it concerns each:
a sidecar acts on (`sidecar_view`) the mesh's own settings, its service's
table, the routes from or to it, the egress entries from it, the plugin code
on ``plugin_path`` when a chain of it uses a plugin from there, and the
folder's other files (a plugin may read them). A service is updated when its
spec or that view changed, and it then gets the new folder; every other one
keeps its tasks and the folder they run, so their sidecars keep reporting the
version they run (each task's is the ``mesh.config-version`` label).

Updates run one service after the other and wait until the engine completes
each (`roll`). A task of the new spec that fails or never passes its health
check makes Swarm roll that service back (``failure_action = rollback``); the
services updated before it are then rolled back to the spec they had, and the
reload fails with the reason: the mesh runs what it ran.

Everything here blocks; from asyncio, call it on a thread.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.config import MeshConfig, PluginSpec
from mesh.config.version import code_files
from mesh.control.runtimes.base import StartFailed
from mesh.control.swarm.objects import roll
from mesh.control.swarm.services import ServiceInputs, bundled_files, digest

if TYPE_CHECKING:
    import docker

__all__ = ["Update", "roll_out", "sidecar_view"]


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def _inside(path: Path, folders: list[Path]) -> bool:
    return any(path.is_relative_to(folder) for folder in folders)


def _uses_plugin_path(specs: list[PluginSpec], folders: list[Path]) -> bool:
    for spec in specs:
        try:
            source = Path(inspect.getfile(spec.cls)).resolve()
        except (TypeError, OSError):
            return True  # where it comes from cannot be told: count it in
        if _inside(source, folders):
            return True
    return False


def sidecar_view(config: MeshConfig, name: str) -> str:
    """A digest of what of the folder of mesh.toml service ``name``'s sidecar acts on, as the files are
    now (see the module docstring)."""
    service = config.services[name]
    routes = [route for route in config.routes if name in (route.source, route.to)]
    specs = [*service.plugin_specs, *service.outbound_specs,
             *(spec for route in service.routes for spec in route.plugin_specs),
             *(spec for route in routes for spec in route.plugin_specs)]
    folders = [folder.resolve() for folder in config.plugin_path]
    code = sorted(path for folder in folders for path in code_files(folder))
    view = {
        "mesh": _plain([config.name, config.mode, config.defaults, config.tracing, [str(f) for f in folders]]),
        "service": _plain(service),
        "routes": _plain(routes),
        "egress": _plain([entry for entry in config.egress if entry.source == name]),
    }
    parts: list[bytes | str] = [json.dumps(view, sort_keys=True)]
    if _uses_plugin_path(specs, folders):
        parts += [part for path in code for part in (str(path), _read(path))]
    mesh_toml = config.path.resolve()
    parts += [part for path in bundled_files(config)
              if path.resolve() != mesh_toml and not _inside(path.resolve(), folders)
              for part in (str(path), _read(path))]
    return digest(*parts)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


@dataclass
class Update:
    """One Swarm service to update: the spec it has (``before``) and the one it gets (``after``,
    made of ``inputs``), and the seconds its rolling update may take."""

    name: str
    service_id: str
    before: dict[str, Any]
    after: dict[str, Any]
    inputs: ServiceInputs
    timeout: float


def roll_out(client: docker.DockerClient, updates: list[Update]) -> None:
    """Each update in turn, each waited for; raises `StartFailed` when one failed, once the engine
    rolled it back and the ones done before it went back to their spec (see the module docstring)."""
    done: list[Update] = []
    for update in updates:
        problem = roll(client, update.service_id, update.after, update.timeout)
        if problem is None:
            done.append(update)
            continue
        undone = []
        for earlier in reversed(done):
            trouble = roll(client, earlier.service_id, earlier.before, earlier.timeout)
            undone.append(f"{earlier.name}: " + ("rolled back" if trouble is None else trouble))
        raise StartFailed(update.name, problem + (f" (then {'; '.join(undone)})" if undone else ""))
