"""The swarm runtime: each mesh service is a Docker Swarm service, each instance one of its tasks.

::

    node's :<expose> (host mode) ──▶ task of web ─────────────┐   overlay mesh-<mesh>-overlay
                                     │ supervisor (firewall)   │   (encrypted, not attachable)
                                     │ sidecar :15001 ◀──mTLS──┼── tasks of other services
                                     │   └▶ app (loopback)     │   find it by tasks.<mesh>_web DNS
                                     └─────────────────────────┘

`mesh up --runtime swarm` deploys to the swarm the local engine belongs to
(it refuses, naming ``docker swarm init --advertise-addr 127.0.0.1``, when the
engine is not a swarm manager): one Swarm service ``<mesh>_<service>`` per
mesh service with its ``replicas`` (a pool: ``scale.min``), made from the images
`mesh build` makes (`mesh.control.swarm.services` says what a service is; the
task's supervisor, firewall and users are `mesh.control.swarm.task`'s). Instance
``web.2`` is the task in slot 2 of ``<mesh>_web``: started when the controller
starts it (the first instance of a service creates the service), ready once the
engine runs its task and the task passes its health check.

What the engine does here, and the controller does on the other runtimes:

- discovery: sidecars resolve ``tasks.<mesh>_<service>`` about once a second
  (`mesh.sidecar.dns_registry`); nothing is pushed (`push_registry` does nothing);
- restarts and health: Swarm replaces a task whose app or sidecar fails or whose
  health check fails; no exit is reported to the controller, and `check_health`
  says whether the slot's task runs;
- certificates: Docker secrets per service (the certificate and key of the
  service's first instance to start, and the mesh CA); a renewal or a CA rotation
  makes new secrets and rolls the service's tasks one at a time
  (`reload_certificates`).

Not done on swarm: keyed services and jobs (refused before anything starts),
autoscaling (`cpu_seconds` is None: a pool keeps ``scale.min``), and the admin
listener from the host (no ``mesh tap``, ``mesh logs``, ``mesh reload``).
`mesh down` removes the mesh's services, network, secrets and config, found by
their labels and the ids recorded in ``.mesh/<name>/swarm.json``, nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.config import MeshConfig
from mesh.control.docker import images
from mesh.control.docker.layout import APP_GRACE, DEFAULT_APP_PORT, MESH_PORT, OUTBOUND_PORT, SIDECAR_GRACE
from mesh.control.docker.status import print_line
from mesh.control.runtimes.base import (
    TAIL_LINES,
    Instance,
    OnExit,
    Output,
    Runtime,
    StartFailed,
    instance_count,
    instance_label,
    output_label,
)
from mesh.control.swarm import engine
from mesh.control.swarm.layout import (
    LABEL_MESH,
    LABEL_ROLE,
    LABEL_RUN,
    LABEL_SERVICE,
    LABEL_STATE,
    Record,
    network_name,
    object_name,
    service_name,
)
from mesh.control.swarm.objects import create_object, remove_secrets, roll, tls_secrets
from mesh.control.swarm.services import ServiceInputs, bundle, config_problems, digest, service_spec
from mesh.control.swarm.task import SIDECAR_PREFIX, TASK_PREFIX
from mesh.sidecar import admin
from mesh.sidecar.dns_registry import DEFAULT_EVERY

if TYPE_CHECKING:
    import docker

__all__ = ["SwarmInstance", "SwarmRuntime"]

log = logging.getLogger("mesh.swarm")

_FAILED = {"failed", "rejected", "orphaned", "remove"}
ROLL_TIMEOUT = 60.0  # seconds a rolling update may take, plus 30 per task
DNS_SETTLE = DEFAULT_EVERY + 0.5  # seconds for every sidecar to resolve a task that just entered DNS


@dataclass
class SwarmInstance(Instance):
    """An `Instance` that is the task in slot ``index`` of its Swarm service (``swarm_service``).

    ``host`` is ``tasks.<swarm service>`` until its task runs, then the task's IP on the
    overlay network; ``task`` is what the engine said of it last (`engine.describe_task`).
    """

    swarm_service: str = ""
    task: dict[str, Any] = field(default_factory=dict)

    def state_fields(self) -> dict[str, Any]:
        return {**super().state_fields(), "swarm": {"service": self.swarm_service, **self.task}}

    def addresses(self) -> dict[str, str]:
        """The mesh listener on the overlay network; the app and outbound listener inside the task."""
        return {"app": f"127.0.0.1:{self.ports['app']}", "mesh": self.mesh_address,
                "outbound": f"127.0.0.1:{self.ports['outbound']}"}


def _swarm(instance: Instance) -> SwarmInstance:
    if not isinstance(instance, SwarmInstance):
        raise TypeError(f"{instance.label} was not planned by the swarm runtime")
    return instance


@dataclass
class _Service:
    """One mesh service's Swarm service, as this run made it."""

    name: str
    swarm_name: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    id: str | None = None
    lead: str = ""  # the instance whose certificate files the secrets hold
    tls_digest: str = ""
    inputs: ServiceInputs | None = None
    removed: bool = False
    logs: engine.ServiceLogs | None = None


class SwarmRuntime(Runtime):
    """Instances as the tasks of one Swarm service per mesh service (see the module docstring)."""

    name = "swarm"
    reloadable = False  # the tasks' admin listeners are theirs alone: `mesh down`, then `mesh up`

    def __init__(self, config: MeshConfig, *, output: Output, on_exit: OnExit, run_id: str = "",
                 admin_token: admin.AdminToken | None = None) -> None:
        super().__init__(config, output=output, on_exit=on_exit, run_id=run_id, admin_token=admin_token)
        self.state_label = str(config.state_dir.resolve())
        self.record = Record.load(config.state_dir)
        self._client: docker.DockerClient | None = None
        self._images: images.BuiltImages | None = None
        self._network: tuple[str, str] | None = None  # (id, IPv4 subnet)
        self._bundle: tuple[str, str] | None = None   # (id, name) of the config
        self._prepared: asyncio.Lock | None = None
        self._services = {name: _Service(name, service_name(config.name, name)) for name in config.services}
        self._planned: dict[str, dict[int, SwarmInstance]] = collections.defaultdict(dict)
        self._tasks: dict[tuple[str, int], dict[str, Any]] = {}  # (service id, slot) -> newest task
        self._slots: dict[str, int] = {}  # task id -> slot
        self._tails: dict[str, dict[str, collections.deque[str]]] = {}
        self._watcher: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # the engine

    def client(self) -> docker.DockerClient:
        """A client of the local engine; raises `images.DockerUnavailable` saying how to start one."""
        if self._client is None:
            import docker

            images.docker_client(timeout=30).close()  # the clear message when no engine answers
            self._client = docker.from_env(timeout=120, max_pool_size=32)
        return self._client

    def _labels(self, role: str, service: str = "") -> dict[str, str]:
        labels = {LABEL_MESH: self.config.name, LABEL_STATE: self.state_label, LABEL_RUN: self.run_id,
                  LABEL_ROLE: role}
        if service:
            labels[LABEL_SERVICE] = service
        return labels

    def problems(self) -> list[str]:
        found = config_problems(self.config)
        if found:
            return found
        try:
            client = self.client()
        except images.DockerUnavailable as exc:
            return [str(exc)]
        problem = engine.engine_problem(client)
        if problem is not None:
            return [problem]
        nodes = sum(1 for node in client.api.nodes() if (node.get("Status") or {}).get("State") == "ready")
        for name, service in self.config.services.items():
            count = instance_count(service)
            if service.expose is not None and count > nodes:
                found.append(f"services.{name}: expose publishes on each node running a task (host mode, "
                             f"one task per node), so replicas = {count} needs {count} nodes; this swarm has "
                             f"{nodes} ready")
        return found

    async def build(self) -> None:
        """The images (`mesh build`'s), each checked to hold mesh; then what a crashed controller of
        this mesh left in the swarm goes."""
        await asyncio.to_thread(self._build)

    def _build(self) -> None:
        from mesh.control.runtimes.docker import build_images

        try:
            client = self.client()
            problem = engine.engine_problem(client)
            if problem is not None:
                raise StartFailed("swarm", problem)
            built = build_images(self.config, print_line, client=client)
        except (images.ImageError, images.DockerUnavailable) as exc:
            raise StartFailed("images", str(exc)) from None
        base = client.images.get(built.base).attrs["RootFS"]["Layers"]
        for name, image_id in built.services.items():
            layers = client.images.get(image_id).attrs["RootFS"]["Layers"]
            if layers[:len(base)] != base:
                raise StartFailed(name, f"its image ({image_id[7:19]}) is not built FROM mesh/base: on the "
                                  f"swarm runtime the sidecar runs in the service's own image")
        self._images = built
        # This controller holds the mesh's lock: anything of this mesh still in the swarm was left by one that died.
        removed = engine.remove_mesh(client, self.config.name, self.state_label, self.record)
        if any(removed.values()):
            print_line(f"mesh up: removed what an earlier `mesh up` of '{self.config.name}' left in the swarm: "
                       + ", ".join(f"{count} {kind}" for kind, count in removed.items()))

    @classmethod
    def prepare_detached(cls, config: MeshConfig) -> str | None:
        from mesh.control.runtimes.docker import build_images

        try:
            build_images(config)
        except (images.DockerUnavailable, images.ImageError) as exc:
            return str(exc)
        return None

    @classmethod
    def refresh_state(cls, config: MeshConfig, state: dict[str, Any]) -> None:
        engine.refresh_status(config, state)

    @classmethod
    def remove_leftovers(cls, config: MeshConfig) -> tuple[int, int] | None:
        return engine.sweep(config)

    # planning

    def plan_one(self, service: str, index: int) -> Instance:
        config = self.config.services[service]
        swarm_name = service_name(self.config.name, service)
        ports = {"app": config.port or DEFAULT_APP_PORT, "mesh": MESH_PORT, "outbound": OUTBOUND_PORT}
        instance = SwarmInstance(service, index, instance_label(service, config, index, 2), f"tasks.{swarm_name}",
                                 ports, config.health, swarm_service=swarm_name)
        self._planned[service][index] = instance
        return instance

    # blocking engine calls, on threads; tracked, so a cancelled start leaves nothing unknown

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._shielded(asyncio.get_running_loop().run_in_executor(None, fn, *args))

    async def _ask(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # starting

    async def _prepare(self) -> None:
        """Images, the overlay network and the config of mesh.toml's folder, once per run."""
        if self._prepared is None:
            self._prepared = asyncio.Lock()
        async with self._prepared:
            self._loop = asyncio.get_running_loop()
            if self._images is None:
                await self._call(self._build)
            if self._network is None:
                await self._call(self._make_network)
            if self._bundle is None:
                await self._call(self._make_bundle)
            if self._watcher is None:
                self._watcher = asyncio.ensure_future(self._watch())

    def _make_network(self) -> None:
        import docker

        name = network_name(self.config.name)
        try:
            network = self.client().networks.create(name, driver="overlay", options={"encrypted": ""},
                                                    attachable=False, check_duplicate=True,
                                                    labels=self._labels("network"))
        except docker.errors.APIError as exc:
            raise StartFailed(name, f"cannot create the overlay network {name}: {exc.explanation or exc} "
                              f"(`docker network inspect {name}` shows whose it is)") from None
        self.record.add("networks", network.id)
        network.reload()
        config = ((network.attrs.get("IPAM") or {}).get("Config") or [{}])[0]
        if not config.get("Subnet"):
            raise StartFailed(name, f"the overlay network {name} has no IPv4 subnet")
        self._network = (network.id, config["Subnet"])

    def _make_bundle(self) -> None:
        try:
            data = bundle(self.config)
        except (OSError, ValueError) as exc:
            raise StartFailed("mesh.toml", str(exc)) from None
        name = object_name("config", digest(self.config.name, self.state_label, data))
        self._bundle = (create_object(self.client(), self.record, "configs", name, data, self._labels("config")),
                        name)

    def _secrets(self, svc: _Service, folder: Path) -> tuple[str, dict[str, tuple[str, str]]]:
        return tls_secrets(self.client(), self.record, folder, scope=(self.config.name, self.state_label, svc.name),
                           labels=self._labels("tls", svc.name))

    def _create_service(self, svc: _Service, instance: SwarmInstance, start_period: float) -> None:
        import docker

        assert self._images is not None and self._network is not None and self._bundle is not None
        if instance.tls is None:
            raise StartFailed(instance.label, "no certificate was issued for it")
        svc.tls_digest, tls = self._secrets(svc, instance.tls)
        client = self.client()
        image = self._images.services[svc.name]
        svc.inputs = ServiceInputs(
            image=image, image_config=client.images.get(image).attrs.get("Config") or {},
            network=self._network[0], subnet=self._network[1], bundle=self._bundle, tls=tls,
            labels=self._labels("service", svc.name), environment=self.app_environment(instance, OUTBOUND_PORT),
            start_period=start_period)
        try:
            created = client.api.create_service(**service_spec(self.config, svc.name, svc.inputs))
        except docker.errors.APIError as exc:
            raise StartFailed(instance.label, f"cannot create the Swarm service {svc.swarm_name}: "
                              f"{exc.explanation or exc}") from None
        svc.id = str(created["ID"])
        svc.lead = instance.label
        self.record.add("services", svc.id)
        svc.logs = engine.ServiceLogs(client, svc.id, lambda task, text: self._from_logs(svc.name, task, text))
        svc.logs.start()

    async def start_instance(self, instance: Instance, registry: Path, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._prepare()
        self._mark_starting(instance)
        inst = _swarm(instance)
        svc = self._services[inst.service]
        async with svc.lock:
            if svc.id is None or svc.removed:
                svc.removed = False
                await self._call(self._create_service, svc, inst, timeout)
        await self._wait_running(inst, svc, deadline, timeout)
        # In DNS now: every sidecar has resolved its name again before the instance counts as ready.
        await asyncio.sleep(DNS_SETTLE)
        self._mark_ready(instance)

    async def _wait_running(self, inst: SwarmInstance, svc: _Service, deadline: float, timeout: float) -> None:
        """Until the task in the instance's slot runs and passed its health check; `StartFailed` when it
        failed or at ``deadline``, with the engine's word and the task's last lines."""
        loop = asyncio.get_running_loop()
        while True:
            assert svc.id is not None
            tasks = await self._ask(self._service_tasks, svc.id)
            task = engine.newest_tasks(tasks).get((svc.id, inst.index))
            self._note(inst, task)
            if engine.task_state(task) == "running":
                return
            status = (task or {}).get("Status") or {}
            if status.get("State") in _FAILED:
                await asyncio.sleep(0.5)  # its last lines
                raise StartFailed(inst.label, f"its task {status.get('State')}: {status.get('Err') or '?'}",
                                  self.tail(inst, "sidecar") + self.tail(inst, "app"))
            if loop.time() >= deadline:
                said = f"{status.get('State', 'no task yet')}" + (f": {status['Err']}" if status.get("Err") else "")
                raise StartFailed(inst.label, f"not ready after {timeout:g}s: waited for its task to run and pass "
                                  f"its health check (task: {said})",
                                  self.tail(inst, "sidecar") + self.tail(inst, "app"))
            await asyncio.sleep(0.25)

    def _service_tasks(self, service_ids: str | list[str]) -> list[dict[str, Any]]:
        return list(self.client().api.tasks(filters={"service": service_ids}))

    def _note(self, inst: SwarmInstance, task: dict[str, Any] | None) -> None:
        """What the engine says of the instance's task: in state.json, and its overlay IP as its host."""
        inst.task = engine.describe_task(task, (task or {}).get("ServiceID"))
        if task is None:
            return
        self._slots[task["ID"]] = inst.index
        for attachment in task.get("NetworksAttachments") or []:
            if self._network is not None and (attachment.get("Network") or {}).get("ID") == self._network[0]:
                addresses = attachment.get("Addresses") or []
                if addresses and engine.task_state(task) == "running":
                    inst.host = addresses[0].split("/")[0]

    # watching

    async def _watch(self) -> None:
        """Twice a second, the tasks of this run's services: `instance_state` and state.json follow them."""
        failing = False
        while True:
            await asyncio.sleep(0.5)
            ids = [svc.id for svc in self._services.values() if svc.id and not svc.removed]
            if not ids:
                continue
            try:
                tasks = await self._ask(self._service_tasks, ids)
            except Exception as exc:  # noqa: BLE001 - the engine hiccups: try again next time
                if not failing:
                    log.warning("cannot list this mesh's Swarm tasks: %s", exc)
                failing = True
                continue
            failing = False
            self._tasks = engine.newest_tasks(tasks)
            for svc in self._services.values():
                for index, inst in self._planned[svc.name].items():
                    if svc.id is not None:
                        self._note(inst, self._tasks.get((svc.id, index)))

    def _from_logs(self, service: str, task: str, text: str) -> None:
        """A line of a task's output (on the log thread): to the console and the tail, by slot and role."""
        slot = self._slots.get(task)
        if slot is None and task:
            with contextlib.suppress(Exception):
                slot = int(self.client().api.inspect_task(task).get("Slot") or 0)
                self._slots[task] = slot
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
                self._loop.call_soon_threadsafe(self._line, service, slot or 0, text)

    def _line(self, service: str, slot: int, text: str) -> None:
        inst = self._planned[service].get(slot)
        role = "sidecar" if text.startswith((SIDECAR_PREFIX, TASK_PREFIX)) else "app"
        text = text.removeprefix(SIDECAR_PREFIX)
        label = output_label(inst, role) if inst is not None else f"{service}.{slot}" + (
            ".sidecar" if role == "sidecar" else "")
        key = inst.label if inst is not None else label
        self._tails.setdefault(key, {}).setdefault(role, collections.deque(maxlen=TAIL_LINES)).append(text)
        self.output(label, text)

    def tail(self, instance: Instance, role: str) -> list[str]:
        label = output_label(instance, role)
        return [f"{label} | {line}" for line in self._tails.get(instance.label, {}).get(role, ())]

    def exit_code(self, instance: Instance, role: str) -> int | None:
        """None: Swarm restarts what ends, and says so in the task's state."""
        return None

    def _slot_task(self, instance: Instance) -> dict[str, Any] | None:
        svc = self._services.get(instance.service)
        if svc is None or svc.id is None:
            return None
        return self._tasks.get((svc.id, instance.index))

    def instance_state(self, instance: Instance) -> str:
        """As on every runtime until ready; then ``running`` while its slot's task runs, ``starting``
        while Swarm replaces it."""
        state = super().instance_state(instance)
        if state != "running" or self._slot_task(instance) is None:
            return state
        return "running" if engine.task_state(self._slot_task(instance)) == "running" else "starting"

    async def check_health(self, instance: Instance, timeout: float) -> bool:
        """Whether the slot's task runs: the engine checks the task's health itself and replaces it."""
        return engine.task_state(self._slot_task(instance)) == "running"

    async def push_registry(self, instance: Instance, body: bytes) -> bool:
        """Nothing to push: sidecars resolve ``tasks.<service>`` themselves (`mesh.sidecar.dns_registry`)."""
        return True

    async def reload_certificates(self, instance: Instance) -> bool:
        """New secrets from the files of the service's lead instance and a rolling update of its tasks,
        one at a time (a new task first, where the service publishes no port); True once done.
        The other instances share the lead's secrets: nothing to do for them."""
        svc = self._services.get(instance.service)
        if svc is None or svc.id is None or svc.removed:
            return False
        if instance.label != svc.lead:
            return True
        async with svc.lock:
            return bool(await self._call(self._roll, svc, _swarm(instance)))

    def _roll(self, svc: _Service, instance: SwarmInstance) -> bool:
        assert svc.id is not None and svc.inputs is not None and instance.tls is not None
        old = dict(svc.inputs.tls)
        together, tls = self._secrets(svc, instance.tls)
        if together == svc.tls_digest:
            return True
        svc.inputs.tls = tls
        problem = roll(self.client(), svc.id, service_spec(self.config, svc.name, svc.inputs),
                       ROLL_TIMEOUT + 30 * len(self._planned[svc.name]))
        if problem is not None:
            log.warning("%s: renewed certificates: %s", svc.swarm_name, problem)
            return False
        svc.tls_digest = together
        remove_secrets(self.client(), self.record, {i for i, _ in old.values()} - {i for i, _ in tls.values()})
        return True

    # stopping

    async def stop_role(self, instance: Instance, role: str) -> None:
        """Stopping a sidecar stops nothing alone: once every instance of a service is asked to stop,
        its Swarm service goes (each task drains, then its app stops). A single instance of several
        cannot be stopped: Swarm keeps every slot running."""
        await self._settle()
        self._mark_stopping(instance)
        if role != "sidecar":
            return
        await asyncio.sleep(0)  # the other instances asked to stop at the same time mark theirs first
        svc = self._services.get(instance.service)
        if svc is None or svc.id is None:
            return
        if any(inst.label not in self._stopping for inst in self._planned[svc.name].values()):
            return
        async with svc.lock:
            if not svc.removed:
                await self._call(self._remove_service, svc, SIDECAR_GRACE + APP_GRACE + 10)

    def _remove_service(self, svc: _Service, wait: float) -> None:
        import docker

        assert svc.id is not None
        with contextlib.suppress(docker.errors.NotFound):
            self.client().api.remove_service(svc.id)
        svc.removed = True
        self.record.discard("services", svc.id)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not self.client().api.containers(all=True, filters={
                    "label": [f"com.docker.swarm.service.id={svc.id}"]}):
                break
            time.sleep(0.25)
        if svc.logs is not None:
            svc.logs.close()

    async def kill_all(self) -> None:
        await self._settle()
        self._stopping.update(inst.label for planned in self._planned.values() for inst in planned.values())
        for svc in self._services.values():
            if svc.id is not None and not svc.removed:
                await self._call(self._remove_service, svc, 0)

    async def close(self) -> None:
        """Remove what is left of this run: services, then the network, secrets and config."""
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self._settle()
        if self._client is not None:
            try:
                await self._call(engine.remove_mesh, self._client, self.config.name, self.state_label, self.record)
            except Exception as exc:  # noqa: BLE001 - `mesh down` removes by label what is left
                log.warning("could not remove everything of this run: %s; `mesh down` will", exc)
        for svc in self._services.values():
            if svc.logs is not None:
                svc.logs.close()
        if self._client is not None:
            self._client.close()
