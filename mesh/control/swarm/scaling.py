"""A pool on swarm: the CPU its tasks' apps use, and its Swarm service's replica count changed to match.

CPU: a task is one container holding the supervisor, the sidecar and the app
(`mesh.control.swarm.task`), so the container's own figure (the engine's stats)
would count the sidecar and the engine's health checks too. The app's share is
read where the process runtime reads it, from /proc: the engine says which
process is the task's init (``State.Pid`` of its container, checked to be in
that container's cgroup, so a controller in another PID namespace reads
nothing wrong), the supervisor is its child, and the app is the supervisor's
child that is not the sidecar, leader of its own process group;
`process_group_cpu` adds up that group, children that exited included. Where
the task's processes are not visible (a task on another node, or a controller
in a container of its own) there is no figure, and the autoscaler decides on
the tasks it can see.

Replicas: growing a pool raises the service's replica count by one, and Swarm
starts a task in the lowest free slot (`free_slot`). Shrinking it removes one
chosen task, which Swarm cannot do by a replica count alone (it picks the
task to stop itself): the task's container is stopped first (its sidecar
drains, its app stops, the task ends with 0 and, ended on purpose, is not
restarted), then the count is lowered and Swarm drops the slot that no longer
runs (`stop_task`, `set_replicas`).

Everything here blocks; from asyncio, call it on a thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.control.runtimes.procfs import process_group_cpu
from mesh.control.swarm.layout import MESH_COMMAND

if TYPE_CHECKING:
    import docker

__all__ = ["AppCpu", "follow_slots", "free_slot", "running_slots", "set_replicas", "stop_task"]

_PROC = Path("/proc")
_ENDED = {"complete", "shutdown", "failed", "rejected", "orphaned", "remove"}


def free_slot(taken: set[int]) -> int:
    """The slot Swarm gives the next task of a service whose running slots are ``taken``: the lowest free."""
    slot = 1
    while slot in taken:
        slot += 1
    return slot


def _children(pid: int, proc: Path) -> list[int]:
    try:
        text = (proc / str(pid) / "task" / str(pid) / "children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def _argv(pid: int, proc: Path) -> list[bytes]:
    try:
        return (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _group_leader(pid: int, proc: Path) -> bool:
    try:
        fields = (proc / str(pid) / "stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return len(fields) > 2 and fields[2] == str(pid)


def app_group(init_pid: int, container_id: str, proc: Path = _PROC) -> int | None:
    """The process group of the app of the task whose init is ``init_pid`` (a host PID), or None when
    that process is not this container's here or its app is not found (see the module docstring)."""
    try:
        cgroups = (proc / str(init_pid) / "cgroup").read_text()
    except OSError:
        return None
    if container_id not in cgroups:
        return None
    sidecar = MESH_COMMAND.encode()
    for supervisor in _children(init_pid, proc):
        apps = [pid for pid in _children(supervisor, proc)
                if _argv(pid, proc)[1:3] != [sidecar, b"sidecar"] and _group_leader(pid, proc)]
        if len(apps) == 1:
            return apps[0]
    return None


@dataclass
class AppCpu:
    """CPU seconds of tasks' apps, by container id; what was found of each container is kept."""

    proc: Path = _PROC
    _groups: dict[str, int | None] = field(default_factory=dict)

    def seconds(self, client: docker.DockerClient, container_id: str) -> float | None:
        group = self._groups.get(container_id)
        used = process_group_cpu(group, self.proc) if group else None
        if used is None:
            group = self._find(client, container_id)
            used = process_group_cpu(group, self.proc) if group else None
        return used

    def _find(self, client: docker.DockerClient, container_id: str) -> int | None:
        import docker

        try:
            state = client.api.inspect_container(container_id).get("State") or {}
        except docker.errors.NotFound:  # on another node
            return None
        group = app_group(int(state.get("Pid") or 0), container_id, self.proc) if state.get("Running") else None
        if len(self._groups) > 256:
            self._groups.clear()
        self._groups[container_id] = group
        return group

    def forget(self, container_id: str) -> None:
        self._groups.pop(container_id, None)


def running_slots(tasks: list[dict[str, Any]]) -> set[int]:
    """The slots of a service's tasks meant to run (Swarm's view: those a replica count counts)."""
    return {int(task.get("Slot") or 0) for task in tasks if task.get("DesiredState") == "running"}


def follow_slots(instances: list[Any], kept: set[int]) -> None:
    """After a scale-down Swarm chose (its task was not on this node): each instance whose slot is gone
    takes one of the ``kept`` slots no other instance stands for."""
    spare = sorted(kept - {inst.slot for inst in instances})
    for inst in instances:
        if inst.slot not in kept and spare:
            inst.slot = spare.pop(0)


def set_replicas(client: docker.DockerClient, service_id: str, replicas: int) -> int:
    """Change only the service's replica count: the rest of its spec is sent back as the engine keeps it
    (not with the engine's defaults filled in, which it would take for a new task spec to roll out).
    The engine's index before the change: a task of an index above it is made after it."""
    from docker.types import ServiceMode

    api = client.api
    current = api.inspect_service(service_id)
    spec = current["Spec"]
    api.update_service(service_id, current["Version"]["Index"], task_template=spec["TaskTemplate"],
                       name=spec["Name"], labels=spec.get("Labels"), mode=ServiceMode("replicated", replicas=replicas),
                       update_config=spec.get("UpdateConfig"), rollback_config=spec.get("RollbackConfig"),
                       endpoint_spec=spec.get("EndpointSpec"))
    return int(current["Version"]["Index"])


def stop_task(client: docker.DockerClient, task_id: str, grace: float) -> str | None:
    """Stop one task's container, as SIGTERM does (the sidecar drains, then the app stops), and wait
    until Swarm sees the task ended; what went wrong, if anything (its container not on this node)."""
    import docker

    api = client.api
    try:
        task = api.inspect_task(task_id)
    except docker.errors.NotFound:
        return None
    container = ((task.get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID")
    if not container:
        return f"task {task_id[:12]} has no container yet"
    try:
        api.stop(container, timeout=int(grace))
    except docker.errors.NotFound:
        return f"the container of task {task_id[:12]} is not on this node"
    deadline = time.monotonic() + grace + 30
    while time.monotonic() < deadline:
        try:
            state = (api.inspect_task(task_id).get("Status") or {}).get("State")
        except docker.errors.NotFound:
            return None
        if state in _ENDED:
            return None
        time.sleep(0.2)
    return f"task {task_id[:12]} did not end within {grace + 30:g}s of its container's stop"
