"""What the swarm runtime asks of the engine: is it a swarm manager (with nodes enough), the images it
runs, which services, tasks, networks, secrets and configs are a mesh's, waiting for them and removing
them; also what `mesh ps` and `mesh down` read without a controller.

A mesh's objects are those with its labels (``mesh.mesh`` and ``mesh.state``,
`mesh.control.swarm.layout`) and those its runs recorded (`Record`) that
still carry its ``mesh.mesh``: nothing else is ever removed.

Everything here blocks; from asyncio, call it on a thread.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mesh.config import MeshConfig
from mesh.control.docker import images
from mesh.control.docker.status import print_line
from mesh.control.runtimes.base import StartFailed, instance_count
from mesh.control.swarm.layout import KINDS, LABEL_MESH, LABEL_SERVICE, LABEL_STATE, LABEL_VERSION, Record

if TYPE_CHECKING:
    import docker

__all__ = [
    "INIT_COMMAND", "SERVICE_LOG_DETAIL", "ServiceLogs", "describe_task", "engine_problem", "mesh_objects",
    "newest_tasks", "refresh_status", "reload_images", "remove_mesh", "service_images", "sweep", "swarm_problem",
    "swarm_problems", "task_state", "wait_running", "wait_tasks_gone",
]

INIT_COMMAND = "docker swarm init --advertise-addr 127.0.0.1"
SERVICE_LOG_DETAIL = "com.docker.swarm.task.id="

# Swarm's task states, as `mesh ps` says them.
_STARTING = {"new", "allocated", "pending", "assigned", "accepted", "preparing", "ready", "starting"}


def swarm_problem(info: dict[str, Any]) -> str | None:
    """Why this engine (its ``docker info``) cannot take a mesh: not in swarm mode, or not a manager."""
    swarm = info.get("Swarm") or {}
    state = swarm.get("LocalNodeState") or "inactive"
    if state != "active":
        return (f"the Docker engine is not in swarm mode (swarm: {state}): the swarm runtime deploys to the "
                f"swarm the local engine belongs to. Make this machine a one-node swarm with "
                f"`{INIT_COMMAND}` (or join it to a swarm), then try again")
    if not swarm.get("ControlAvailable"):
        return ("the Docker engine is a swarm worker, not a manager: only a manager takes services; run "
                "`mesh up --runtime swarm` against a manager (DOCKER_HOST) or promote this node "
                "(`docker node promote`)")
    return None


def engine_problem(client: docker.DockerClient) -> str | None:
    """`swarm_problem` of the engine ``client`` talks to."""
    return swarm_problem(client.info())


def swarm_problems(client: docker.DockerClient, config: MeshConfig) -> list[str]:
    """What of the swarm ``client`` talks to keeps the mesh from running there: not a manager, or too few
    nodes for an exposed service (host mode: one task per node holds its port; a pool counts its ``max``)."""
    problem = engine_problem(client)
    if problem is not None:
        return [problem]
    nodes = sum(1 for node in client.api.nodes() if (node.get("Status") or {}).get("State") == "ready")
    found = []
    for name, service in config.services.items():
        count = max(instance_count(service), service.scale.max if service.scale is not None else 0)
        if service.expose is not None and count > nodes:
            what = f"scale.max = {count}" if service.scale is not None else f"replicas = {count}"
            found.append(f"services.{name}: expose publishes on each node running a task (host mode, one task "
                         f"per node), so {what} needs {count} nodes; this swarm has {nodes} ready")
    return found


def service_images(client: docker.DockerClient, config: MeshConfig) -> images.BuiltImages:
    """The mesh's images as `mesh build` makes them (built when missing or out of date), each checked to
    be built FROM mesh/base: the sidecar runs in the service's own image. Raises `StartFailed`."""
    from mesh.control.runtimes.docker import build_images

    try:
        problem = engine_problem(client)
        if problem is not None:
            raise StartFailed("swarm", problem)
        built = build_images(config, print_line, client=client)
    except (images.ImageError, images.DockerUnavailable) as exc:
        raise StartFailed("images", str(exc)) from None
    base = client.images.get(built.base).attrs["RootFS"]["Layers"]
    for name, image_id in built.services.items():
        layers = client.images.get(image_id).attrs["RootFS"]["Layers"]
        if layers[:len(base)] != base:
            raise StartFailed(name, f"its image ({image_id[7:19]}) is not built FROM mesh/base: on the "
                              f"swarm runtime the sidecar runs in the service's own image")
    return built


def task_state(task: dict[str, Any] | None) -> str:
    """An instance's state (running, starting, stopped) from the task in its slot."""
    if task is None:
        return "stopped"
    state = (task.get("Status") or {}).get("State", "")
    if state == "running" and task.get("DesiredState") == "running":
        return "running"
    if state in _STARTING and task.get("DesiredState") == "running":
        return "starting"
    return "stopped"


def _where(mesh: str, state: str) -> dict[str, list[str]]:
    return {"label": [f"{LABEL_MESH}={mesh}", f"{LABEL_STATE}={state}"]}


def _labels(kind: str, found: dict[str, Any]) -> dict[str, str]:
    spec = found.get("Spec") or {}
    labels = spec.get("Labels") if kind != "networks" else found.get("Labels")
    return dict(labels or {})


def mesh_objects(client: docker.DockerClient, mesh: str, state: str,
                 record: Record | None = None) -> dict[str, list[dict[str, Any]]]:
    """The mesh's services, networks, secrets and configs: by its labels, and those ``record``
    lists that still carry its ``mesh.mesh`` label."""
    import docker

    api = client.api
    listing: dict[str, Callable[..., list[dict[str, Any]]]] = {
        "services": api.services, "networks": api.networks, "secrets": api.secrets, "configs": api.configs}
    inspect: dict[str, Callable[[str], dict[str, Any]]] = {
        "services": api.inspect_service, "networks": api.inspect_network, "secrets": api.inspect_secret,
        "configs": api.inspect_config}
    found: dict[str, list[dict[str, Any]]] = {}
    for kind in KINDS:
        items = {item.get("ID") or item.get("Id"): item for item in listing[kind](filters=_where(mesh, state))}
        for object_id in (record.of(kind) if record is not None else []):
            if object_id in items:
                continue
            try:
                item = inspect[kind](object_id)
            except docker.errors.NotFound:
                if record is not None:
                    record.discard(kind, object_id)
                continue
            if _labels(kind, item).get(LABEL_MESH) == mesh:
                items[object_id] = item
        found[kind] = [item for key, item in items.items() if key]
    return found


def _remove(fn: Callable[[str], Any], object_id: str) -> str | None:
    """Remove one object; None when it is gone, else the engine's reason."""
    import docker

    try:
        fn(object_id)
    except docker.errors.NotFound:
        return None
    except docker.errors.APIError as exc:
        return str(exc.explanation or exc)
    return None


def remove_mesh(client: docker.DockerClient, mesh: str, state: str, record: Record | None = None, *,
                timeout: float = 60.0) -> dict[str, int]:
    """Remove the mesh's services (their tasks stop, sidecars draining first), then, once their tasks are
    gone, its networks, secrets and configs; how many of each. Objects still in use at ``timeout``
    are left (and stay recorded)."""
    api = client.api
    found = mesh_objects(client, mesh, state, record)
    removers: dict[str, Callable[[str], Any]] = {
        "services": api.remove_service, "networks": api.remove_network, "secrets": api.remove_secret,
        "configs": api.remove_config}
    deadline = time.monotonic() + timeout
    removed = dict.fromkeys(KINDS, 0)
    services = [item["ID"] for item in found["services"]]
    for service_id in services:
        if _remove(api.remove_service, service_id) is None:
            removed["services"] += 1
            if record is not None:
                record.discard("services", service_id)
    wait_tasks_gone(client, services, deadline)
    for kind in KINDS[1:]:
        left = [str(item.get("ID") or item.get("Id")) for item in found[kind]]
        while left:
            still = []
            for object_id in left:
                if _remove(removers[kind], object_id) is None:
                    removed[kind] += 1
                    if record is not None:
                        record.discard(kind, object_id)
                else:
                    still.append(object_id)
            left = still
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.5)  # its last tasks are still detaching from it
        for object_id in left:
            print(f"mesh '{mesh}': could not remove {kind[:-1]} {object_id[:12]} in {timeout:g}s: "
                  f"{_remove(removers[kind], object_id)}", file=sys.stderr)
    return removed


def wait_tasks_gone(client: docker.DockerClient, services: list[str], deadline: float) -> None:
    """Until no container of these services is left on this node (their tasks stopped), or ``deadline``."""
    if not services:
        return
    where = {"label": [f"com.docker.swarm.service.id={s}" for s in services]}
    while time.monotonic() < deadline:
        # One label filter per call: the engine ANDs several labels.
        if not any(client.api.containers(all=True, filters={"label": [label]}) for label in where["label"]):
            return
        time.sleep(0.25)


def sweep(config: MeshConfig, say: Callable[[str], None] = print) -> tuple[int, int] | None:
    """`mesh down`'s last step: remove everything of this mesh in the swarm (found by labels and the
    record, also after a controller crashed). (services, networks) removed; None when the engine
    cannot be asked (said on stderr)."""
    try:
        client = images.docker_client(timeout=60)
    except images.DockerUnavailable as exc:
        print(f"mesh '{config.name}': cannot remove its Swarm services: {exc}", file=sys.stderr)
        return None
    try:
        if swarm_problem(client.info()) is not None:
            return 0, 0  # no swarm: no service of it can exist
        removed = remove_mesh(client, config.name, str(config.state_dir.resolve()),
                              Record.load(config.state_dir))
    finally:
        client.close()
    if any(removed.values()):
        say(f"mesh '{config.name}': removed " + ", ".join(f"{count} {kind}" for kind, count in removed.items()))
    return removed["services"], removed["networks"]


def refresh_status(config: MeshConfig, state: dict[str, Any]) -> None:
    """`mesh ps` for the swarm runtime: each instance's state from the task in its slot, as the engine
    sees it (``swarm``: its service, task, node, task state and error); the mesh's services with their
    tasks in ``state["swarm"]``."""
    instances = state.get("instances", [])
    try:
        client = images.docker_client(timeout=30)
    except images.DockerUnavailable as exc:
        for inst in instances:
            inst["problem"] = inst.get("problem") or f"cannot ask the Docker engine: {exc}"
        return
    try:
        services: list[dict[str, Any]] = []
        tasks: list[dict[str, Any]] = []
        if swarm_problem(client.info()) is None:
            services = client.api.services(filters=_where(config.name, str(config.state_dir.resolve())))
            ids = [s["ID"] for s in services]
            tasks = client.api.tasks(filters={"service": ids}) if ids else []
    finally:
        client.close()
    by_slot = newest_tasks(tasks)
    names = {s["ID"]: s["Spec"]["Labels"].get(LABEL_SERVICE, "") for s in services}
    for inst in instances:
        service = next((sid for sid, name in names.items() if name == inst.get("service")), None)
        slot = (inst.get("swarm") or {}).get("slot") or inst.get("instance") or 0
        task = by_slot.get((service or "", int(slot)))
        inst["state"] = task_state(task)
        inst["swarm"] = {**(inst.get("swarm") or {}), **describe_task(task, service), "slot": int(slot)}
        if inst["swarm"]["version"]:
            inst["version"] = inst["swarm"]["version"]
    state["swarm"] = {"services": [{
        "name": s["Spec"]["Name"], "id": s["ID"], "service": names[s["ID"]],
        "replicas": ((s["Spec"].get("Mode") or {}).get("Replicated") or {}).get("Replicas"),
        "running": len([t for t in tasks if t["ServiceID"] == s["ID"] and task_state(t) == "running"]),
        "tasks": [describe_task(t, s["ID"]) for t in tasks if t["ServiceID"] == s["ID"]
                  and t.get("DesiredState") == "running"],
    } for s in services]}


def wait_running(client: docker.DockerClient, service_id: str, timeout: float) -> str | None:
    """Until a task of the service runs (and passed its health check); what went wrong at ``timeout``."""
    deadline = time.monotonic() + timeout
    said = "no task yet"
    while time.monotonic() < deadline:
        for task in client.api.tasks(filters={"service": service_id, "desired-state": "running"}):
            status = task.get("Status") or {}
            if status.get("State") == "running":
                return None
            said = f"{status.get('State')}" + (f": {status['Err']}" if status.get("Err") else "")
        time.sleep(0.25)
    return f"its task does not run after {timeout:g}s ({said})"


def reload_images(client: docker.DockerClient, current: images.BuiltImages, before: MeshConfig,
                  config: MeshConfig) -> images.BuiltImages:
    """The images a run of ``before`` started with (``current``); those of services whose ``build`` or
    ``image`` is new in ``config``, made now (as on the other runtimes, an image's content changes with
    `mesh down` and `mesh up`)."""
    new = [name for name, s in config.services.items() if name not in before.services
           or (s.build, s.image) != (before.services[name].build, before.services[name].image)]
    if not new:
        return current
    fresh = service_images(client, config)
    return images.BuiltImages(current.base, {**current.services, **{name: fresh.services[name] for name in new}})


def newest_tasks(tasks: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """(service id, slot) -> the task that stands for that slot: the newest one running, else the newest
    (during a rolling update a slot has a new task starting while the old one still serves)."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for task in sorted(tasks, key=lambda t: (task_state(t) == "running",
                                             (t.get("Version") or {}).get("Index", 0))):
        found[(task["ServiceID"], int(task.get("Slot") or 0))] = task
    return found


def describe_task(task: dict[str, Any] | None, service: str | None) -> dict[str, Any]:
    status = (task or {}).get("Status") or {}
    return {"service_id": service, "task": (task or {}).get("ID"), "slot": (task or {}).get("Slot"),
            "node": (task or {}).get("NodeID"), "task_state": status.get("State"),
            "error": status.get("Err") or None,
            "container": (status.get("ContainerStatus") or {}).get("ContainerID"),
            "version": ((((task or {}).get("Spec") or {}).get("ContainerSpec") or {}).get("Labels") or {}).get(
                LABEL_VERSION)}


class ServiceLogs(threading.Thread):
    """Follows one Swarm service's output (every task's) on a thread of its own; ``on_line(task_id, text)``."""

    def __init__(self, client: docker.DockerClient, service_id: str,
                 on_line: Callable[[str, str], None]) -> None:
        super().__init__(name=f"mesh-swarm-logs-{service_id[:12]}", daemon=True)
        self.client = client
        self.service_id = service_id
        self.on_line = on_line
        self.closed = False

    def run(self) -> None:
        pending = b""
        try:
            stream = self.client.api.service_logs(self.service_id, details=True, follow=True, stdout=True,
                                                  stderr=True)
            for chunk in stream:
                if self.closed:
                    return
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._emit(line)
        except Exception:  # noqa: BLE001 - the service went away, or the engine did: output ends
            pass

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        details, _, message = text.partition(" ")
        task = ""
        for item in details.split(","):
            if item.startswith(SERVICE_LOG_DETAIL):
                task = item[len(SERVICE_LOG_DETAIL):]
        with contextlib.suppress(Exception):
            self.on_line(task, message)

    def close(self) -> None:
        self.closed = True
