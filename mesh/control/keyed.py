"""Keyed services: one instance per key, booted on its first request, asleep when idle.

For a service with ``instances = { key = "header:X-Session", sleep_after = "1m", max = 100 }``
requests reach a `mesh.sidecar.front.KeyedFront`, which reads the key and
forwards to that key's instance; `KeyedServices` is the controller's side:
it runs the fronts and starts and puts to sleep the instances they ask for.

With ``volume = "/data"`` in ``instances`` each key also has a volume of its
own, named `key_volume`, which its instance gets at every start (the runtime
makes it: `mesh.control.runtimes.base.Runtime.volume_path`) and which outlives
sleeps and the mesh's runs, until `mesh down --volumes`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from mesh.config import MeshConfig
from mesh.control.runtimes.base import Instance, StartFailed
from mesh.errors import UpstreamError
from mesh.sidecar.front import AskIdle, KeyedFront, StartInstance, StopInstance
from mesh.sidecar.identity import Identity

if TYPE_CHECKING:
    from mesh.control.controller import Controller

__all__ = ["KeyedServices", "key_label", "key_volume"]

log = logging.getLogger("mesh.keyed")

KEYED_STATES = ("starting", "running", "sleeping", "stopped")


def key_label(service: str, key: str) -> str:
    """The label of ``key``'s instance of ``service``: ``sandbox.k-<8 hex of sha256(key)>``."""
    return f"{service}.k-{hashlib.sha256(key.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def key_volume(service: str, key: str) -> str:
    """The name of ``key``'s volume of ``service``: ``sandbox-k-<32 hex of sha256(key)>``, a folder
    name and a Docker volume name whatever the key holds; long enough that no one finds another
    key with the same name."""
    # SECURITY: the key comes from a request: only its digest makes a path or a name, never the key.
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{service}-k-{digest}"


class KeyedServices:
    """What `mesh up` does for keyed services (``instances = {...}``), beside its controller.

    No instance of a keyed service starts with the mesh. Each keyed service
    gets a `KeyedFront` in the controller's process, with a certificate of
    the service's own (so its instances' sidecars trust the ``x-mesh-peer``
    it names); the registry lists the service at the front's address. The
    front's ``start(key)`` plans an instance for the key (label
    `key_label`, ``instance.key``), issues its certificate and starts it
    through the controller, so it is in ``controller.instances`` (state.json,
    certificate renewal, registry pushes, stopping at the end) like any
    other; ``stop(key)`` stops it and the key is remembered as sleeping.

    The runtime says where the front listens (``runtime.front_host()``: on
    the process runtime 127.0.0.1; on docker the mesh network's gateway IP,
    the host's side of the bridge, made before any instance starts), lets
    sidecars out to its port (``runtime.allow_front``), and where the front
    reaches each instance (``runtime.reach``: on docker its IP on the mesh
    network, as an instance's alias resolves only inside it). Either way an
    exposed keyed service's front also serves the ``expose`` port on
    127.0.0.1, routing outside requests by key the same way.
    """

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.config: MeshConfig = controller.config
        self.services = [n for n, s in self.config.services.items() if s.instances is not None]
        self.fronts: dict[str, KeyedFront] = {}
        self.keyed: dict[str, Instance] = {}  # label -> its instance
        self.states: dict[str, str] = {}  # label -> starting | running | sleeping | stopped
        self._serial: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self.services)

    # planning and starting

    async def plan(self, planned: list[Instance]) -> list[Instance]:
        """The runtime's plan without keyed services' instances; their fronts started."""
        if not self.services:
            return planned
        instances = self.controller.instances
        try:
            host = await instances.front_host()  # made now, before any instance starts
        except NotImplementedError as exc:
            raise StartFailed(self.services[0], f"{exc} (services.{self.services[0]}.instances)") from None
        try:
            for name in self.services:
                folder = instances.certificate(f"{name}.front", name)
                spec = self.config.services[name]
                front = KeyedFront(self.config, name, identity=Identity(folder, self.config.name),
                                   start=self._starter(name), stop=self._stopper(name),
                                   host=host, port=0, public_port=spec.expose,
                                   ask_idle=self._idle_asker(name))
                await front.start()
                self.fronts[name] = front
                instances.allow_front(int(front.address.rsplit(":", 1)[1]))
        except BaseException:
            await self.stop()
            raise
        return [i for i in planned if i.service not in self.fronts]

    def registry(self) -> dict[str, list[str]]:
        """Keyed service -> [its front's mesh address]."""
        return {name: [front.address] for name, front in self.fronts.items()}

    async def renew(self) -> None:
        """Renew the fronts' certificates (the controller renews its instances')."""
        for name, front in self.fronts.items():
            self.controller.instances.certificate(f"{name}.front", name)
            await front.reload_certificates()

    def _plan_one(self, service: str, key: str) -> Instance:
        label = key_label(service, key)
        instance = self.keyed.get(label)
        if instance is not None and instance.key != key:
            raise UpstreamError(503, f"two keys of '{service}' share the label {label}")
        instances = self.controller.instances
        if instance is None:
            index = self._serial[service] = self._serial.get(service, 0) + 1
            # Named as the runtime names instances (by index); the label by key.
            instance = instances.plan_key(service, index, label)
            instance.key = key
            if self.config.services[service].instances.volume:  # type: ignore[union-attr]
                instance.volume = key_volume(service, key)
            self.keyed[label] = instance
            instances.add(instance)
        instances.replan(instance)  # the last addresses may be taken by now
        return instance

    def _starter(self, service: str) -> StartInstance:
        async def start(key: str) -> tuple[str, int]:
            instances = self.controller.instances
            instance = self._plan_one(service, key)
            kind = "wake" if self.states.get(instance.label) == "sleeping" else "cold"
            self.states[instance.label] = "starting"
            instances.problems.pop(instance.label, None)
            instances.save()
            began = time.monotonic()
            try:
                await instances.start(instance)  # with a certificate of its own
            except BaseException as exc:
                self.states[instance.label] = "stopped"
                if isinstance(exc, Exception):
                    self.controller.telemetry.start_failed(service)
                reason = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                instances.problems[instance.label] = reason
                tail = getattr(exc, "tail", None) or []
                log.error("%s: failed to start: %s%s", instance.label, reason,
                          "".join(f"\n  {line}" for line in tail))
                await instances.stop(instance)
                instances.save()
                raise
            self.states[instance.label] = "running"
            self.controller.telemetry.started(service, kind, time.monotonic() - began)
            instances.save()
            return instances.reach(instance)

        return start

    def _idle_asker(self, service: str) -> AskIdle:
        async def ask(key: str) -> bool:
            instance = self.keyed.get(key_label(service, key))
            if instance is None:
                return True
            return await self.controller.sleep_when_idle(instance)

        return ask

    def _stopper(self, service: str) -> StopInstance:
        async def stop(key: str) -> None:
            instance = self.keyed.get(key_label(service, key))
            if instance is None:
                return
            await self.controller.instances.stop(instance)
            self.states[instance.label] = "sleeping"
            self.controller.telemetry.slept(service)
            instance.forget_processes()
            self.controller.instances.save()

        return stop

    async def stop(self) -> None:
        """Stop the fronts, and with them every keyed instance (the mesh is stopping)."""
        fronts = list(self.fronts.values())
        await asyncio.gather(*(f.stop() for f in fronts), return_exceptions=True)
        for label, state in self.states.items():
            if state == "sleeping":
                self.states[label] = "stopped"

    # what `mesh ps` shows

    def describe(self, instance: Instance) -> dict[str, Any]:
        """Extra fields of a keyed instance in state.json: its ``key``, its ``volume`` if it has one,
        and its state."""
        if instance.label not in self.keyed:
            return {}
        found = {"key": instance.key}
        if instance.volume is not None:
            found["volume"] = instance.volume
        state = self.states.get(instance.label)
        if state in ("starting", "sleeping", "stopped"):
            found["state"] = state
        return found

    def rows(self) -> list[dict[str, Any]]:
        """One row per front, for state.json's ``instances`` (``instance``: ``"front"``)."""
        rows = []
        for name, front in self.fronts.items():
            snapshot = front.snapshot()
            rows.append({
                "service": name, "instance": "front", "label": f"{name}.front", "role": "front",
                "state": "running", "problem": None, "healthy": None,
                "addresses": {"mesh": front.address}, "public": front.public_url,
                "key": self.config.services[name].instances.key,  # type: ignore[union-attr]
                "keys": {"running": sum(1 for s in snapshot if s["state"] == "running"),
                         "starting": sum(1 for s in snapshot if s["state"] == "starting")},
                "pids": {"controller": os.getpid()}, "pgids": {},
            })
        return rows
