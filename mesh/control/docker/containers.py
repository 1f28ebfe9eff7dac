"""An instance's two containers on the docker runtime: what they are and how they are made.

The sidecar container mounts, read-only: the folder of mesh.toml at
``/mesh/config`` (plugins, files that options name; its ``.mesh`` state folder
hidden under an empty tmpfs, since it holds the mesh CA key), the instance's
certificate folder at ``/mesh/tls``, registry.json at ``/mesh/registry.json``
and the run's admin token (`mesh.sidecar.admin`) at ``/mesh/admin.token``; when
exposed, the folder where the controller hands it its service's public socket
(`mesh.control.runtimes.public`; a socket of the host's 127.0.0.1, so no port is
published for it) at `HANDOFF_MOUNT`; and, read-write, the mesh's logs folder
(`mesh.control.logs`) at `LOGS_MOUNT`, where it writes its access log
``<label>.jsonl``. Its entrypoint installs the namespace's
firewall (`mesh.control.docker.firewall`). The app container joins the sidecar's
network namespace and mounts none of these (it can neither read nor change its
sidecar's logs); it gets the app's environment (`mesh.control.runtimes.base.Runtime.app_environment`),
the service's ``cpus`` and ``memory`` as limits, and no ``NET_RAW`` (no raw
sockets in the namespace it shares); when ``[[egress]]`` entries name its
service, no ``SETUID``/``SETGID`` either and ``no-new-privileges``, so it cannot
become the sidecar's uid, which its firewall lets out. A keyed instance's app container (and
never its sidecar's) mounts its key's named volume at ``instances.volume``
(`mesh.control.docker.volumes`).

The app's health is checked from inside the namespace, by a short ``docker
exec`` of Python in the sidecar container (`probe_command`), so the app's port
is never published anywhere. A container's output is followed on a thread of
its own (`LogFollower`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from mesh.config import MeshConfig
from mesh.control.docker.firewall import ENTRYPOINT, firewall_rules
from mesh.control.docker.layout import (
    ADMIN_PORT,
    ADMIN_TOKEN_MOUNT,
    CONFIG_MOUNT,
    HANDOFF_MOUNT,
    MESH_PORT,
    OUTBOUND_PORT,
    REGISTRY_MOUNT,
    TLS_MOUNT,
)
from mesh.control.docker.networks import Network, calls_out, engine_resolvers, publishing_role
from mesh.control.docker.resources import memory_bytes, plugin_path_problems, service_problems
from mesh.control.docker.volumes import volume_mount
from mesh.control.runtimes.base import Instance

if TYPE_CHECKING:
    import docker

LOGS_MOUNT = "/mesh/logs"  # the sidecar's access log, <label>.jsonl, and its rotated files

__all__ = [
    "LOGS_MOUNT", "Container", "ContainerInstance", "LogFollower", "app_spec", "config_problems", "cpu_seconds",
    "probe_command", "published", "sidecar_spec",
]


class Container(TypedDict):
    """One of an instance's containers, as state.json shows it: its name, and its id once created."""

    name: str
    id: str | None


@dataclass
class ContainerInstance(Instance):
    """An `Instance` whose mesh listener is on the mesh network, by its alias there (`mesh_alias`).

    ``ports``: ``app`` and ``outbound`` inside the instance's namespace, ``mesh``
    on the mesh network, ``admin`` on the host's 127.0.0.1 (0 until published),
    and ``public`` (exposed) the service's ``expose`` there, which every instance
    serves. ``containers``: role -> its container's ``name`` and ``id`` (None
    until created); ``mesh_ip``: its IP on the mesh network once started.
    """

    containers: dict[str, Container] = field(default_factory=dict)
    mesh_ip: str | None = None

    def state_fields(self) -> dict[str, Any]:
        return {**super().state_fields(), "containers": self.containers}

    def addresses(self) -> dict[str, str]:
        found = {"app": f"127.0.0.1:{self.ports['app']}", "mesh": self.mesh_address,
                 "outbound": f"127.0.0.1:{self.ports['outbound']}"}
        if self.ports.get("admin"):
            found["admin"] = f"127.0.0.1:{self.ports['admin']}"
        return found



# Run with `python3 -I -S -c` in the sidecar container (it shares the app's loopback):
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


def probe_command(port: int, path: str | None, wait: float) -> list[str]:
    """What asks the app, from inside its namespace, for 200 on ``path`` (without one, a connection)
    on ``port`` for up to ``wait`` seconds: exit code 0 if it answered, else what it said last."""
    return ["python3", "-I", "-S", "-c", _PROBE, str(port), path or "-", f"{wait:.3f}"]


def published(api: Any, sidecar_id: str, mesh_network: str) -> tuple[int | None, str | None]:
    """The host port Docker published the sidecar container's admin listener on (None if it did not),
    and the container's IP on ``mesh_network`` (None if it has none yet)."""
    attrs = api.inspect_container(sidecar_id)
    bindings = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    found = bindings.get(f"{ADMIN_PORT}/tcp") or []
    return (int(found[0]["HostPort"]) if found else None), (networks.get(mesh_network) or {}).get("IPAddress") or None


def cpu_seconds(api: Any, container_id: str) -> float | None:
    """The container's ``cpu_stats.cpu_usage.total_usage`` from the engine, in seconds."""
    try:
        stats = api.stats(container_id, stream=False, one_shot=True)
    except TypeError:  # an SDK without one_shot: the engine waits for a second sample
        stats = api.stats(container_id, stream=False)
    usage = stats.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage")
    return usage / 1e9 if usage else None


def config_problems(config: MeshConfig) -> list[str]:
    """What of mesh.toml the containers cannot hold, one line each (empty: none)."""
    found = []
    for name, service in config.services.items():
        where = f"services.{name}"
        if not (service.build or service.image):
            found.append(f"{where}: no 'build' or 'image' to run on the docker runtime (it has only "
                         f"'command': use --runtime process, or add build = \"folder\" with a Dockerfile)")
        found += service_problems(where, service, "instance")
        for role, fixed in (("mesh", MESH_PORT), ("outbound", OUTBOUND_PORT)):
            if role in service.pinned_ports():
                found.append(f"{where}.sidecar.{role}_port: on the docker runtime the sidecar's {role} listener "
                             f"is always on {fixed} in its instance (a fixed address already); only admin_port, "
                             f"published on the host, can be pinned")
    return found + plugin_path_problems(config, "the docker runtime mounts only the folder of mesh.toml "
                                                "into sidecars")


def sidecar_spec(config: MeshConfig, instance: ContainerInstance, *, image: str, registry: Path,
                 admin_token: Path, logs: Path, networks: dict[str, Network], fronts: Sequence[int],
                 labels: dict[str, str], endpoint: Any, handoff: Path | None = None) -> dict[str, Any]:
    """The arguments of ``containers.create`` for an instance's sidecar container: the firewall
    first (``fronts``: the keyed services' ports on the mesh gateway), then ``mesh sidecar``; on
    the mesh network, where ``endpoint`` (the engine's endpoint config) gives it ``instance.host``.
    ``logs``: the host's folder of access logs, mounted read-write at `LOGS_MOUNT`; ``handoff``:
    the host's folder where its public socket is offered (``public.sock``), mounted at `HANDOFF_MOUNT`."""
    from docker.types import Mount

    egress = calls_out(config, instance.service)  # then on the egress network instead of the edge one
    mesh, edge = networks["mesh"], networks[publishing_role(config, instance.service)]
    v4, v6 = firewall_rules(mesh.subnet, mesh.gateway, edge.gateway, fronts=fronts,
                            egress=egress, resolvers=engine_resolvers() if egress else ())
    command = ["mesh", "sidecar", "--config", f"{CONFIG_MOUNT}/{config.path.name}",
               "--service", instance.service, "--app-port", str(instance.ports["app"]),
               "--host", "0.0.0.0", "--mesh-port", str(MESH_PORT),
               "--outbound-port", str(OUTBOUND_PORT), "--admin-port", str(ADMIN_PORT),
               "--registry", REGISTRY_MOUNT, "--admin-token-file", ADMIN_TOKEN_MOUNT,
               "--instance", instance.label, "--access-log", f"{LOGS_MOUNT}/{instance.label}.jsonl"]
    # The admin listener on a free port of the host's 127.0.0.1, or on the one its service pins.
    pinned = config.services[instance.service].pinned_ports().get("admin")
    ports: dict[str, Any] = {f"{ADMIN_PORT}/tcp": ("127.0.0.1", pinned)}
    mounts = [Mount(CONFIG_MOUNT, str(config.root.resolve()), type="bind", read_only=True),
              Mount(REGISTRY_MOUNT, str(registry.resolve()), type="bind", read_only=True),
              # SECURITY: the sidecar's container only; the app's mounts nothing of the state folder.
              Mount(ADMIN_TOKEN_MOUNT, str(admin_token.resolve()), type="bind", read_only=True),
              # SECURITY: read-write for the sidecar only; the app must not read or rewrite its logs.
              Mount(LOGS_MOUNT, str(logs.resolve()), type="bind", read_only=False)]
    if instance.tls is not None:
        command += ["--tls", TLS_MOUNT]
        mounts.append(Mount(TLS_MOUNT, str(instance.tls.resolve()), type="bind", read_only=True))
    if handoff is not None:  # SECURITY: this sidecar's container only; never the app's
        command += ["--public-handoff", f"{HANDOFF_MOUNT}/public.sock"]
        mounts.append(Mount(HANDOFF_MOUNT, str(handoff.resolve()), type="bind", read_only=True))
    return dict(
        image=image,
        entrypoint=["sh", "-c", ENTRYPOINT, "mesh-firewall"],
        command=command,
        name=instance.containers["sidecar"]["name"],
        labels=labels,
        environment={"MESH_FIREWALL": v4, "MESH_FIREWALL6": v6, "PYTHONUNBUFFERED": "1"},
        network=mesh.id,
        networking_config={mesh.id: endpoint},
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


def app_spec(config: MeshConfig, instance: ContainerInstance, *, image: str, sidecar_id: str,
             labels: dict[str, str], environment: dict[str, str]) -> dict[str, Any]:
    """The arguments of ``containers.create`` for an instance's app container, in the network
    namespace of its sidecar's (``sidecar_id``), with the service's limits and its key's volume."""
    service = config.services[instance.service]
    spec: dict[str, Any] = dict(
        image=image,
        name=instance.containers["app"]["name"],
        labels=labels,
        environment=environment,
        network_mode=f"container:{sidecar_id}",
        # SECURITY: it shares the sidecar's namespace: no raw sockets to read the controller's
        # admin requests off the edge interface or to forge packets past the firewall.
        cap_drop=["NET_RAW"],
        init=True,
        detach=True,
    )
    if calls_out(config, instance.service):
        # SECURITY: its firewall lets the sidecar's uid out: the app can neither switch to it nor
        # gain it from a setuid file.
        spec["cap_drop"] += ["SETUID", "SETGID"]
        spec["security_opt"] = ["no-new-privileges"]
    if service.cpus is not None:
        spec["nano_cpus"] = int(round(service.cpus * 1e9))
    if service.memory is not None:
        spec["mem_limit"] = memory_bytes(service.memory)
    volume = volume_mount(config, instance, labels)
    if volume is not None:  # SECURITY: this key's volume only, in its app's container only
        spec["mounts"] = [volume]
    return spec


class LogFollower(threading.Thread):
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
