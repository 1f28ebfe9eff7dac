"""The docker runtime: each instance is a sidecar container and an app container in one network namespace.

::

    host 127.0.0.1:<expose>: a socket of the controller's, handed to every sidecar of the service
    host 127.0.0.1:<admin> ───┐ (published)      network mesh-<name> (internal)
                              ▼                  │  other sidecars ──▶ :15001 (mTLS) │
    ┌ network namespace of the sidecar container ┴──────────────────────────────────┤
    │  sidecar: mesh :15001 (0.0.0.0)   public: the host's socket (when exposed)     │
    │           outbound 127.0.0.1:15002   admin 127.0.0.1:15000                     │
    │  app container (network_mode=container:<sidecar>): listens on its `port`       │
    │  firewall (iptables, installed before the sidecar runs, with NET_ADMIN that   │
    │  the sidecar process then drops): from outside the namespace only the mesh    │
    │  listener (from the mesh network) and the admin listener (from the host,      │
    │  through its published port) take connections; the app's port and            │
    │  everything else answer with a reset. Inside, nothing (the app included)      │
    │  may connect to the admin port. Out of the namespace only other sidecars'     │
    │  mesh listeners (and, with [[egress]], the sidecar's uid).                    │
    └────────────────────────────────────────────────────────────────────────────────┘

Per mesh, two networks (`mesh.control.docker.networks`; a third for egress), made
by the first instance to start: ``mesh-<name>`` (internal), where sidecars reach
each other by an alias each has there only, and ``mesh-<name>-edge``, only so
that Docker publishes the admin listeners on the host's 127.0.0.1. An exposed
service's public listener publishes nothing: the controller listens on the
host's 127.0.0.1:``expose`` and hands the socket to each of its sidecars (when
the instance's app is ready, or when no other sidecar serves it), over a unix
socket in a folder only that sidecar's container mounts
(`mesh.control.runtimes.public`); a socket keeps the network namespace it was
made in, so the sidecar accepts the host's connections.

Keyed services (`mesh.control.keyed`): the controller runs each one's front on the
mesh network's gateway IP (the host's side of the bridge; `front_host` makes
the networks before any instance starts), the registry lists it there, and the
firewall lets sidecars out to the gateway on the fronts' ports only
(`allow_front`); the front reaches a key's instance at its IP on the mesh
network (`reach`), which the mesh listener takes since the gateway is in the subnet.

The namespace's firewall is `mesh.control.docker.firewall`; the containers'
mounts, environment, limits and health probe `mesh.control.docker.containers`;
their names and labels `mesh.control.docker.layout`; what `mesh ps` and
`mesh down` ask of the engine without a controller `mesh.control.docker.status`;
the images `mesh.control.docker.images`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.config import MeshConfig
from mesh.control.docker import images
from mesh.control.docker.containers import (
    ContainerInstance,
    LogFollower,
    app_spec,
    config_problems,
    cpu_seconds,
    probe_command,
    published,
    sidecar_spec,
)
from mesh.control.docker.firewall import FIREWALL_MARKER
from mesh.control.docker.layout import (
    ADMIN_PORT,
    APP_GRACE,
    DEFAULT_APP_PORT,
    LABEL_INSTANCE,
    LABEL_KEY,
    LABEL_MESH,
    LABEL_ROLE,
    LABEL_RUN,
    LABEL_SERVICE,
    LABEL_STATE,
    MESH_PORT,
    OUTBOUND_PORT,
    SIDECAR_GRACE,
    container_name,
    mesh_alias,
)
from mesh.control.docker.networks import Network, create_networks, network_roles, publishing_role
from mesh.control.docker.status import print_line, refresh_status, remove_owned, sweep
from mesh.control.docker.volumes import remove_volumes
from mesh.control.logs import log_file
from mesh.control.runtimes.base import (
    SIDECAR_TIMEOUT,
    TAIL_LINES,
    Instance,
    OnExit,
    Output,
    Runtime,
    StartFailed,
    instance_label,
    output_label,
)
from mesh.control.runtimes.public import PublicSockets
from mesh.sidecar import admin

if TYPE_CHECKING:
    import docker

__all__ = ["DockerRuntime", "build_images"]

log = logging.getLogger("mesh.docker")


def _containers(instance: Instance) -> ContainerInstance:
    """``instance`` as this runtime planned it."""
    if not isinstance(instance, ContainerInstance):
        raise TypeError(f"{instance.label} was not planned by the docker runtime")
    return instance


@dataclass
class _Slot:
    """What runs for one instance: container ids by role, their output, what happened to them."""

    instance: ContainerInstance
    ids: dict[str, str] = field(default_factory=dict)
    tails: dict[str, collections.deque[str]] = field(default_factory=dict)
    firewall: asyncio.Event = field(default_factory=asyncio.Event)
    exited: dict[str, int] = field(default_factory=dict)
    stopped: set[str] = field(default_factory=set)
    removed: bool = False


class DockerRuntime(Runtime):
    """Instances as a sidecar container plus an app container sharing its network namespace.

    See the module docstring for the networks, the firewall, the containers and the public socket.
    """

    name = "docker"
    shares_public = True

    def __init__(self, config: MeshConfig, *, output: Output, on_exit: OnExit, run_id: str = "",
                 admin_token: admin.AdminToken | None = None) -> None:
        super().__init__(config, output=output, on_exit=on_exit, run_id=run_id, admin_token=admin_token)
        self.state_label = str(config.state_dir.resolve())
        self._client: docker.DockerClient | None = None
        self._images: images.BuiltImages | None = None
        self._networks: dict[str, Network] = {}
        self._prepared: asyncio.Lock | None = None
        self._slots: dict[str, _Slot] = {}
        self._followers: list[LogFollower] = []
        self._watcher: asyncio.Future[None] | None = None
        self._closed = False
        self.public = PublicSockets(config.state_dir / "handoff")
        # Ports of the keyed services' fronts on the mesh network's gateway: the sidecars' firewall
        # lets them out to these (set before any instance starts; see `mesh.control.keyed`).
        self.front_ports: list[int] = []

    # the engine

    def client(self) -> docker.DockerClient:
        """A client of the local engine; raises `images.DockerUnavailable` saying how to start one."""
        if self._client is None:
            import docker

            images.docker_client(timeout=30).close()  # the clear message when no engine answers
            # A pool as large as the threads that may talk to the engine at once (log streams hold one each).
            self._client = docker.from_env(timeout=120, max_pool_size=64)
        return self._client

    def _labels(self, instance: Instance | None = None, role: str = "") -> dict[str, str]:
        labels = {LABEL_MESH: self.config.name, LABEL_STATE: self.state_label, LABEL_RUN: self.run_id}
        if instance is not None:
            labels.update({LABEL_SERVICE: instance.service, LABEL_INSTANCE: str(instance.index)})
        if role:
            labels[LABEL_ROLE] = role
        if instance is not None and instance.key is not None:
            labels[LABEL_KEY] = instance.label
        return labels

    def problems(self) -> list[str]:
        found = config_problems(self.config)
        if not found:
            try:
                self.client()
            except images.DockerUnavailable as exc:
                found.append(str(exc))
        return found

    async def build(self) -> None:
        """Build what is missing or out of date (`images.ensure_images`), saying what it does; then
        remove what a crashed controller of this mesh left in the engine."""
        await asyncio.to_thread(self._build)

    def _build(self) -> None:
        try:
            client = self.client()
            self._images = build_images(self.config, print_line, client=client)
        except (images.ImageError, images.DockerUnavailable) as exc:
            raise StartFailed("images", str(exc)) from None
        # This controller holds the mesh's lock: anything of this mesh still in the engine was left by
        # one that died (and holds its `expose` ports, which `plan` is about to check).
        removed = remove_owned(client, self.config.name, self.state_label, grace=False)
        if any(removed):
            print_line(f"mesh up: removed {removed[0]} containers and {removed[1]} networks an earlier "
                       f"`mesh up` of '{self.config.name}' left behind")

    # planning

    def plan_one(self, service: str, index: int) -> Instance:
        """One more instance of a pool (autoscaling); like `plan`, its ports are published when it starts."""
        config = self.config.services[service]
        ports = {"app": config.port or DEFAULT_APP_PORT, "mesh": MESH_PORT, "outbound": OUTBOUND_PORT, "admin": 0}
        if config.expose is not None:
            ports["public"] = config.expose  # one socket, every instance's (`PublicSockets`)
        instance = ContainerInstance(service, index, instance_label(service, config, index, 2),
                                     mesh_alias(self.config.name, service, index), ports, config.health)
        instance.containers = {
            role: {"name": container_name(self.config.name, service, index, role), "id": None}
            for role in ("sidecar", "app")}
        return instance

    # other processes reading the mesh's files

    @classmethod
    def prepare_detached(cls, config: MeshConfig) -> str | None:
        """Build what is missing; a first build may outlast `mesh up -d`'s wait for the controller."""
        try:
            build_images(config)
        except (images.DockerUnavailable, images.ImageError) as exc:
            return str(exc)
        return None

    @classmethod
    def refresh_state(cls, config: MeshConfig, state: dict[str, Any]) -> None:
        """Containers, asked of the engine by their labels (`refresh_status`)."""
        refresh_status(config, state)

    @classmethod
    def remove_leftovers(cls, config: MeshConfig) -> tuple[int, int] | None:
        return sweep(config)

    @classmethod
    def remove_volumes(cls, config: MeshConfig, *, required: bool) -> int | None:
        return remove_volumes(config, required=required)  # the keys' volumes, by this mesh's labels

    # keyed services: their fronts run in the controller, on the host's side of the mesh network

    async def front_host(self) -> str:
        """Images and networks now (before any instance starts); the mesh network's gateway IP,
        where the host (so a keyed service's front) is reachable from sidecars."""
        await self._prepare()
        return self._networks["mesh"].gateway

    def allow_front(self, port: int) -> None:
        """The sidecars' firewall lets them out to this port of the gateway."""
        self.front_ports.append(port)

    def replan(self, instance: Instance) -> None:
        instance = _containers(instance)
        # The front serves `expose`; the admin port is published anew at every start.
        instance.ports.pop("public", None)
        instance.ports["admin"] = 0
        instance.mesh_ip = None
        for container in instance.containers.values():
            container["id"] = None

    async def cpu_seconds(self, instance: Instance) -> float | None:
        """The app container's ``cpu_stats.cpu_usage.total_usage`` from the engine, in seconds."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._cpu, instance)
        except Exception as exc:  # noqa: BLE001 - the engine hiccups: no sample this time
            log.debug("%s: no CPU sample: %s", instance.label, exc)
            return None

    def _cpu(self, instance: Instance) -> float | None:
        app = _containers(instance).containers.get("app")
        container = app["id"] if app is not None else None
        return cpu_seconds(self.client().api, container) if container else None

    def reach(self, instance: Instance) -> tuple[str, int]:
        """Where the host reaches a started instance's mesh listener: its IP on the mesh network
        (its alias resolves only inside the network)."""
        ip = _containers(instance).mesh_ip
        if not ip:
            raise StartFailed(instance.label, "its IP on the mesh network is not known")
        return str(ip), MESH_PORT

    # blocking engine calls, on threads; tracked, so a cancelled start leaves nothing unknown

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._shielded(asyncio.get_running_loop().run_in_executor(None, fn, *args))

    async def _ask(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking call that creates nothing (a probe, a listing): not waited for by `_settle`."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # starting

    async def _prepare(self) -> None:
        """Images and networks, once per run (the first start does it; the others wait)."""
        if self._prepared is None:
            self._prepared = asyncio.Lock()
        async with self._prepared:
            if self._images is None:
                await self._call(self._build)
            if not self._networks.keys() >= set(network_roles(self.config)):  # a reload may add egress
                await self._call(self._make_networks)
                if self._watcher is None:
                    self._watcher = asyncio.ensure_future(self._watch())

    def _make_networks(self) -> None:
        create_networks(self.client(), self.config.name, lambda role: self._labels(role=role), self._networks,
                        network_roles(self.config))

    def _sidecar_spec(self, instance: ContainerInstance, registry: Path) -> dict[str, Any]:
        assert self._images is not None
        endpoint = self.client().api.create_endpoint_config(aliases=[instance.host])
        logs = log_file(self.config.state_dir, instance.label).parent  # made here, mounted there
        handoff = self.public.offer_folder(instance) if "public" in instance.ports else None
        return sidecar_spec(self.config, instance, image=self._images.base, registry=registry,
                            admin_token=self.admin_token.path, logs=logs, networks=self._networks,
                            fronts=self.front_ports, labels=self._labels(instance, "sidecar"),
                            endpoint=endpoint, handoff=handoff)

    def _app_spec(self, instance: ContainerInstance, sidecar_id: str) -> dict[str, Any]:
        assert self._images is not None
        return app_spec(self.config, instance, image=self._images.services[instance.service],
                        sidecar_id=sidecar_id, labels=self._labels(instance, "app"),
                        environment=self.app_environment(instance, OUTBOUND_PORT))

    def _create(self, slot: _Slot, role: str, spec: dict[str, Any]) -> str:
        import docker

        try:
            container = self.client().containers.create(**spec)
        except docker.errors.APIError as exc:
            label = slot.instance.label
            reason = exc.explanation or str(exc)
            if exc.status_code == 409:
                reason += (f" (a container named {spec['name']} exists and is not this run's: another "
                           f"mesh named '{self.config.name}'?)")
            raise StartFailed(label, f"cannot create its {role} container: {reason}") from None
        # Recorded here, on the thread: even a start cancelled meanwhile leaves it known.
        slot.ids[role] = container.id
        slot.instance.containers[role]["id"] = container.id
        return str(container.id)

    def _start(self, slot: _Slot, role: str, follow: Callable[[str], None],
               loop: asyncio.AbstractEventLoop) -> None:
        import docker

        container_id = slot.ids[role]
        follower = LogFollower(self.client(), container_id, follow, loop)
        try:
            self.client().api.start(container_id)
        except docker.errors.APIError as exc:
            raise StartFailed(slot.instance.label, f"cannot start its {role} container: "
                              f"{exc.explanation or exc}") from None
        self._followers.append(follower)
        follower.start()

    def _line(self, slot: _Slot, role: str, text: str) -> None:
        label = output_label(slot.instance, role)
        slot.tails.setdefault(role, collections.deque(maxlen=TAIL_LINES)).append(text)
        if role == "sidecar" and text.startswith(FIREWALL_MARKER):
            slot.firewall.set()
        self.output(label, text)

    async def start_instance(self, instance: Instance, registry: Path, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        await self._prepare()
        sidecar_timeout = max(timeout, SIDECAR_TIMEOUT)  # the app's `timeout` counts from its own start
        deadline = loop.time() + sidecar_timeout
        self._mark_starting(instance)  # maybe again (a restart)
        slot = self._slots[instance.label] = _Slot(_containers(instance))
        if "public" in instance.ports:
            self.public.offer(instance)
        sidecar_id = await self._call(self._create, slot, "sidecar", self._sidecar_spec(slot.instance, registry))
        # Connected before it starts: its published ports go out through this network.
        await self._call(self._connect, sidecar_id, self._networks[publishing_role(self.config, instance.service)].id)
        await self._call(self._start, slot, "sidecar", lambda t: self._line(slot, "sidecar", t), loop)
        # The app starts once the firewall is in (its port never open) and its sidecar is ready (for its calls).
        await self._until(slot, deadline, sidecar_timeout, lambda: slot.firewall.is_set(), "its firewall")
        await self._call(self._published, slot)
        await asyncio.gather(self._call(self._create, slot, "app", self._app_spec(slot.instance, sidecar_id)),
                             self._wait_ready(slot, deadline, sidecar_timeout, ("sidecar",)))
        if "public" in instance.ports:
            await self.public.hand_over(instance, app_ready=False)  # if no other sidecar serves it
        await self._call(self._start, slot, "app", lambda t: self._line(slot, "app", t), loop)
        await self._wait_ready(slot, loop.time() + timeout, timeout, ("app",))  # a job's: none (`wait_ready`)
        if "public" in instance.ports:
            await self.public.hand_over(instance, app_ready=True)
        self._mark_ready(instance)

    def _connect(self, container_id: str, network_id: str) -> None:
        self.client().api.connect_container_to_network(container_id, network_id)

    def _published(self, slot: _Slot) -> None:
        """Read the host port Docker chose for the admin listener, and the sidecar's ``mesh_ip``."""
        port, slot.instance.mesh_ip = published(self.client().api, slot.ids["sidecar"], self._networks["mesh"].name)
        if port is None:
            raise StartFailed(slot.instance.label, f"Docker did not publish its admin listener ({ADMIN_PORT}/tcp)")
        slot.instance.ports["admin"] = port

    def _states(self, slot: _Slot) -> dict[str, tuple[str, int]]:
        """(status, exit code) of each of the instance's containers; ("missing", -1) if gone."""
        import docker

        found = {}
        for role, container_id in dict(slot.ids).items():  # a copy: the app's may be made meanwhile
            try:
                state = self.client().api.inspect_container(container_id)["State"]
            except docker.errors.NotFound:
                found[role] = ("missing", -1)
                continue
            found[role] = (state.get("Status", "?"), int(state.get("ExitCode") or 0))
        return found

    async def _check_alive(self, slot: _Slot) -> None:
        for role, (status, code) in (await self._ask(self._states, slot)).items():
            if status in ("exited", "dead", "missing"):
                await asyncio.sleep(0.2)  # its last lines
                who = "the app" if role == "app" else "its sidecar"
                what = "was removed" if status == "missing" else f"exited with code {code}"
                raise StartFailed(slot.instance.label, f"{who} {what} before it was ready",
                                  self.tail(slot.instance, role))

    async def _until(self, slot: _Slot, deadline: float, timeout: float,
                     done: Callable[[], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        while not done():
            await self._check_alive(slot)
            if loop.time() >= deadline:
                raise StartFailed(slot.instance.label, f"not ready after {timeout:g}s: waited for {what}",
                                  self.tail(slot.instance, "sidecar"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await slot.firewall.wait()

    async def _wait_ready(self, slot: _Slot, deadline: float, timeout: float, parts: tuple[str, ...]) -> None:
        async def app_ready(wait: float) -> tuple[bool, str]:
            ready: tuple[bool, str] = await self._ask(self._probe, slot, slot.instance.health, wait)
            return ready

        await self.wait_ready(slot.instance, deadline, timeout, alive=lambda: self._check_alive(slot),
                              app_ready=app_ready, where=" in its container", pause=0.1, parts=parts)

    def _probe(self, slot: _Slot, path: str | None, wait: float) -> tuple[bool, str]:
        """Whether the app answers (200 on ``path``; a connection without one) within ``wait`` seconds,
        asked from inside its namespace by Python in the sidecar container; and what it said last."""
        import docker

        command = probe_command(slot.instance.ports["app"], path, wait)
        try:
            result = self.client().containers.get(slot.ids["sidecar"]).exec_run(command, user="65534:65534")
        except docker.errors.APIError as exc:
            return False, f"cannot run the check in its sidecar container: {exc.explanation or exc}"
        return result.exit_code == 0, result.output.decode(errors="replace").strip()

    async def check_health(self, instance: Instance, timeout: float) -> bool:
        """GET the health path on the app's port from inside its namespace (a ``docker exec``)."""
        if not instance.health:
            return True
        slot = self._slots.get(instance.label)
        if slot is None or "sidecar" not in slot.ids:
            return False
        # The exec itself takes ~0.1s on top of the request: allow for it.
        async with asyncio.timeout(timeout + 2):
            ok, _ = await self._ask(self._probe, slot, instance.health, timeout)
        return ok

    # watching

    async def _watch(self) -> None:
        """Once a second, what became of this run's containers: one that ended unasked is reported."""
        failing = False
        while True:
            await asyncio.sleep(1.0)
            try:
                alive = await self._ask(self._running_ids)
            except Exception as exc:  # noqa: BLE001 - the engine hiccups: try again next second
                if not failing:
                    log.warning("cannot list this mesh's containers: %s", exc)
                failing = True
                continue
            failing = False
            for label, slot in list(self._slots.items()):
                if label not in self._ready or label in self._stopping:
                    continue
                for role, container_id in list(slot.ids.items()):
                    if role in slot.exited or container_id in alive:
                        continue
                    states = await self._ask(self._states, slot)
                    status, code = states.get(role, ("missing", -1))
                    if status in ("running", "restarting", "paused", "created"):
                        continue
                    slot.exited[role] = code
                    await asyncio.sleep(0.2)  # its last lines
                    if label not in self._stopping:
                        self.on_exit(slot.instance, role, code)

    def _running_ids(self) -> set[str]:
        containers = self.client().api.containers(filters={"label": [
            f"{LABEL_STATE}={self.state_label}", f"{LABEL_RUN}={self.run_id}"], "status": "running"})
        return {c["Id"] for c in containers}

    def tail(self, instance: Instance, role: str) -> list[str]:
        slot = self._slots.get(instance.label)
        if slot is None:
            return []
        label = output_label(instance, role)
        return [f"{label} | {line}" for line in slot.tails.get(role, ())]

    def exit_code(self, instance: Instance, role: str) -> int | None:
        slot = self._slots.get(instance.label)
        return slot.exited.get(role) if slot is not None else None

    # stopping

    async def stop_role(self, instance: Instance, role: str) -> None:
        await self._settle()
        self._mark_stopping(instance)
        slot = self._slots.get(instance.label)
        if slot is not None:
            await self._call(self._stop, slot, role)
        if role == "sidecar":
            self.public.release(instance, self.config)

    def _stop(self, slot: _Slot, role: str) -> None:
        import docker

        api = self.client().api
        container_id = slot.ids.get(role)
        if container_id is not None:
            with contextlib.suppress(docker.errors.NotFound):
                api.stop(container_id, timeout=int(SIDECAR_GRACE if role == "sidecar" else APP_GRACE))
        slot.stopped.add(role)
        if {"sidecar", "app"} <= slot.stopped and not slot.removed:
            # The app first: it lives in the sidecar's namespace.
            for each in ("app", "sidecar"):
                if each in slot.ids:
                    with contextlib.suppress(docker.errors.NotFound):
                        api.remove_container(slot.ids[each], force=True, v=True)
            slot.removed = True

    async def kill_all(self) -> None:
        await self._settle()
        ids = [cid for slot in self._slots.values() for cid in slot.ids.values()]
        self._stopping.update(self._slots)
        await asyncio.gather(*(self._call(self._kill, cid) for cid in ids), return_exceptions=True)

    def _kill(self, container_id: str) -> None:
        import docker

        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            self.client().api.kill(container_id)

    async def close(self) -> None:
        """Remove what is left of this run (after every instance stopped): containers, then the networks."""
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self._settle()
        if self._client is not None:
            try:
                await self._call(self._remove_run)
            except Exception as exc:  # noqa: BLE001 - `mesh down` removes by label what is left
                log.warning("could not remove everything of this run: %s; `mesh down` will", exc)
        for follower in self._followers:
            follower.close()
        if self._client is not None:
            self._client.close()
        self.public.close()

    def _remove_run(self) -> None:
        import docker

        api = self.client().api
        left = api.containers(all=True, filters={"label": [f"{LABEL_STATE}={self.state_label}",
                                                          f"{LABEL_RUN}={self.run_id}"]})
        for container in sorted(left, key=lambda c: c["Labels"].get(LABEL_ROLE) != "app"):
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_container(container["Id"], force=True, v=True)
        for network in reversed(list(self._networks.values())):
            with contextlib.suppress(docker.errors.NotFound):
                api.remove_network(network.id)
        self._networks.clear()


def build_images(config: MeshConfig, say: Callable[[str], None] = print_line, *,
                 client: docker.DockerClient | None = None) -> images.BuiltImages:
    """What `mesh up --runtime docker` builds before it starts anything (`images.ensure_images`)."""
    say(f"mesh up: checking the images of '{config.name}' (building what is missing, as `mesh build` does)")
    return images.ensure_images(config, client or images.docker_client(), log=say)

