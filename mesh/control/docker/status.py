"""What `mesh ps` and `mesh down` read of a docker-runtime mesh from the engine, without its controller.

A mesh's containers and networks are found by their labels
(`mesh.control.docker.layout`): those of this mesh's state folder, and a role.
The controller also clears what a crashed one left (`remove_owned`) before it
starts anything.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from mesh.config import MeshConfig
from mesh.control.docker import images
from mesh.control.docker.layout import APP_GRACE, LABEL_MESH, LABEL_ROLE, LABEL_RUN, LABEL_STATE, SIDECAR_GRACE

if TYPE_CHECKING:
    import docker

__all__ = ["owned", "print_line", "refresh_status", "remove_owned", "sweep"]


def print_line(line: str) -> None:
    """What a `mesh` command tells as it goes: a line on stdout, at once."""
    print(line, flush=True)


def owned(client: docker.DockerClient, mesh: str,
          state: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(containers, networks) of the mesh whose state folder is ``state``: its labels, and a role."""
    where = {"label": [f"{LABEL_MESH}={mesh}", f"{LABEL_STATE}={state}"]}
    containers = [c for c in client.api.containers(all=True, filters=where)
                  if (c.get("Labels") or {}).get(LABEL_ROLE) in ("sidecar", "app")]
    networks = [n for n in client.api.networks(filters=where)
                if (n.get("Labels") or {}).get(LABEL_ROLE) in ("mesh", "edge")]
    return containers, networks


def remove_owned(client: docker.DockerClient, mesh: str, state: str, *, grace: bool) -> tuple[int, int]:
    """Stop (sidecars first, with ``grace``) and remove the mesh's containers, then its networks."""
    import docker

    containers, networks = owned(client, mesh, state)
    api = client.api
    if grace:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for role, seconds in (("sidecar", SIDECAR_GRACE), ("app", APP_GRACE)):
                ids = [c["Id"] for c in containers if c["Labels"][LABEL_ROLE] == role and c["State"] == "running"]
                list(pool.map(lambda cid, s=seconds: _quietly(api.stop, cid, timeout=int(s)), ids))
    for container in sorted(containers, key=lambda c: c["Labels"][LABEL_ROLE] != "app"):
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_container(container["Id"], force=True, v=True)
    for network in networks:
        with contextlib.suppress(docker.errors.NotFound):
            api.remove_network(network["Id"])
    return len(containers), len(networks)


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    import docker

    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
        fn(*args, **kwargs)


def sweep(config: MeshConfig, say: Callable[[str], None] = print_line) -> tuple[int, int] | None:
    """`mesh down`'s last step: stop and remove every container and network of this mesh (its labels,
    found without a controller, so also after one crashed); nothing else. (containers, networks) removed,
    or None when no engine answers (said on stderr).
    """
    try:
        client = images.docker_client(timeout=60)
    except images.DockerUnavailable as exc:
        print(f"mesh '{config.name}': cannot remove its containers: {exc}", file=sys.stderr)
        return None
    try:
        removed = remove_owned(client, config.name, str(config.state_dir.resolve()), grace=True)
    finally:
        client.close()
    if any(removed):
        say(f"mesh '{config.name}': removed {removed[0]} containers and {removed[1]} networks")
    return removed


def refresh_status(config: MeshConfig, state: dict[str, Any]) -> None:
    """`mesh ps` for the docker runtime: each instance's containers as the engine sees them.

    Adds ``status`` (``running``, ``exited (137)``, ``missing``...) to each of an
    instance's ``containers``; an instance with one not running is ``stopped``,
    with a ``problem`` saying which if the controller did not say already.
    """
    import docker

    instances = state.get("instances", [])
    try:
        client = images.docker_client(timeout=30)
    except images.DockerUnavailable as exc:
        for inst in instances:
            inst["state"] = "stopped" if not state["controller"]["running"] else inst["state"]
            inst.setdefault("problem", None)
            inst["problem"] = inst["problem"] or f"cannot ask the Docker engine: {exc}"
        return
    try:
        seen = {c["Id"]: c for c in client.api.containers(all=True, filters={"label": [
            f"{LABEL_STATE}={config.state_dir.resolve()}", f"{LABEL_RUN}={state.get('run', '')}"]})}
        for inst in instances:
            if inst.get("role") == "front":  # in the controller's process: up while it runs
                if not state["controller"]["running"]:
                    inst["state"] = "stopped"
                continue
            if (inst.get("key") is not None and inst.get("state") in ("sleeping", "starting")
                    and state["controller"]["running"]):
                continue  # a keyed instance asleep (its containers removed, by design) or booting
            if inst.get("state") == "exited":
                continue  # done and not restarted (a job): its containers are removed, by design
            containers = inst.get("containers") or {}
            down = []
            for role, info in containers.items():
                found = seen.get(info.get("id") or "")
                if found is None:
                    info["status"] = "missing"
                    down.append(f"{role} container is gone")
                elif found["State"] == "running":
                    info["status"] = "running"
                else:
                    code = None
                    with contextlib.suppress(docker.errors.NotFound):
                        code = client.api.inspect_container(found["Id"])["State"].get("ExitCode")
                    info["status"] = f"{found['State']} ({code})" if code is not None else found["State"]
                    # in the controller's words, which it will write within a second
                    down.append(f"{role} exited with code {code}" if code is not None
                                else f"{role} container {found['State']}")
            if down or not containers:
                if inst.get("state") != "stopped":
                    inst["state"] = "stopped"
                if down and not inst.get("problem") and state["controller"]["running"]:
                    inst["problem"] = ", ".join(down)
    finally:
        client.close()
