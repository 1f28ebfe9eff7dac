"""What the swarm runtime keeps of a run: each instance (one task slot of a Swarm service) and each Swarm
service it made, with what the service was made of."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from mesh.config import ServiceConfig
from mesh.control.docker.layout import DEFAULT_APP_PORT
from mesh.control.runtimes.base import Instance
from mesh.control.swarm.engine import ServiceLogs
from mesh.control.swarm.services import ServiceInputs

__all__ = ["SwarmInstance", "SwarmService", "swarm_instance"]


@dataclass
class SwarmInstance(Instance):
    """An `Instance` that is the task in ``slot`` of its Swarm service (``swarm_service``): its ``index``,
    unless a pool that shrank and grew again got a lower slot free (Swarm fills the lowest).

    ``host`` is ``tasks.<swarm service>`` until its task runs, then the task's IP on the
    overlay network; ``task`` is what the engine said of it last (`engine.describe_task`), its
    ``version`` the one its task runs; ``scaled_down`` once its task was stopped and its slot given up.
    """

    swarm_service: str = ""
    task: dict[str, Any] = field(default_factory=dict)
    slot: int = 0
    since: int = 0  # the engine's index before its start: an older task of its slot was another instance's
    scaled_down: bool = False

    def state_fields(self) -> dict[str, Any]:
        fields = {**super().state_fields(), "swarm": {"service": self.swarm_service, **self.task, "slot": self.slot}}
        if self.task.get("version"):
            fields["version"] = self.task["version"]
        return fields

    def addresses(self) -> dict[str, str]:
        """The mesh listener on the overlay network; the app and outbound listener inside the task."""
        return {"app": f"127.0.0.1:{self.ports['app']}", "mesh": self.mesh_address,
                "outbound": f"127.0.0.1:{self.ports['outbound']}"}

    def follow(self, service: ServiceConfig) -> None:
        """Its service was updated by a reload: the app's port and health path, the public port."""
        self.health, self.ports["app"] = service.health, service.port or DEFAULT_APP_PORT
        if service.expose is None:
            self.ports.pop("public", None)
        elif self.index == 1 or "public" in self.ports:
            self.ports["public"] = service.expose


def swarm_instance(instance: Instance) -> SwarmInstance:
    if not isinstance(instance, SwarmInstance):
        raise TypeError(f"{instance.label} was not planned by the swarm runtime")
    return instance


@dataclass
class SwarmService:
    """One mesh service's Swarm service, as this run made it."""

    name: str
    swarm_name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    id: str | None = None
    lead: str = ""  # the instance whose certificate files the secrets hold
    tls_digest: str = ""
    inputs: ServiceInputs | None = None
    replicas: int = 0
    view: str = ""  # what its sidecars act on (`rollout.sidecar_view`), as they run
    removed: bool = False
    logs: ServiceLogs | None = None
