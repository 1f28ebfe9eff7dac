"""Per-key volumes on the docker runtime: a named volume for each key of a keyed service with ``volume``.

A key's volume is ``mesh-<mesh>-<8 hex of its state folder>-<volume>``
(`volume_name`; ``<volume>`` is `mesh.control.keyed.key_volume`'s digest of
the key, the state folder's keeps apart meshes of one name in two folders).
Its key's app container mounts it at ``instances.volume`` (`volume_mount`, in
`mesh.control.docker.containers.app_spec`), and no other container does; the
engine makes it with that container, labelled as this mesh's (`LABEL_MESH`,
`LABEL_STATE`, `LABEL_SERVICE`, `LABEL_KEY`: the instance's label, a hash, never
the key; `LABEL_ROLE` ``volume``). Removing the containers leaves it; `mesh down
--volumes` removes the volumes with this mesh's labels (`remove_volumes`),
nothing else.

A new volume starts as a copy of what the image holds at that path, owner and
mode included (the engine's copy-up): an app that runs as another user than
root finds the folder writable when its image makes it so (``RUN mkdir /data &&
chown 65534 /data``).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from typing import TYPE_CHECKING

from mesh.config import MeshConfig
from mesh.control.docker import images
from mesh.control.docker.layout import LABEL_KEY, LABEL_MESH, LABEL_ROLE, LABEL_SERVICE, LABEL_STATE

if TYPE_CHECKING:
    from docker.types import Mount

    from mesh.control.runtimes.base import Instance

__all__ = ["VOLUME_ROLE", "remove_volumes", "volume_mount", "volume_name"]

VOLUME_ROLE = "volume"


def volume_name(mesh: str, state: str, volume: str) -> str:
    """The engine's name of a key's volume: ``mesh-<mesh>-<8 hex of sha256(state)>-<volume>``."""
    return f"mesh-{mesh}-{hashlib.sha256(state.encode()).hexdigest()[:8]}-{volume}"


def volume_mount(config: MeshConfig, instance: Instance, labels: dict[str, str]) -> Mount | None:
    """The mount of ``instance``'s key's volume at ``instances.volume`` (None: it has none); made by the
    engine if it is not there yet, with this mesh's ``labels`` (its app container's) as a volume's."""
    from docker.types import Mount

    spec = config.services[instance.service].instances
    if instance.volume is None or spec is None or not spec.volume:
        return None
    state = labels[LABEL_STATE]
    own = {key: labels[key] for key in (LABEL_MESH, LABEL_STATE, LABEL_SERVICE, LABEL_KEY) if key in labels}
    return Mount(spec.volume, volume_name(config.name, state, instance.volume), type="volume",
                 read_only=False, labels={**own, LABEL_ROLE: VOLUME_ROLE})


def remove_volumes(config: MeshConfig, *, required: bool) -> int | None:
    """`mesh down --volumes` on docker: remove the volumes with this mesh's name, state folder and role
    labels; how many, or None when it could not (said on stderr; without ``required``, an engine
    that does not answer is no error: 0)."""
    try:
        client = images.docker_client(timeout=60)
    except images.DockerUnavailable as exc:
        if not required:
            return 0
        print(f"mesh '{config.name}': cannot remove its volumes: {exc}", file=sys.stderr)
        return None
    import docker

    where = {"label": [f"{LABEL_MESH}={config.name}", f"{LABEL_STATE}={config.state_dir.resolve()}",
                       f"{LABEL_ROLE}={VOLUME_ROLE}"]}
    removed, failed = 0, []
    try:
        for volume in client.api.volumes(filters=where).get("Volumes") or []:
            try:
                client.api.remove_volume(volume["Name"])
            except docker.errors.NotFound:
                continue
            except docker.errors.APIError as exc:
                failed.append(f"{volume['Name']}: {exc.explanation or exc}")
                continue
            removed += 1
    finally:
        with contextlib.suppress(Exception):
            client.close()
    for line in failed:
        print(f"mesh '{config.name}': cannot remove the volume {line}", file=sys.stderr)
    return None if failed else removed
