"""How the swarm runtime lays a mesh out in a Docker swarm: names, labels, paths and users inside a task.

Per mesh: one overlay network (``mesh-<mesh>-overlay``, encrypted, not
attachable), one Docker config holding the folder of mesh.toml (`BUNDLE`),
and per mesh service one Swarm service ``<mesh>_<service>`` with three
Docker secrets (its certificate, key and the mesh CA). Everything carries
the labels ``mesh.mesh`` (the mesh's name), ``mesh.state`` (its state folder:
which mesh.toml's mesh this is), ``mesh.run`` and ``mesh.role``; services
and their secrets ``mesh.service`` too. `mesh ps` and `mesh down` find them
by those labels and by the ids each run records in ``.mesh/<name>/swarm.json``
(`Record`), and touch nothing else.

Inside a task the supervisor (`mesh.control.swarm.task`) runs as root with the
group `PROBE_GID` (so do the engine's health checks and ``docker exec``); the
sidecar as `SIDECAR_UID`, the only user that can read the task's key; the app
as its image's user.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mesh.control.docker.layout import LABEL_MESH, LABEL_RUN, LABEL_SERVICE, LABEL_STATE

__all__ = [
    "BUNDLE", "CONFIG_DIR", "KINDS", "LABEL_MESH", "LABEL_ROLE", "LABEL_RUN", "LABEL_SERVICE", "LABEL_STATE",
    "LABEL_VERSION", "MESH_COMMAND", "MESH_PYTHON", "PROBE_GID", "RECORD_FILE", "SIDECAR_UID", "TLS_DIR", "TLS_FILES",
    "Record", "network_name", "object_name", "service_name",
]

LABEL_ROLE = "mesh.role"   # service | network | tls | config
LABEL_VERSION = "mesh.config-version"  # on each task's container: the version (of mesh.toml) its sidecar runs

SIDECAR_UID = 15100        # uid and gid of the sidecar process in every task
PROBE_GID = 15101          # group of the supervisor, health checks and `docker exec`: may reach the admin port

MESH_PYTHON = "/opt/mesh/bin/python3"  # mesh/base's virtualenv, in every service's image
MESH_COMMAND = "/opt/mesh/bin/mesh"

BUNDLE = "/mesh/bundle.tar.gz"   # the Docker config: the folder of mesh.toml, without its state folder
CONFIG_DIR = "/mesh/config"      # where the supervisor unpacks it
TLS_DIR = "/run/secrets/mesh-tls"
TLS_FILES = ("cert.pem", "key.pem", "ca.pem")

RECORD_FILE = "swarm.json"
KINDS = ("services", "networks", "secrets", "configs")  # in the order `mesh down` removes them


def service_name(mesh: str, service: str) -> str:
    """The Swarm service of a mesh service, ``<mesh>_<service>``: its tasks are ``tasks.<mesh>_<service>``."""
    return f"{mesh}_{service}"


def network_name(mesh: str) -> str:
    return f"mesh-{mesh}-overlay"


def object_name(what: str, digest: str) -> str:
    """A secret's or config's name: ``mesh-<digest>-<what>``. Docker never changes one in place, so a
    new content (a renewed certificate) is a new object, named by what it holds."""
    return f"mesh-{digest[:16]}-{what}"


@dataclass
class Record:
    """What one mesh's runs made in the swarm, by kind (`KINDS`) and id: ``.mesh/<name>/swarm.json``.

    Written as each object is made and forgotten as each is removed, so a controller that died
    leaves `mesh down` the list of what to remove (it also finds them by their labels).
    """

    path: Path
    ids: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, state_dir: Path) -> Record:
        path = state_dir / RECORD_FILE
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        ids = {kind: [str(i) for i in data.get(kind, []) if isinstance(i, str)]
               for kind in KINDS} if isinstance(data, dict) else {}
        return cls(path, ids)

    def add(self, kind: str, object_id: str) -> None:
        with self.lock:
            found = self.ids.setdefault(kind, [])
            if object_id not in found:
                found.append(object_id)
                self._save()

    def discard(self, kind: str, object_id: str) -> None:
        with self.lock:
            found = self.ids.get(kind, [])
            if object_id in found:
                found.remove(object_id)
                self._save()

    def of(self, kind: str) -> list[str]:
        return list(self.ids.get(kind, []))

    def _save(self) -> None:
        if not self.path.parent.is_dir():
            return  # the state folder went away: the labels still find everything
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({kind: self.ids.get(kind, []) for kind in KINDS}, indent=2) + "\n")
        os.replace(tmp, self.path)
