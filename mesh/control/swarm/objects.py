"""A mesh's overlay network, Docker secrets and configs, and the rolling update that gives a service new ones.

Docker never changes a secret or a config in place: a renewed certificate is
a new secret, named after what it holds (`object_name`), and the service is
updated to use it, one task at a time (`roll`); the old secrets go once no
task uses them. Every object made here is recorded (`Record`) as it is made.

Everything here blocks; from asyncio, call it on a thread.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.control.runtimes.base import StartFailed
from mesh.control.swarm.layout import LABEL_STATE, TLS_FILES, Record, network_name, object_name
from mesh.control.swarm.services import digest

if TYPE_CHECKING:
    import docker

__all__ = ["create_object", "make_network", "remove_unused", "roll", "tls_secrets"]

_STOPPED = ("paused", "rollback_paused", "rollback_completed")  # rollback_started: wait until it ends


def create_object(client: docker.DockerClient, record: Record, kind: str, name: str, data: bytes,
                  labels: dict[str, str]) -> str:
    """A secret (``kind`` "secrets") or config holding ``data``, recorded; or the one of this mesh (its
    ``mesh.state`` label) that has that name already. Raises `StartFailed` saying why not."""
    import docker

    api = client.api
    create = api.create_secret if kind == "secrets" else api.create_config
    try:
        object_id = str(create(name, data, labels=labels)["ID"])
    except docker.errors.APIError as exc:
        if exc.status_code != 409:
            raise StartFailed(name, f"cannot create Docker {kind[:-1]} {name}: {exc.explanation or exc}") from None
        listing = api.secrets if kind == "secrets" else api.configs
        mine = [item for item in listing(filters={"name": [name]})
                if item["Spec"]["Name"] == name
                and (item["Spec"].get("Labels") or {}).get(LABEL_STATE) == labels.get(LABEL_STATE)]
        if not mine:
            raise StartFailed(name, f"a Docker {kind[:-1]} named {name} exists and is not this mesh's") from None
        object_id = str(mine[0]["ID"])
    record.add(kind, object_id)
    return object_id


def make_network(client: docker.DockerClient, record: Record, mesh: str, labels: dict[str, str]) -> tuple[str, str]:
    """The mesh's overlay network, encrypted and not attachable, recorded: (id, IPv4 subnet)."""
    import docker

    name = network_name(mesh)
    try:
        network = client.networks.create(name, driver="overlay", options={"encrypted": ""}, attachable=False,
                                         check_duplicate=True, labels=labels)
    except docker.errors.APIError as exc:
        raise StartFailed(name, f"cannot create the overlay network {name}: {exc.explanation or exc} "
                          f"(`docker network inspect {name}` shows whose it is)") from None
    record.add("networks", network.id)
    network.reload()
    config = ((network.attrs.get("IPAM") or {}).get("Config") or [{}])[0]
    if not config.get("Subnet"):
        raise StartFailed(name, f"the overlay network {name} has no IPv4 subnet")
    return str(network.id), str(config["Subnet"])


def tls_secrets(client: docker.DockerClient, record: Record, folder: Path, *, scope: tuple[str, ...],
                labels: dict[str, str]) -> tuple[str, dict[str, tuple[str, str]]]:
    """One Docker secret per file of ``folder`` (cert.pem, key.pem, ca.pem): the digest of the three
    (with ``scope``: mesh, state folder, service) and file -> (secret id, name)."""
    files = {file: (folder / file).read_bytes() for file in TLS_FILES}
    together = digest(*scope, *files.values())
    made = {}
    for file, data in files.items():
        name = object_name(file, digest(together, file))
        made[file] = (create_object(client, record, "secrets", name, data, labels), name)
    return together, made


def roll(client: docker.DockerClient, service_id: str, spec: dict[str, Any], timeout: float) -> str | None:
    """Update the service to ``spec`` (``create_service``'s arguments) and wait until its tasks are
    replaced, as its update config says; what went wrong, if anything. An update the engine rolls
    back (a new task failed) is waited for until its rollback ends."""
    import docker

    api = client.api
    try:
        current = api.inspect_service(service_id)
        before = (current.get("UpdateStatus") or {}).get("StartedAt")
        api.update_service(service_id, current["Version"]["Index"], **spec)
    except docker.errors.APIError as exc:
        return f"cannot update the service: {exc.explanation or exc}"
    deadline = time.monotonic() + timeout
    state = "not started"
    while time.monotonic() < deadline:
        status = api.inspect_service(service_id).get("UpdateStatus") or {}
        # Until the engine starts this update, the service still shows the last one's status.
        state = status.get("State", "") if status.get("StartedAt") != before else "not started"
        if state == "completed":
            return None
        if state in _STOPPED:
            said = "failed and was rolled back" if state == "rollback_completed" else f"stopped ({state})"
            return f"the rolling update {said}: {status.get('Message', '')}"
        time.sleep(0.5)
    return f"the rolling update is not done after {timeout:g}s ({state})"


def remove_unused(client: docker.DockerClient, record: Record, kind: str, ids: set[str]) -> None:
    """Remove these secrets (``kind`` "secrets") or configs no service refers to any more; one the engine
    refuses (a task that stops still uses it) stays recorded, for `mesh down`."""
    import docker

    remove = client.api.remove_secret if kind == "secrets" else client.api.remove_config
    for object_id in ids:
        with contextlib.suppress(docker.errors.APIError):
            remove(object_id)
            record.discard(kind, object_id)
