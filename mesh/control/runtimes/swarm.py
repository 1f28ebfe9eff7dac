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
``web.2`` is the task in ``slot`` 2 of ``<mesh>_web``: started when the controller
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
  (`reload_certificates`);
- pools: starting one more instance raises the replica count, stopping one stops
  its task, then lowers it; `cpu_seconds` reads the app in the task
  (`mesh.control.swarm.scaling`);
- `mesh reload`: a rolling update of each service whose tasks see a change
  (`update_services`, `mesh.control.swarm.rollout`), not a swap over admin listeners.

Not done on swarm: keyed services and jobs (refused before anything starts), and
the admin listener from the host (no ``mesh tap``, ``mesh logs``). `mesh down`
removes the mesh's services, network, secrets and configs, found by their labels
and the ids recorded in ``.mesh/<name>/swarm.json``, nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.config import MeshConfig
from mesh.config.version import version
from mesh.control.docker import images
from mesh.control.docker.layout import APP_GRACE, DEFAULT_APP_PORT, MESH_PORT, OUTBOUND_PORT, SIDECAR_GRACE
from mesh.control.docker.status import print_line
from mesh.control.runtimes.base import (
    Instance,
    OnExit,
    Output,
    Runtime,
    StartFailed,
    instance_count,
    instance_label,
)
from mesh.control.swarm import engine, rollout, scaling
from mesh.control.swarm.instances import SwarmInstance, SwarmService, swarm_instance
from mesh.control.swarm.layout import (
    LABEL_MESH,
    LABEL_ROLE,
    LABEL_RUN,
    LABEL_SERVICE,
    LABEL_STATE,
    Record,
    object_name,
    service_name,
)
from mesh.control.swarm.objects import create_object, make_network, remove_unused, roll, tls_secrets
from mesh.control.swarm.output import TaskOutput
from mesh.control.swarm.redis import REDIS_SERVICE, redis_image, redis_spec, redis_wanted
from mesh.control.swarm.rollout import sidecar_view
from mesh.control.swarm.scaling import free_slot
from mesh.control.swarm.services import ServiceInputs, bundle, config_problems, digest, service_spec
from mesh.sidecar import admin
from mesh.sidecar.dns_registry import DEFAULT_EVERY

if TYPE_CHECKING:
    import docker

__all__ = ["SwarmInstance", "SwarmRuntime"]

log = logging.getLogger("mesh.swarm")

_FAILED = {"failed", "rejected", "orphaned", "remove"}
ROLL_TIMEOUT = 60.0  # seconds a rolling update may take, plus 30 per task
START_ATTEMPTS = 3  # tasks of a slot that may fail before its instance's start does
DNS_SETTLE = DEFAULT_EVERY + 0.5  # seconds for every sidecar to resolve a task that just entered DNS


class SwarmRuntime(Runtime):
    """Instances as the tasks of one Swarm service per mesh service (see the module docstring)."""

    name = "swarm"
    reloadable = True  # by rolling updates (`update_services`): the tasks' admin listeners are theirs alone

    def __init__(self, config: MeshConfig, *, output: Output, on_exit: OnExit, run_id: str = "",
                 admin_token: admin.AdminToken | None = None) -> None:
        super().__init__(config, output=output, on_exit=on_exit, run_id=run_id, admin_token=admin_token)
        self.state_label = str(config.state_dir.resolve())
        self.record = Record.load(config.state_dir)
        self._client: docker.DockerClient | None = None
        self._images: images.BuiltImages | None = None
        self._network: tuple[str, str] | None = None  # (id, IPv4 subnet)
        self._bundle: tuple[str, str] | None = None   # (id, name) of the config
        self._version = ""  # of mesh.toml in that config
        self._redis: str | None = None  # the id of the Redis service of the mesh, once made
        self._prepared: asyncio.Lock | None = None
        self._services = {name: SwarmService(name, service_name(config.name, name)) for name in config.services}
        self._planned: dict[str, dict[int, SwarmInstance]] = collections.defaultdict(dict)
        self._tasks: dict[tuple[str, int], dict[str, Any]] = {}  # (service id, slot) -> newest task
        self._output = TaskOutput(output, self.client, self._in_slot)
        self._watcher: asyncio.Future[None] | None = None
        self._app_cpu = scaling.AppCpu()
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
            return engine.swarm_problems(self.client(), self.config)
        except images.DockerUnavailable as exc:
            return [str(exc)]

    async def build(self) -> None:
        """The images (`mesh build`'s), each checked to hold mesh; then what a crashed controller of
        this mesh left in the swarm goes."""
        await asyncio.to_thread(self._build)

    def _build(self) -> None:
        client = self.client()
        self._images = engine.service_images(client, self.config)
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
                                 ports, config.health, swarm_service=swarm_name, slot=index)
        self._planned[service][index] = instance
        return instance

    # blocking engine calls, on threads; tracked, so a cancelled start leaves nothing unknown

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._shielded(asyncio.get_running_loop().run_in_executor(None, fn, *args))

    async def _ask(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # starting

    async def _prepare(self) -> None:
        """Images, the overlay network, the mesh's Redis if a storage names it, and the config of
        mesh.toml's folder, once per run."""
        if self._prepared is None:
            self._prepared = asyncio.Lock()
        async with self._prepared:
            self._output.loop = asyncio.get_running_loop()
            if self._images is None:
                await self._call(self._build)
            if self._network is None:
                await self._call(self._make_network)
            if self._redis is None and redis_wanted(self.config):
                await self._call(self._make_redis, self.config)
            if self._bundle is None:
                await self._call(self._make_bundle)
            if self._watcher is None:
                self._watcher = asyncio.ensure_future(self._watch())

    def _make_network(self) -> None:
        self._network = make_network(self.client(), self.record, self.config.name, self._labels("network"))

    def _make_redis(self, config: MeshConfig) -> None:
        """The mesh's Redis (`mesh.control.swarm.redis`), once its task runs."""
        assert self._images is not None and self._network is not None
        client = self.client()
        try:
            image = redis_image(client, self._images.base, print_line)
        except images.ImageError as exc:
            raise StartFailed(REDIS_SERVICE, str(exc)) from None
        spec = redis_spec(config, image, self._network[0], self._labels("redis", REDIS_SERVICE))
        self._redis = str(client.api.create_service(**spec)["ID"])
        self.record.add("services", self._redis)
        problem = engine.wait_running(client, self._redis, 120)
        if problem is not None:
            raise StartFailed(REDIS_SERVICE, problem)

    def _make_bundle(self, config: MeshConfig | None = None) -> None:
        """The folder of mesh.toml as a Docker config, and the version it holds."""
        config = config or self.config
        try:
            data, self._version = bundle(config), version(config)
        except (OSError, ValueError) as exc:
            raise StartFailed("mesh.toml", str(exc)) from None
        name = object_name("config", digest(config.name, self.state_label, data))
        self._bundle = (create_object(self.client(), self.record, "configs", name, data, self._labels("config")),
                        name)

    def _secrets(self, svc: SwarmService, folder: Path) -> tuple[str, dict[str, tuple[str, str]]]:
        return tls_secrets(self.client(), self.record, folder, scope=(self.config.name, self.state_label, svc.name),
                           labels=self._labels("tls", svc.name))

    def _create_service(self, svc: SwarmService, instance: SwarmInstance, start_period: float) -> None:
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
            start_period=start_period, replicas=instance_count(self.config.services[svc.name]), version=self._version)
        svc.replicas = svc.inputs.replicas or 0
        svc.view = sidecar_view(self.config, svc.name)
        try:
            created = client.api.create_service(**service_spec(self.config, svc.name, svc.inputs))
        except docker.errors.APIError as exc:
            raise StartFailed(instance.label, f"cannot create the Swarm service {svc.swarm_name}: "
                              f"{exc.explanation or exc}") from None
        svc.id = str(created["ID"])
        svc.lead = instance.label
        self.record.add("services", svc.id)
        svc.logs = engine.ServiceLogs(client, svc.id, lambda task, text: self._output.from_logs(svc.name, task, text))
        svc.logs.start()

    async def start_instance(self, instance: Instance, registry: Path, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._prepare()
        self._mark_starting(instance)
        inst = swarm_instance(instance)
        svc = self._services[inst.service]
        async with svc.lock:
            if svc.id is None or svc.removed:
                svc.removed = False
                await self._call(self._create_service, svc, inst, timeout)
            else:
                others = [i for i in self._live(svc) if i is not inst]
                if len(others) >= svc.replicas:  # one more task: a pool grows
                    inst.slot = free_slot({i.slot for i in others})
                    inst.since = await self._call(self._set_replicas, svc, len(others) + 1)
        await self._wait_running(inst, svc, deadline, timeout)
        # In DNS now: every sidecar has resolved its name again before the instance counts as ready.
        await asyncio.sleep(DNS_SETTLE)
        self._mark_ready(instance)

    async def _wait_running(self, inst: SwarmInstance, svc: SwarmService, deadline: float, timeout: float) -> None:
        """Until the task in the instance's slot runs and passed its health check; `StartFailed` when it
        failed or at ``deadline``, with the engine's word and the task's last lines."""
        loop = asyncio.get_running_loop()
        failed: set[str] = set()
        again = self.config.services[inst.service].restart_policy == "on-failure"
        while True:
            assert svc.id is not None
            tasks = [t for t in await self._ask(self._service_tasks, svc.id) if t["Version"]["Index"] > inst.since]
            task = engine.newest_tasks(tasks).get((svc.id, inst.slot))
            self._note(inst, task)
            if engine.task_state(task) == "running":
                return
            status = (task or {}).get("Status") or {}
            if status.get("State") in _FAILED and task is not None:
                failed.add(task["ID"])
            # Swarm starts another task: the engine itself fails a start now and then (moby/moby#48783).
            if status.get("State") in _FAILED and (len(failed) >= START_ATTEMPTS or not again):
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
        self._output.slots[task["ID"]] = inst.slot
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
                for inst in self._planned[svc.name].values():
                    if svc.id is not None and not inst.scaled_down:
                        self._note(inst, self._tasks.get((svc.id, inst.slot)))

    def _in_slot(self, service: str, slot: int) -> SwarmInstance | None:
        return next((i for i in self._planned[service].values() if i.slot == slot and not i.scaled_down), None)

    def tail(self, instance: Instance, role: str) -> list[str]:
        return self._output.tail(instance, role)

    def exit_code(self, instance: Instance, role: str) -> int | None:
        """None: Swarm restarts what ends, and says so in the task's state."""
        return None

    def _slot_task(self, instance: Instance) -> dict[str, Any] | None:
        svc = self._services.get(instance.service)
        if svc is None or svc.id is None or swarm_instance(instance).scaled_down:
            return None
        return self._tasks.get((svc.id, swarm_instance(instance).slot))

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

    async def cpu_seconds(self, instance: Instance) -> float | None:
        """CPU seconds of the app in the instance's task, from /proc (`mesh.control.swarm.scaling`)."""
        container = (self._slot_task(instance) or {}).get("Status", {}).get("ContainerStatus", {}).get("ContainerID")
        if not container or engine.task_state(self._slot_task(instance)) != "running":
            return None
        try:
            return await self._ask(self._app_cpu.seconds, self.client(), container)
        except Exception as exc:  # noqa: BLE001 - the engine hiccups: no sample this time
            log.debug("%s: no CPU sample: %s", instance.label, exc)
            return None

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
            return bool(await self._call(self._roll, svc, swarm_instance(instance)))

    def _roll(self, svc: SwarmService, instance: SwarmInstance) -> bool:
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
        unused = {i for i, _ in old.values()} - {i for i, _ in tls.values()}
        remove_unused(self.client(), self.record, "secrets", unused)
        return True

    # reloading

    async def update_services(self, config: MeshConfig) -> list[str]:
        """`mesh reload`: a rolling update of each service whose tasks see a change of ``config``, one
        service after the other (`mesh.control.swarm.rollout`); the names of those updated. Raises
        `StartFailed` when one failed: each is rolled back, and this runtime keeps the mesh it ran."""
        await self._prepare()
        names = sorted(name for name in config.services if name in self.config.services)
        async with contextlib.AsyncExitStack() as held:
            for name in names:
                await held.enter_async_context(self._services[name].lock)
            return list(await self._call(self._roll_out, config, names))

    def _roll_out(self, config: MeshConfig, names: list[str]) -> list[str]:
        client = self.client()
        problems = config_problems(config) or engine.swarm_problems(client, config)
        problems += [f"services.{name}.replicas changed ({self.config.services[name].replicas} -> "
                     f"{config.services[name].replicas}): on the swarm runtime a reload cannot change it; "
                     f"`mesh down`, then `mesh up`" for name in names
                     if config.services[name].replicas != self.config.services[name].replicas]
        if problems:
            raise StartFailed("mesh.toml", "\n".join(problems))
        assert self._images is not None
        built = engine.reload_images(client, self._images, self.config, config)
        if self._redis is None and redis_wanted(config):
            self._make_redis(config)
        current = (self._bundle, self._version)
        self._make_bundle(config)
        assert self._bundle is not None
        seen = copy.copy(self)  # for the app's environment as ``config`` makes it
        seen.config = config
        updates: list[rollout.Update] = []
        views = {}
        for name in names:
            svc = self._services[name]
            planned = list(self._planned[name].values())
            if svc.id is None or svc.removed or svc.inputs is None or not planned:
                continue
            image = built.services[name]
            same = dataclasses.replace(svc.inputs, image=image, image_config=client.images.get(image).attrs["Config"],
                                       environment=seen.app_environment(planned[0], OUTBOUND_PORT))
            before = service_spec(self.config, name, svc.inputs)
            views[name] = sidecar_view(config, name)
            if service_spec(config, name, same) == before and views[name] == svc.view:
                continue
            inputs = dataclasses.replace(same, bundle=self._bundle, version=self._version)
            updates.append(rollout.Update(name, svc.id, before, service_spec(config, name, inputs), inputs,
                                          ROLL_TIMEOUT + 30 * max(svc.replicas, 1)))
        try:
            rollout.roll_out(client, updates)
        except StartFailed:
            (self._bundle, self._version) = current
            raise
        else:
            self._images = built
            for update in updates:
                svc = self._services[update.name]
                svc.inputs, svc.view = update.inputs, views[update.name]
                for inst in self._planned[update.name].values():
                    inst.follow(config.services[update.name])
        finally:
            used = {svc.inputs.bundle[0] for svc in self._services.values() if svc.inputs is not None}
            if self._bundle is not None:
                used.add(self._bundle[0])
            remove_unused(client, self.record, "configs", set(self.record.of("configs")) - used)
        return [update.name for update in updates]

    # stopping

    async def stop_role(self, instance: Instance, role: str) -> None:
        """Stopping a sidecar stops its task: once every instance of a service is asked to stop, its
        Swarm service goes (each task drains, then its app stops); one instance of several (a pool
        shrinking) is its task stopped and one replica less (`mesh.control.swarm.scaling`)."""
        await self._settle()
        self._mark_stopping(instance)
        if role != "sidecar":
            return
        await asyncio.sleep(0)  # the other instances asked to stop at the same time mark theirs first
        inst = swarm_instance(instance)
        svc = self._services.get(instance.service)
        if svc is None or svc.id is None:
            return
        async with svc.lock:
            if svc.removed or inst.scaled_down:
                return
            if self._live(svc):
                await self._call(self._scale_down, svc, inst)
            else:
                await self._call(self._remove_service, svc, SIDECAR_GRACE + APP_GRACE + 10)

    def _live(self, svc: SwarmService) -> list[SwarmInstance]:
        """The service's instances that hold a slot and are not asked to stop."""
        return [i for i in self._planned[svc.name].values() if i.label not in self._stopping and not i.scaled_down]

    def _set_replicas(self, svc: SwarmService, replicas: int) -> int:
        """The service's new replica count; the engine's index before it (older tasks are not for it)."""
        assert svc.id is not None and svc.inputs is not None
        since = scaling.set_replicas(self.client(), svc.id, replicas)
        svc.replicas = svc.inputs.replicas = replicas
        return since

    def _scale_down(self, svc: SwarmService, inst: SwarmInstance) -> None:
        """The instance's task stopped (draining), then one replica less; the other instances follow
        the slots Swarm kept, should it have dropped another one."""
        assert svc.id is not None
        task = engine.newest_tasks(self._service_tasks(svc.id)).get((svc.id, inst.slot))
        if task is not None and engine.task_state(task) != "stopped":
            problem = scaling.stop_task(self.client(), task["ID"], SIDECAR_GRACE + APP_GRACE + 5)
            if problem is not None:
                log.warning("%s: %s; Swarm chooses which task goes", inst.label, problem)
        inst.scaled_down = True
        self._set_replicas(svc, max(svc.replicas - 1, 0))
        scaling.follow_slots(self._live(svc), scaling.running_slots(self._service_tasks(svc.id)))

    def _remove_service(self, svc: SwarmService, wait: float) -> None:
        import docker

        assert svc.id is not None
        with contextlib.suppress(docker.errors.NotFound):
            self.client().api.remove_service(svc.id)
        svc.removed = True
        self.record.discard("services", svc.id)
        engine.wait_tasks_gone(self.client(), [svc.id], time.monotonic() + wait)
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
