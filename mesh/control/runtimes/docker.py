"""The docker runtime: each instance is a sidecar container and an app container in one network namespace.

::

    host 127.0.0.1:<expose> ──┐ (published)      network mesh-<name> (internal)
    host 127.0.0.1:<admin> ───┤                  ┌──────────────────────────────────┐
                              ▼                  │  other sidecars ──▶ :15001 (mTLS) │
    ┌ network namespace of the sidecar container ┴──────────────────────────────────┤
    │  sidecar: mesh :15001 (0.0.0.0)   public :15080 (0.0.0.0, when exposed)        │
    │           outbound 127.0.0.1:15002   admin 127.0.0.1:15000                     │
    │  app container (network_mode=container:<sidecar>): listens on its `port`       │
    │  firewall (iptables, installed before the sidecar runs, with NET_ADMIN that   │
    │  the sidecar process then drops): from outside the namespace only the mesh    │
    │  listener (from the mesh network), the public listener and the admin listener │
    │  (both from the host, through their published ports) take connections; the   │
    │  app's port and everything else answer with a reset. Inside, nothing (the     │
    │  app included) may connect to the admin port. Out of the namespace only       │
    │  other sidecars' mesh listeners.                                              │
    └────────────────────────────────────────────────────────────────────────────────┘

Per mesh, two networks, both labelled and made by the first instance to start:

- ``mesh-<name>`` (``internal``): sidecars reach each other here, by an alias
  each has on this network only (``<service>-<index>.<name>:15001`` is an
  instance's address in the registry). Nothing on it reaches outside.
- ``mesh-<name>-edge``: Docker publishes ports only from a network that is not
  internal, so every sidecar is attached here too, only so that its admin
  listener (an ephemeral port) and, when exposed, its public listener
  (``expose``) are published on the host's 127.0.0.1. Containers on it cannot
  reach each other (``enable_icc=false``) nor, un-masqueraded, the outside; the
  namespace firewall refuses new connections out of it anyway.

Keyed services (`mesh.control.keyed`): the controller runs each one's front on the
mesh network's gateway IP (the host's side of the bridge; `front_host` makes
the networks before any instance starts), the registry lists it there, and the
firewall lets sidecars out to the gateway on the fronts' ports only
(`allow_front`); the front reaches a key's instance at its IP on the mesh
network (`reach`), which the mesh listener takes since the gateway is in the subnet.

The admin listener stays on the namespace's loopback; the firewall forwards
(DNAT) what arrives from the edge network's gateway (the host's side of the
published port) to it, which needs ``route_localnet`` in the namespace; packets
that claim a loopback destination from outside are dropped first (the
CVE-2020-8558 rule). The app's health is checked from inside the namespace, by
a short ``docker exec`` of Python in the sidecar container, so the app's port is
never published anywhere.

The sidecar container mounts, read-only: the folder of mesh.toml at
``/mesh/config`` (plugins, files that options name; its ``.mesh`` state folder
hidden under an empty tmpfs, since it holds the mesh CA key), the instance's
certificate folder at ``/mesh/tls``, registry.json at ``/mesh/registry.json``
and the run's admin token (`mesh.sidecar.admin`) at ``/mesh/admin.token``.
The app container mounts none of these; it gets ``PORT``, ``HTTP_PROXY``/``NO_PROXY``,
``MESH_SERVICE``, ``MESH_INSTANCE`` and the service's ``env``, the service's
``cpus`` and ``memory`` as limits, and no ``NET_RAW`` (no raw sockets in the
namespace it shares).

Every container and network carries labels (`LABEL_MESH`, `LABEL_STATE`: the
state folder of the mesh, `LABEL_RUN`, `LABEL_SERVICE`, `LABEL_INSTANCE`,
`LABEL_ROLE`), so `mesh ps` (`refresh_status`) and `mesh down` (`sweep`) find
them without the controller, after a crash too, and touch nothing else.
Images carry ``mesh.mesh`` too, and containers inherit image labels, so a
container is this mesh's only with this mesh's `LABEL_STATE` and a `LABEL_ROLE`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import re
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.config import MeshConfig
from mesh.control.docker import images
from mesh.control.runtimes.base import (
    TAIL_LINES,
    Instance,
    OnExit,
    Output,
    Runtime,
    StartFailed,
    instance_label,
)
from mesh.sidecar import admin

if TYPE_CHECKING:
    import docker

__all__ = [
    "ADMIN_PORT", "DockerRuntime", "MESH_PORT", "OUTBOUND_PORT", "PUBLIC_PORT", "build_images",
    "container_name", "firewall_rules", "memory_bytes", "mesh_alias", "network_names", "refresh_status",
    "sweep",
]

log = logging.getLogger("mesh.docker")

# Where the sidecar listens inside an instance; the app may use any other port.
ADMIN_PORT = 15000
MESH_PORT = 15001
OUTBOUND_PORT = 15002
PUBLIC_PORT = 15080
SIDECAR_PORTS = (ADMIN_PORT, MESH_PORT, OUTBOUND_PORT, PUBLIC_PORT)
DEFAULT_APP_PORT = 8000

CONFIG_MOUNT = "/mesh/config"
TLS_MOUNT = "/mesh/tls"
REGISTRY_MOUNT = "/mesh/registry.json"
ADMIN_TOKEN_MOUNT = "/mesh/admin.token"

LABEL_MESH = images.LABEL_MESH      # mesh.mesh: the mesh's name
LABEL_STATE = "mesh.state"          # the mesh's state folder: which mesh.toml's mesh this is
LABEL_RUN = "mesh.run"              # the `mesh up` run that made it
LABEL_SERVICE = images.LABEL_SERVICE
LABEL_INSTANCE = "mesh.instance"    # the instance's number
LABEL_ROLE = "mesh.role"            # sidecar | app (containers), mesh | edge (networks)
LABEL_KEY = "mesh.key"              # a keyed instance's label (`keyed.key_label`: a hash, never the key)

SIDECAR_GRACE = 15.0  # a sidecar drains requests in flight for up to 10s
APP_GRACE = 5.0

FIREWALL_MARKER = "mesh-firewall: installed"

# The sidecar container's entrypoint: the firewall first, then the sidecar without NET_ADMIN.
# iptables-restore --noflush: Docker's embedded DNS keeps its own nat rules in the namespace.
_ENTRYPOINT = r"""set -e
restore() {  # restore FAMILY RULES: the nf_tables backend, else the legacy one
  printf '%s' "$2" | "$1-restore" --noflush 2>/tmp/mesh-firewall.err \
    || printf '%s' "$2" | "$1-legacy-restore" --noflush \
    || { cat /tmp/mesh-firewall.err >&2; echo "mesh-firewall: $1 refused the rules" >&2; exit 70; }
}
restore iptables "$MESH_FIREWALL"
if [ "$(cat /proc/sys/net/ipv6/conf/all/disable_ipv6 2>/dev/null || echo 1)" = 0 ]; then
  restore ip6tables "$MESH_FIREWALL6"
fi
echo "mesh-firewall: installed; from outside this instance only the sidecar's listeners answer" >&2
exec setpriv --inh-caps=-net_admin --bounding-set=-net_admin -- "$@"
"""

# Run with `python3 -I -S -c` in the sidecar container (it shares the app's loopback):
# argv: port, health path ("-": a TCP connect is enough), seconds to keep trying.
_PROBE = r"""
import socket, sys, time
port, path, wait = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + wait
last = "nothing answered"
while True:
    try:
        left = max(0.2, min(2.0, deadline - time.monotonic()))
        with socket.create_connection(("127.0.0.1", port), timeout=left) as sock:
            if path == "-":
                sys.exit(0)
            sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                          % (path, port)).encode())
            line = sock.makefile("rb").readline(8192).decode("latin-1").strip()
            if line.split()[1:2] == ["200"]:
                sys.exit(0)
            last = "GET %s answered %r" % (path, line)
    except OSError as exc:
        last = "%s: %s" % (type(exc).__name__, exc)
    if time.monotonic() >= deadline:
        print(last)
        sys.exit(1)
    time.sleep(0.1)
"""


# --- names, limits, rules: pure helpers -----------------------------------------------------------

def container_name(mesh: str, service: str, index: int, role: str = "sidecar") -> str:
    """``mesh-<mesh>-<service>-<index>`` for a sidecar (also its name on the mesh network),
    with ``-app`` for its app. The index ends in digits, so no two instances share a name."""
    base = f"mesh-{mesh}-{service}-{index}"
    return base if role == "sidecar" else f"{base}-{role}"


def mesh_alias(mesh: str, service: str, index: int) -> str:
    """An instance's name on the mesh network only (``<service>-<index>.<mesh>``), its host in the registry.

    Not the container's name: that one resolves on the edge network too, to an
    address the namespace firewall rightly refuses to call.
    """
    return f"{service}-{index}.{mesh}"


def network_names(mesh: str) -> dict[str, str]:
    """The two networks of a mesh: ``mesh`` (internal, between sidecars) and ``edge`` (publishing)."""
    return {"mesh": f"mesh-{mesh}", "edge": f"mesh-{mesh}-edge"}


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
MIN_MEMORY = 6 << 20  # Docker refuses less


def memory_bytes(text: str | int) -> int:
    """``"512m"``, ``"512MB"``, ``"512MiB"``, ``"1.5g"`` or a number of bytes, in bytes (binary units,
    as Docker counts them). Raises ValueError saying what it expected."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _MEMORY.match(str(text))
        if not match:
            raise ValueError(f"expected a size like '256m', '1g' or '512MiB', found {text!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value < MIN_MEMORY:
        raise ValueError(f"expected at least 6m (Docker's minimum), found {text!r}")
    return value


def firewall_rules(mesh_subnet: str, mesh_gateway: str, edge_gateway: str, *,
                   public: bool, fronts: Sequence[int] = ()) -> tuple[str, str]:
    """The iptables-restore input (IPv4, IPv6) installed in an instance's network namespace.

    In: loopback; replies; the mesh listener from the mesh network; the admin
    listener and (``public``) the public listener from the edge gateway, that is
    through their ports published on the host. Everything else is refused, the
    app's port first of all. Out: loopback, replies, other sidecars' mesh
    listeners and, on the mesh network's gateway (the host's side of it), only
    the ``fronts`` ports: the keyed services' fronts, which the controller runs
    there. Nothing inside reaches the admin port: it is the controller's, from
    the host, and the app shares this namespace. IPv6 (when the namespace has
    it at all): loopback (but the admin port) and replies only.
    """
    admin = f"{ADMIN_PORT}"
    v4 = [
        "*raw",
        # SECURITY: route_localnet is on (for the admin DNAT below), so a packet from another
        # container addressed to 127.0.0.1 would otherwise reach loopback-only listeners.
        "-A PREROUTING ! -i lo -d 127.0.0.0/8 -j DROP",
        "COMMIT",
        "*nat",
        f"-A PREROUTING -s {edge_gateway}/32 -p tcp --dport {admin} "
        f"-j DNAT --to-destination 127.0.0.1:{admin}",
        "COMMIT",
        "*filter",
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A INPUT -d 127.0.0.1/32 -p tcp --dport {admin} -m conntrack --ctstate DNAT -j ACCEPT",
        f"-A INPUT -s {mesh_subnet} -p tcp --dport {MESH_PORT} -j ACCEPT",
    ]
    if public:
        v4.append(f"-A INPUT -s {edge_gateway}/32 -p tcp --dport {PUBLIC_PORT} -j ACCEPT")
    v4 += [
        # SECURITY: the app's port (and any other) is refused, however the app binds.
        "-A INPUT -p tcp -j REJECT --reject-with tcp-reset",
        "-A INPUT -j DROP",
        # SECURITY: nothing in the namespace (the app, whatever its uid) opens a connection to the
        # admin port; the controller's come in from the edge gateway (DNAT above), not from here.
        f"-A OUTPUT -o lo -p tcp --dport {admin} -j REJECT --reject-with tcp-reset",
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        *(f"-A OUTPUT -d {mesh_gateway}/32 -p tcp --dport {int(port)} -j ACCEPT" for port in fronts),
        f"-A OUTPUT -d {mesh_gateway}/32 -j REJECT",
        f"-A OUTPUT -d {mesh_subnet} -p tcp --dport {MESH_PORT} -j ACCEPT",
        "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset",
        "-A OUTPUT -j REJECT",
        "COMMIT",
    ]
    v6 = [
        "*filter",
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A INPUT -p ipv6-icmp -j ACCEPT",
        "-A INPUT -j DROP",
        f"-A OUTPUT -o lo -p tcp --dport {admin} -j REJECT --reject-with tcp-reset",
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A OUTPUT -p ipv6-icmp -j ACCEPT",
        "-A OUTPUT -j REJECT",
        "COMMIT",
    ]
    return "\n".join(v4) + "\n", "\n".join(v6) + "\n"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


# --- the runtime ----------------------------------------------------------------------------------

@dataclass
class ContainerInstance(Instance):
    """An `Instance` whose mesh listener is on the mesh network, by its alias there (`mesh_alias`).

    ``ports``: ``app`` and ``outbound`` inside the instance's namespace, ``mesh``
    on the mesh network, ``admin`` and ``public`` on the host's 127.0.0.1 (0 until
    published). ``containers``: role -> its container's ``name`` and ``id`` (None until
    created); ``mesh_ip``: its IP on the mesh network once started.
    """

    containers: dict[str, dict[str, Any]] = field(default_factory=dict)
    mesh_ip: str | None = None

    def state_fields(self) -> dict[str, Any]:
        return {**super().state_fields(), "containers": self.containers}

    def addresses(self) -> dict[str, str]:
        found = {"app": f"127.0.0.1:{self.ports['app']}", "mesh": self.mesh_address,
                 "outbound": f"127.0.0.1:{self.ports['outbound']}"}
        if self.ports.get("admin"):
            found["admin"] = f"127.0.0.1:{self.ports['admin']}"
        return found


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


@dataclass
class _Network:
    id: str
    name: str
    subnet: str
    gateway: str


class _LogFollower(threading.Thread):
    """Follows one container's output on a thread of its own (a stream blocks until the container ends)."""

    def __init__(self, client: docker.DockerClient, container_id: str,
                 on_line: Callable[[str], None], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(name=f"mesh-logs-{container_id[:12]}", daemon=True)
        self.client = client
        self.container_id = container_id
        self.on_line = on_line
        self.loop = loop
        self.stream: Any = None
        self.closed = False

    def run(self) -> None:
        pending = b""
        try:
            self.stream = self.client.api.logs(self.container_id, stream=True, follow=True,
                                               stdout=True, stderr=True)
            if self.closed:
                return
            for chunk in self.stream:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._emit(line)
        except Exception:  # noqa: BLE001 - the container went away, or the engine did: output ends
            pass
        finally:
            if pending:
                self._emit(pending)

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            self.loop.call_soon_threadsafe(self.on_line, text)

    def close(self) -> None:
        self.closed = True
        stream = self.stream
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()


class DockerRuntime(Runtime):
    """Instances as a sidecar container plus an app container sharing its network namespace.

    See the module docstring for the networks, the firewall and the mounts.
    The first instance of an exposed service publishes on 127.0.0.1:``expose``;
    the others on ephemeral ports of 127.0.0.1.
    """

    name = "docker"

    def __init__(self, config: MeshConfig, *, output: Output, on_exit: OnExit, run_id: str = "",
                 admin_token: admin.AdminToken | None = None) -> None:
        super().__init__(config, output=output, on_exit=on_exit, run_id=run_id, admin_token=admin_token)
        self.state_label = str(config.state_dir.resolve())
        self._client: docker.DockerClient | None = None
        self._images: images.BuiltImages | None = None
        self._networks: dict[str, _Network] = {}
        self._prepared: asyncio.Lock | None = None
        self._slots: dict[str, _Slot] = {}
        self._ready: set[str] = set()
        self._stopping: set[str] = set()
        self._pending: set[asyncio.Future[Any]] = set()
        self._followers: list[_LogFollower] = []
        self._watcher: asyncio.Future[None] | None = None
        self._closed = False
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
        found = []
        for name, service in self.config.services.items():
            where = f"services.{name}"
            if not (service.build or service.image):
                found.append(f"{where}: no 'build' or 'image' to run on the docker runtime (it has only "
                             f"'command': use --runtime process, or add build = \"folder\" with a Dockerfile)")
            port = service.port or DEFAULT_APP_PORT
            if port in SIDECAR_PORTS:
                found.append(f"{where}.port: {port} is the sidecar's inside the instance (it uses "
                             f"{', '.join(map(str, SIDECAR_PORTS))}); give the app another port")
            if service.memory is not None:
                try:
                    memory_bytes(service.memory)
                except ValueError as exc:
                    found.append(f"{where}.memory: {exc}")
            if service.cpus is not None and service.cpus <= 0:
                found.append(f"{where}.cpus: expected more than 0, found {service.cpus:g}")
        for folder in self.config.plugin_path:
            if not _inside(folder, self.config.root):
                found.append(f"mesh.plugin_path: {folder} is outside {self.config.root}; the docker "
                             f"runtime mounts only the folder of mesh.toml into sidecars")
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
            self._images = build_images(self.config, _say, client=client)
        except (images.ImageError, images.DockerUnavailable) as exc:
            raise StartFailed("images", str(exc)) from None
        # This controller holds the mesh's lock: anything of this mesh still in the engine was left by
        # one that died (and holds its `expose` ports, which `plan` is about to check).
        removed = _remove_owned(client, self.config.name, self.state_label, grace=False)
        if any(removed):
            _say(f"mesh up: removed {removed[0]} containers and {removed[1]} networks an earlier "
                 f"`mesh up` of '{self.config.name}' left behind")

    # planning

    def plan_one(self, service: str, index: int) -> Instance:
        """One more instance of a pool (autoscaling); like `plan`, its ports are published when it starts."""
        config = self.config.services[service]
        ports = {"app": config.port or DEFAULT_APP_PORT, "mesh": MESH_PORT, "outbound": OUTBOUND_PORT, "admin": 0}
        if config.expose is not None:
            ports["public"] = 0
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
        container = _containers(instance).containers.get("app", {}).get("id")
        if not container:
            return None
        api = self.client().api
        try:
            stats = api.stats(container, stream=False, one_shot=True)
        except TypeError:  # an SDK without one_shot: the engine waits for a second sample
            stats = api.stats(container, stream=False)
        usage = stats.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage")
        return usage / 1e9 if usage else None

    def reach(self, instance: Instance) -> tuple[str, int]:
        """Where the host reaches a started instance's mesh listener: its IP on the mesh network
        (its alias resolves only inside the network)."""
        ip = _containers(instance).mesh_ip
        if not ip:
            raise StartFailed(instance.label, "its IP on the mesh network is not known")
        return str(ip), MESH_PORT

    # blocking engine calls, on threads; tracked, so a cancelled start leaves nothing unknown

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return await asyncio.shield(future)

    async def _ask(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A blocking call that creates nothing (a probe, a listing): not waited for by `_settle`."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _settle(self) -> None:
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # starting

    async def _prepare(self) -> None:
        """Images and networks, once per run (the first start does it; the others wait)."""
        if self._prepared is None:
            self._prepared = asyncio.Lock()
        async with self._prepared:
            if self._images is None:
                await self._call(self._build)
            if not self._networks:
                await self._call(self._make_networks)
                if self._watcher is None:
                    self._watcher = asyncio.ensure_future(self._watch())

    def _make_networks(self) -> None:
        import docker

        client = self.client()
        names = network_names(self.config.name)
        settings: dict[str, dict[str, Any]] = {
            "mesh": {"internal": True},
            "edge": {"options": {"com.docker.network.bridge.enable_icc": "false",
                                 "com.docker.network.bridge.enable_ip_masquerade": "false"}},
        }
        for role, name in names.items():
            try:
                network = client.networks.create(name, driver="bridge", check_duplicate=True,
                                                 labels=self._labels(role=role), **settings[role])
            except docker.errors.APIError as exc:
                raise StartFailed(name, f"cannot create the Docker network {name}: "
                                  f"{exc.explanation or exc} (a network of that name that is not this "
                                  f"mesh's: another mesh named '{self.config.name}'? `docker network "
                                  f"inspect {name}` shows whose)") from None
            network.reload()
            ipam = (network.attrs.get("IPAM") or {}).get("Config") or [{}]
            subnet = ipam[0].get("Subnet")
            if not subnet:
                raise StartFailed(name, f"the Docker network {name} has no IPv4 subnet")
            gateway = ipam[0].get("Gateway") or str(next(ipaddress.ip_network(subnet).hosts()))
            self._networks[role] = _Network(network.id, name, subnet, gateway.split("/")[0])

    def _sidecar_spec(self, instance: ContainerInstance, registry: Path) -> dict[str, Any]:
        from docker.types import Mount

        assert self._images is not None
        mesh, edge = self._networks["mesh"], self._networks["edge"]
        public = "public" in instance.ports
        v4, v6 = firewall_rules(mesh.subnet, mesh.gateway, edge.gateway, public=public,
                                fronts=self.front_ports)
        command = ["mesh", "sidecar", "--config", f"{CONFIG_MOUNT}/{self.config.path.name}",
                   "--service", instance.service, "--app-port", str(instance.ports["app"]),
                   "--host", "0.0.0.0", "--mesh-port", str(MESH_PORT),
                   "--outbound-port", str(OUTBOUND_PORT), "--admin-port", str(ADMIN_PORT),
                   "--registry", REGISTRY_MOUNT, "--admin-token-file", ADMIN_TOKEN_MOUNT]
        ports: dict[str, Any] = {f"{ADMIN_PORT}/tcp": ("127.0.0.1", None)}
        if public:
            command += ["--public-port", str(PUBLIC_PORT), "--public-host", "0.0.0.0"]
            ports[f"{PUBLIC_PORT}/tcp"] = ("127.0.0.1", instance.ports["public"] or None)
        mounts = [Mount(CONFIG_MOUNT, str(self.config.root.resolve()), type="bind", read_only=True),
                  Mount(REGISTRY_MOUNT, str(registry.resolve()), type="bind", read_only=True),
                  # SECURITY: the sidecar's container only; the app's mounts nothing of the state folder.
                  Mount(ADMIN_TOKEN_MOUNT, str(self.admin_token.path.resolve()), type="bind", read_only=True)]
        if instance.tls is not None:
            command += ["--tls", TLS_MOUNT]
            mounts.append(Mount(TLS_MOUNT, str(instance.tls.resolve()), type="bind", read_only=True))
        return dict(
            image=self._images.base,
            entrypoint=["sh", "-c", _ENTRYPOINT, "mesh-firewall"],
            command=command,
            name=instance.containers["sidecar"]["name"],
            labels=self._labels(instance, "sidecar"),
            environment={"MESH_FIREWALL": v4, "MESH_FIREWALL6": v6, "PYTHONUNBUFFERED": "1"},
            network=mesh.id,
            networking_config={mesh.id: self.client().api.create_endpoint_config(aliases=[instance.host])},
            ports=ports,
            mounts=mounts,
            # SECURITY: the state folder (the mesh CA's key, every sidecar's key) is under the
            # mounted folder of mesh.toml: hide it.
            tmpfs={f"{CONFIG_MOUNT}/.mesh": "ro,size=4k"},
            working_dir=CONFIG_MOUNT,
            cap_add=["NET_ADMIN"],  # for the firewall; the entrypoint drops it before the sidecar runs
            sysctls={"net.ipv4.conf.all.route_localnet": "1"},
            security_opt=["no-new-privileges"],
            init=True,
            detach=True,
        )

    def _app_spec(self, instance: ContainerInstance, sidecar_id: str) -> dict[str, Any]:
        assert self._images is not None
        service = self.config.services[instance.service]
        env = self.app_environment(instance, OUTBOUND_PORT)
        spec: dict[str, Any] = dict(
            image=self._images.services[instance.service],
            name=instance.containers["app"]["name"],
            labels=self._labels(instance, "app"),
            environment=env,
            network_mode=f"container:{sidecar_id}",
            # SECURITY: it shares the sidecar's namespace: no raw sockets to read the controller's
            # admin requests off the edge interface or to forge packets past the firewall.
            cap_drop=["NET_RAW"],
            init=True,
            detach=True,
        )
        if service.cpus is not None:
            spec["nano_cpus"] = int(round(service.cpus * 1e9))
        if service.memory is not None:
            spec["mem_limit"] = memory_bytes(service.memory)
        return spec

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
        follower = _LogFollower(self.client(), container_id, follow, loop)
        try:
            self.client().api.start(container_id)
        except docker.errors.APIError as exc:
            raise StartFailed(slot.instance.label, f"cannot start its {role} container: "
                              f"{exc.explanation or exc}") from None
        self._followers.append(follower)
        follower.start()

    def _line(self, slot: _Slot, role: str, text: str) -> None:
        label = slot.instance.label if role == "app" else f"{slot.instance.label}.{role}"
        slot.tails.setdefault(role, collections.deque(maxlen=TAIL_LINES)).append(text)
        if role == "sidecar" and text.startswith(FIREWALL_MARKER):
            slot.firewall.set()
        self.output(label, text)

    async def start_instance(self, instance: Instance, registry: Path, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        await self._prepare()
        deadline = loop.time() + timeout
        self._stopping.discard(instance.label)  # started again (a restart)
        slot = self._slots[instance.label] = _Slot(_containers(instance))
        sidecar_id = await self._call(self._create, slot, "sidecar", self._sidecar_spec(slot.instance, registry))
        # Connected before it starts: its published ports go out through this network.
        await self._call(self._connect, sidecar_id, self._networks["edge"].id)
        await self._call(self._start, slot, "sidecar", lambda t: self._line(slot, "sidecar", t), loop)
        # The app starts only once the firewall is in: never a moment with its port open.
        await self._until(slot, deadline, timeout, lambda: slot.firewall.is_set(), "its firewall")
        await self._call(self._published, slot)
        await self._call(self._create, slot, "app", self._app_spec(slot.instance, sidecar_id))
        await self._call(self._start, slot, "app", lambda t: self._line(slot, "app", t), loop)
        await self._wait_ready(slot, deadline, timeout)
        self._ready.add(instance.label)

    def _connect(self, container_id: str, network_id: str) -> None:
        self.client().api.connect_container_to_network(container_id, network_id)

    def _published(self, slot: _Slot) -> None:
        """Read the host ports Docker chose for the admin (and public) listener, and the sidecar's IP
        on the mesh network (``mesh_ip``)."""
        attrs = self.client().api.inspect_container(slot.ids["sidecar"])
        bindings = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
        networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
        mesh = networks.get(self._networks["mesh"].name) or {}
        slot.instance.mesh_ip = mesh.get("IPAddress") or None
        for role, port in (("admin", ADMIN_PORT), ("public", PUBLIC_PORT)):
            if role in slot.instance.ports:
                found = bindings.get(f"{port}/tcp") or []
                if not found:
                    raise StartFailed(slot.instance.label, f"Docker did not publish its {role} "
                                      f"listener ({port}/tcp)")
                slot.instance.ports[role] = int(found[0]["HostPort"])

    def _states(self, slot: _Slot) -> dict[str, tuple[str, int]]:
        """(status, exit code) of each of the instance's containers; ("missing", -1) if gone."""
        import docker

        found = {}
        for role, container_id in slot.ids.items():
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

    async def _wait_ready(self, slot: _Slot, deadline: float, timeout: float) -> None:
        async def app_ready(wait: float) -> tuple[bool, str]:
            ready: tuple[bool, str] = await self._ask(self._probe, slot, slot.instance.health, wait)
            return ready

        await self.wait_ready(slot.instance, deadline, timeout, alive=lambda: self._check_alive(slot),
                              app_ready=app_ready, where=" in its container", pause=0.1)

    def _probe(self, slot: _Slot, path: str | None, wait: float) -> tuple[bool, str]:
        """Whether the app answers (200 on ``path``; a connection without one) within ``wait`` seconds,
        asked from inside its namespace by Python in the sidecar container; and what it said last."""
        import docker

        command = ["python3", "-I", "-S", "-c", _PROBE, str(slot.instance.ports["app"]), path or "-",
                   f"{wait:.3f}"]
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
        label = instance.label if role == "app" else f"{instance.label}.{role}"
        return [f"{label} | {line}" for line in slot.tails.get(role, ())]

    def exit_code(self, instance: Instance, role: str) -> int | None:
        slot = self._slots.get(instance.label)
        return slot.exited.get(role) if slot is not None else None

    def instance_state(self, instance: Instance) -> str:
        slot = self._slots.get(instance.label)
        if instance.label in self._stopping or (slot is not None and slot.exited):
            return "stopped"
        return "running" if instance.label in self._ready else "starting"

    # stopping

    async def stop_role(self, instance: Instance, role: str) -> None:
        await self._settle()
        self._stopping.add(instance.label)
        self._ready.discard(instance.label)
        slot = self._slots.get(instance.label)
        if slot is None:
            return
        await self._call(self._stop, slot, role)

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


# --- without a controller: `mesh build` before detaching, `mesh ps`, `mesh down` ------------------

def _say(line: str) -> None:
    print(line, flush=True)


def build_images(config: MeshConfig, say: Callable[[str], None] = _say, *,
                 client: docker.DockerClient | None = None) -> images.BuiltImages:
    """What `mesh up --runtime docker` builds before it starts anything (`images.ensure_images`)."""
    say(f"mesh up: checking the images of '{config.name}' (building what is missing, as `mesh build` does)")
    return images.ensure_images(config, client or images.docker_client(), log=say)


def _owned(client: docker.DockerClient, mesh: str, state: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(containers, networks) of the mesh whose state folder is ``state``: its labels, and a role."""
    where = {"label": [f"{LABEL_MESH}={mesh}", f"{LABEL_STATE}={state}"]}
    containers = [c for c in client.api.containers(all=True, filters=where)
                  if (c.get("Labels") or {}).get(LABEL_ROLE) in ("sidecar", "app")]
    networks = [n for n in client.api.networks(filters=where)
                if (n.get("Labels") or {}).get(LABEL_ROLE) in ("mesh", "edge")]
    return containers, networks


def _remove_owned(client: docker.DockerClient, mesh: str, state: str, *, grace: bool) -> tuple[int, int]:
    """Stop (sidecars first, with ``grace``) and remove the mesh's containers, then its networks."""
    import docker

    containers, networks = _owned(client, mesh, state)
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


def sweep(config: MeshConfig, say: Callable[[str], None] = _say) -> tuple[int, int] | None:
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
        removed = _remove_owned(client, config.name, str(config.state_dir.resolve()), grace=True)
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
