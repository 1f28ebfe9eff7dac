"""Runtimes: where the instances of a mesh run, and the interface every runtime implements.

A runtime turns one planned `Instance` (a service, its number, its
addresses) into a running app plus its sidecar, reports how it is doing,
and stops it. The controller (`mesh.control.controller`) decides *what* runs; a
runtime only knows *how*::

    runtime = get_runtime("process", config, output=print_line, on_exit=report)  # mesh.control.runtimes
    instances = runtime.plan()                 # addresses chosen, nothing started
    await runtime.start_instance(instance, registry_file, timeout=30)   # ready, or StartFailed
    runtime.instance_state(instance)           # "starting" | "running" | "stopped"
    await runtime.stop_role(instance, "sidecar")   # drains; then stop_role(instance, "app")

`mesh.control.runtimes.process.ProcessRuntime` (the embedded default) runs both
as local processes on loopback ports; `mesh.control.runtimes.docker.DockerRuntime`
as two containers sharing one network namespace.

Writing a runtime
-----------------
Subclass `Runtime`, give it a ``name`` and list it in `mesh.control.runtimes`
(`runtime_class`); the controller, the supervisor, keyed services and the
autoscaler use only this interface. A runtime must implement:

- `plan_one`: one instance of a service, its addresses chosen, nothing started
  (`plan`, `plan_key` and the autoscaler build on it). Return an `Instance`, or
  a subclass of it with the runtime's own typed fields (`state_fields` adds them
  to state.json).
- `start_instance`: start the sidecar, and the app only once the sidecar's outbound
  listener takes connections (the sidecar is ready; or the runtime opened that socket
  for it, as the process runtime does, and the app starts beside it: its first calls
  wait in the socket's backlog), and return once both are
  ready: the app within the ``timeout`` counted from its own start, the sidecar
  within as long and at least `SIDECAR_TIMEOUT`; `wait_ready` does the waiting, given how to tell that a part exited and
  whether the app answers. A job's app (``job = true``) is never waited for: it
  may be done before anyone could ask. The app's environment is `app_environment`.
- `stop_role`: stop the sidecar (it drains) or the app. Call `_mark_stopping` first;
  `start_instance` calls `_mark_starting` and, once ready, `_mark_ready`.
- `exit_code` and `tail`: how a part ended, its last output lines. With the marks
  they make `instance_state`; `on_exit` (given to the constructor) is called when
  a part of a ready instance ends unasked.
- `refresh_state` and `remove_leftovers` (class methods): `mesh ps` and
  `mesh down` without a controller: what still runs of a run, and removing it.

And may change the defaults: `problems` (what the mesh lacks to run here),
`build`, `prepare_detached`, `restart_app` (by default a stop and a start),
`kill_all`, `close`, `cpu_seconds` (None: no autoscaling on CPU), `check_health`,
`push_registry` and `reload_certificates` (by default over the sidecar's admin
listener on 127.0.0.1), `update_services` (`mesh reload` done by the runtime),
and for keyed services (`mesh.control.keyed`) `front_host`, `allow_front`,
`plan_key`, `replan`, `reach`, and for their per-key volumes `volume_path` and
`remove_volumes`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from mesh.config import MeshConfig, ServiceConfig
from mesh.control.runtimes.loopback import http_status, port_in_use
from mesh.sidecar import admin

__all__ = [
    "ROLES", "SIDECAR_TIMEOUT", "TAIL_LINES", "Instance", "OnExit", "Output", "Runtime", "RuntimeUnavailable",
    "StartFailed", "instance_count", "instance_label", "output_label",
]

TAIL_LINES = 20  # the last lines of output kept of each app and sidecar
ROLES = ("sidecar", "app")  # the parts of an instance, in the order they start
# The least time a sidecar gets to be ready: a start's ``timeout`` is its app's, and a short one
# must not fail the sidecar of a busy machine.
SIDECAR_TIMEOUT = 30.0

# What a runtime calls: output(label, line) for each line a process prints,
# on_exit(instance, role, returncode) when an app or sidecar ends unasked.
Output = Callable[[str, str], None]
OnExit = Callable[["Instance", str, int], None]


class RuntimeUnavailable(Exception):
    """The runtime asked for cannot run here (not built yet, or its engine is missing)."""


class StartFailed(Exception):
    """An instance did not become ready: ``reason`` says why, ``tail`` holds its last output lines."""

    def __init__(self, label: str, reason: str, tail: list[str] | None = None) -> None:
        self.label = label
        self.reason = reason
        self.tail = tail or []
        super().__init__(f"{label}: {reason}")


@dataclass
class Instance:
    """One instance of a service and where it listens.

    ``index`` counts from 1. ``label`` names it in output: the service name
    alone when the service has one instance, ``web.2`` otherwise. ``host`` is
    where other sidecars reach its mesh listener; ``ports`` maps ``app``,
    ``mesh``, ``outbound``, ``admin`` and, when exposed, ``public``. ``tls``
    is the folder of its certificate (``cert.pem``, ``key.pem``, ``ca.pem``)
    for mutual TLS between sidecars; None runs its mesh listener on plain HTTP.
    ``key``: the key a keyed service's instance serves (`mesh.control.keyed`); ``volume``: the name
    of that key's volume when its service keeps one (``instances.volume``). ``pids`` and
    ``pgids``: role (``sidecar``, ``app``) -> the process (group) running it, while
    it runs on this machine.
    """

    service: str
    index: int
    label: str
    host: str
    ports: dict[str, int]
    health: str | None = None
    tls: Path | None = None
    key: str | None = None
    volume: str | None = None
    pids: dict[str, int] = field(default_factory=dict)
    pgids: dict[str, int] = field(default_factory=dict)

    @property
    def mesh_address(self) -> str:
        return f"{self.host}:{self.ports['mesh']}"

    def addresses(self) -> dict[str, str]:
        return {role: f"127.0.0.1:{port}" for role, port in self.ports.items() if role != "public"}

    @property
    def public_url(self) -> str | None:
        port = self.ports.get("public")
        return f"http://127.0.0.1:{port}" if port else None

    def state_fields(self) -> dict[str, Any]:
        """What state.json shows of it beyond addresses: its pids and process groups, by role."""
        return {"pids": dict(self.pids), "pgids": dict(self.pgids)}

    def forget_processes(self) -> None:
        """It stopped: never signal a pid that may since be reused."""
        self.pids.clear()
        self.pgids.clear()


def instance_count(service: ServiceConfig) -> int:
    """How many instances `mesh up` starts: ``replicas``, or a pool's ``scale.min`` (at least 1).

    Keyed instances and autoscaling are the controller's later work; until
    then such a service runs a fixed number of instances.
    """
    if service.scale is not None:
        return max(service.scale.min, 1)
    return service.replicas


def instance_label(name: str, service: ServiceConfig, index: int, count: int) -> str:
    """``web`` for a service's only instance, ``web.2`` otherwise; an autoscaled pool that may
    grow (``scale.max`` > 1) numbers its instances from the start, so labels never change."""
    if count == 1 and (service.scale is None or service.scale.max <= 1):
        return name
    return f"{name}.{index}"


def output_label(instance: Instance, role: str) -> str:
    """What prefixes a part's output lines: ``web.2`` for the app, ``web.2.sidecar`` for its sidecar."""
    return instance.label if role == "app" else f"{instance.label}.{role}"


_T = TypeVar("_T")


class Runtime(ABC):
    """How instances run. One runtime object serves one `mesh up` (see the module docstring)."""

    name: ClassVar[str]
    # Whether `mesh reload` can reach its sidecars' admin listeners (`mesh.control.reload`).
    reloadable: ClassVar[bool] = True
    # Whether the instances of an exposed service share one public socket the controller holds
    # (`mesh.control.runtimes.public`), so one can replace another without giving up the port.
    shares_public: ClassVar[bool] = False

    def __init__(self, config: MeshConfig, *, output: Output, on_exit: OnExit, run_id: str = "",
                 admin_token: admin.AdminToken | None = None) -> None:
        """``run_id`` marks everything this run starts (``MESH_RUN`` in its environment),
        so what a dead controller left behind can still be found and stopped.

        ``admin_token``: the run's token for sidecars' admin listeners (`mesh.sidecar.admin`);
        each sidecar gets its file, which the controller writes before any starts.
        A new one (for the mesh's state folder) by default.
        """
        self.config = config
        self.output = output
        self.on_exit = on_exit
        self.run_id = run_id
        self.admin_token = admin_token or admin.AdminToken.new(config.state_dir)
        self._ready: set[str] = set()      # labels of instances started and ready
        self._stopping: set[str] = set()   # labels of instances asked to stop (until started again)
        self._pending: set[asyncio.Future[Any]] = set()  # see `_shielded`

    # what every runtime implements

    @abstractmethod
    def plan_one(self, service: str, index: int) -> Instance:
        """One more instance of ``service``, addresses chosen, nothing started (also an autoscaled
        pool growing while the mesh runs)."""

    @abstractmethod
    async def start_instance(self, instance: Instance, registry: Path, timeout: float) -> None:
        """Start the instance's sidecar, then (once its outbound listener takes connections) its app,
        and return once both are ready (a job's app: once it started).

        Raise `StartFailed` if either exits or is not ready in time: the app within ``timeout``
        seconds of its own start, the sidecar within as long and at least `SIDECAR_TIMEOUT`. What
        was started stays tracked, so `stop_role` cleans up after a failure or a cancellation.
        """

    @abstractmethod
    async def stop_role(self, instance: Instance, role: str) -> None:
        """Stop the instance's ``sidecar`` or its ``app``; return when nothing of it is left.

        A sidecar drains requests in flight first, so a controller stops every
        sidecar before any app.
        """

    @abstractmethod
    def exit_code(self, instance: Instance, role: str) -> int | None:
        """How the instance's ``app`` or ``sidecar`` last exited, if it did since it last started."""

    @abstractmethod
    def tail(self, instance: Instance, role: str) -> list[str]:
        """The last output lines of the instance's ``sidecar`` or ``app``, each prefixed with its label."""

    @classmethod
    @abstractmethod
    def refresh_state(cls, config: MeshConfig, state: dict[str, Any]) -> None:
        """`mesh ps`: each of state.json's instances checked against what runs (its ``state``
        set to ``stopped`` when it does not), without a controller."""

    @classmethod
    @abstractmethod
    def remove_leftovers(cls, config: MeshConfig) -> tuple[int, int] | None:
        """`mesh down`'s last step: remove what a run of this mesh holds beyond its processes (found
        without a controller, so also after one crashed): how many (containers, networks), or None
        when that cannot be done now (said on stderr)."""

    # what a runtime may change

    @classmethod
    def remove_volumes(cls, config: MeshConfig, *, required: bool) -> int | None:
        """`mesh down --volumes`: remove the per-key volumes (``instances.volume``) this runtime keeps
        for this mesh, and nothing else: how many, or None when that cannot be done now (said on
        stderr; ``required`` false: the mesh did not last run here, so say nothing and return 0).
        None kept, by default."""
        return 0

    def volume_path(self, instance: Instance) -> str | None:
        """Where the app of a keyed instance finds its key's volume (``MESH_VOLUME``), made now if it
        must be; None when the instance has none. By default ``instances.volume``, where a runtime
        of containers mounts it."""
        spec = self.config.services[instance.service].instances
        return spec.volume if instance.volume is not None and spec is not None else None

    def problems(self) -> list[str]:
        """What stops this mesh from running on this runtime, one line each (empty: none)."""
        return []

    async def build(self) -> None:
        """Build what instances need before they can start (images). Nothing, by default."""

    @classmethod
    def prepare_detached(cls, config: MeshConfig) -> str | None:
        """Before `mesh up -d` starts a controller in the background: what takes long or may fail
        visibly (building images), here so its progress shows. What went wrong, if anything."""
        return None

    async def stop_instance(self, instance: Instance) -> None:
        """Stop the sidecar (it drains), then the app."""
        await self.stop_role(instance, "sidecar")
        await self.stop_role(instance, "app")

    async def restart_app(self, instance: Instance, registry: Path, timeout: float) -> None:
        """Start the app of an instance again after it exited (its sidecar may still run); return once ready.

        By default: stop what is left of the instance and start all of it again.
        Raise `StartFailed` as `start_instance` does.
        """
        await self.stop_instance(instance)
        await self.start_instance(instance, registry, timeout)

    async def kill_all(self) -> None:
        """Stop everything at once, without grace (a second Ctrl-C)."""

    async def close(self) -> None:
        """Release what the run holds beyond its instances (networks), once every instance is stopped.

        Nothing, by default.
        """

    async def cpu_seconds(self, instance: Instance) -> float | None:
        """Cumulative CPU seconds of the instance's app, or None if it cannot be told now."""
        return None

    async def update_services(self, config: MeshConfig) -> list[str] | None:
        """`mesh reload` done by the runtime itself: each service (of those in ``config`` and running)
        whose instances see a change updated in place; the names of those updated. Raise `StartFailed`
        when one failed, every service back as it was. None (the default): the controller swaps every
        sidecar's configuration over its admin listener and replaces the instances of services whose
        process settings changed."""
        return None

    async def reload_certificates(self, instance: Instance) -> bool:
        """Make the instance's sidecar load the files in ``instance.tls`` again; False if it did not.

        By default through its admin listener on loopback, with the run's token.
        """
        return await http_status(instance.ports["admin"], "/certs/reload", method="POST",
                                  headers=self.admin_token.headers()) == 204

    async def push_registry(self, instance: Instance, body: bytes) -> bool:
        """Give the instance's sidecar a new registry (``{"services": ...}`` JSON); False if it did not take it.

        By default ``PUT /registry`` on its admin listener on loopback, with the run's token.
        """
        return await http_status(instance.ports["admin"], "/registry", method="PUT", body=body,
                                  headers=self.admin_token.headers()) == 204

    async def check_health(self, instance: Instance, timeout: float) -> bool:
        """Whether the instance's app answers 200 on its ``health`` path within ``timeout`` seconds.

        By default a GET on its app port on loopback.
        """
        if not instance.health:
            return True
        return await http_status(instance.ports["app"], instance.health, timeout=timeout) == 200


    # keyed services (`mesh.control.keyed`): their fronts run in the controller's process

    async def front_host(self) -> str:
        """Where keyed services' fronts listen: an address of the controller's host that sidecars
        reach. Whatever that needs (networks) is made now, before any instance starts.

        Raise `NotImplementedError` saying why when this runtime runs no keyed services.
        """
        raise NotImplementedError(f"keyed services (instances = {{...}}) run on the process and docker "
                                  f"runtimes only; not on {self.name}")

    def allow_front(self, port: int) -> None:
        """Let sidecars reach a keyed service's front on ``port`` of `front_host` (called before any
        instance starts). Nothing to do, by default."""

    def plan_key(self, service: str, index: int, label: str) -> Instance:
        """An instance of a keyed service for one key (named ``label``); `replan` gives it addresses."""
        instance = self.plan_one(service, index)
        instance.label = label
        return instance

    def replan(self, instance: Instance) -> None:
        """Addresses for a new start of a keyed instance that slept (the last ones may be taken by now)."""
        raise NotImplementedError(f"the {self.name} runtime cannot start keyed instances")

    def reach(self, instance: Instance) -> tuple[str, int]:
        """Where the controller's host reaches a started instance's mesh listener."""
        host, port = instance.mesh_address.rsplit(":", 1)
        return host, int(port)

    # shared by the runtimes

    def plan(self) -> list[Instance]:
        """Every instance of every service, with its addresses chosen; nothing started.

        Raise `StartFailed` when the mesh cannot start here (a port to expose or pinned for a
        sidecar is taken). Built on `plan_one`; the first instance of an exposed service
        publishes on ``expose``.
        """
        for name, service in self.config.services.items():
            if service.expose is not None and port_in_use(service.expose):
                raise StartFailed(name, f"cannot expose it on 127.0.0.1:{service.expose}: "
                                  f"the port is in use (services.{name}.expose)")
            for role, port in service.pinned_ports().items():
                if port_in_use(port):
                    raise StartFailed(name, f"cannot pin its sidecar's {role} listener on 127.0.0.1:{port}: "
                                      f"the port is in use (services.{name}.sidecar.{role}_port)")
        instances = []
        for name, service in self.config.services.items():
            count = instance_count(service)
            for index in range(1, count + 1):
                instance = self.plan_one(name, index)
                instance.label = instance_label(name, service, index, count)
                if service.expose is not None and index == 1:
                    instance.ports["public"] = service.expose
                instances.append(instance)
        return instances

    def app_environment(self, instance: Instance, outbound: int) -> dict[str, str]:
        """What every app finds in its environment: the service's ``env``, then ``PORT`` (but a
        job's: it listens on none), ``HTTP_PROXY`` and ``HTTPS_PROXY`` (its sidecar's outbound
        listener on loopback port ``outbound``: HTTPS goes as CONNECT, `mesh.sidecar.egress`),
        ``NO_PROXY``, ``MESH_SERVICE`` and ``MESH_INSTANCE``; and ``MESH_VOLUME`` when it has a
        key's volume (`volume_path`)."""
        service = self.config.services[instance.service]
        env = {k: str(v) for k, v in service.env.items()}
        if not service.job:
            env["PORT"] = str(instance.ports["app"])
        proxy = f"http://127.0.0.1:{outbound}"
        env.update({
            "HTTP_PROXY": proxy, "http_proxy": proxy,
            "HTTPS_PROXY": proxy, "https_proxy": proxy,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "MESH_SERVICE": instance.service,
            "MESH_INSTANCE": str(instance.index),
        })
        volume = self.volume_path(instance)
        if volume is not None:
            env["MESH_VOLUME"] = volume
        return env

    async def wait_ready(self, instance: Instance, deadline: float, timeout: float, *,
                         alive: Callable[[], Awaitable[None]],
                         app_ready: Callable[[float], Awaitable[tuple[bool, str]]],
                         where: str = "", pause: float = 0.05, parts: tuple[str, ...] = ROLES) -> None:
        """Return once the instance's sidecar answers ``/readyz`` and its app is ready (of those,
        the ``parts`` named; never a job's app, which may be done before it could be asked); raise
        `StartFailed` at ``deadline`` (event loop time) saying what it waited for, with the output.

        ``alive()`` raises `StartFailed` if a part of the instance exited. ``app_ready(wait)``
        asks the app once, in at most about ``wait`` seconds: whether it is ready (200 on its
        ``health`` path; without one, listening) and what it said. It runs beside the loop, in
        rounds, so an app that dies meanwhile is seen at once. ``where``: said after the app's
        port in the message.
        """
        loop = asyncio.get_running_loop()
        job = self.config.services[instance.service].job
        ready = {part: False for part in parts if not (job and part == "app")}
        if not ready:
            return
        probe: asyncio.Future[tuple[bool, str]] | None = None
        last = ""
        try:
            while True:
                await alive()
                if ready.get("sidecar") is False:
                    ready["sidecar"] = await http_status(instance.ports["admin"], "/readyz") == 200
                if ready.get("app") is False:
                    if probe is None:
                        # In rounds of a few seconds: a round outlives its start if the app dies meanwhile.
                        left = min(3.0, max(0.5, deadline - loop.time()))
                        probe = asyncio.ensure_future(app_ready(left))
                    elif probe.done():
                        ready["app"], last = probe.result()
                        probe = None
                if all(ready.values()):
                    return
                if loop.time() >= deadline:
                    waiting = [r for r, ok in ready.items() if not ok]
                    if "app" in waiting:
                        what = (f"GET {instance.health} answering 200" if instance.health
                                else "the app listening")
                        why = f"{what} on port {instance.ports['app']} ($PORT){where}"
                        why += f" (last: {last})" if last else ""
                    else:
                        why = "its sidecar's /readyz"
                    tail = [line for role in waiting for line in self.tail(instance, role)]
                    raise StartFailed(instance.label, f"not ready after {timeout:g}s: waited for {why}", tail)
                if probe is not None:
                    await asyncio.wait({probe}, timeout=pause)  # its answer is seen at once
                else:
                    await asyncio.sleep(pause)
        finally:
            if probe is not None:
                probe.cancel()

    def instance_state(self, instance: Instance) -> str:
        """``stopped`` once asked to stop or once its app or sidecar exited, ``running`` once
        `_mark_ready`, ``starting`` before."""
        if instance.label in self._stopping or any(self.exit_code(instance, r) is not None for r in ROLES):
            return "stopped"
        return "running" if instance.label in self._ready else "starting"

    def _mark_starting(self, instance: Instance) -> None:
        """The instance is being started (again): not stopped, not ready yet."""
        self._stopping.discard(instance.label)
        self._ready.discard(instance.label)

    def _mark_ready(self, instance: Instance) -> None:
        """The instance is ready: it runs, and a part ending now is reported (``on_exit``)."""
        self._ready.add(instance.label)

    def _mark_stopping(self, instance: Instance) -> None:
        """The instance is asked to stop: it is stopped, and a part ending now is not reported."""
        self._stopping.add(instance.label)
        self._ready.discard(instance.label)

    async def _shielded(self, future: Awaitable[_T]) -> _T:
        """Await ``future`` shielded from cancellation and tracked until done: a start cancelled
        midway still records what it created (a process, a container), and `_settle` waits for it."""
        task = asyncio.ensure_future(future)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return await asyncio.shield(task)

    async def _settle(self) -> None:
        """Let what `_shielded` tracks finish, so every process or container that exists is known."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
