"""The Swarm service of one mesh service: what the engine is asked to run, and what mesh.toml it can run.

One Swarm service per mesh service, ``<mesh>_<service>``, with the service's
``replicas`` (a pool: its ``scale.min``) and:

- ``endpoint_mode = dnsrr``: no virtual IP (VIPs and the ingress routing mesh
  need IPVS in the kernel, which not every node has); the sidecars of the
  services with a route to it find its tasks through ``tasks.<mesh>_<service>``
  (`mesh.sidecar.dns_registry`), which lists only tasks that run and pass
  their health check;
- the service's own image, whose entrypoint becomes the task supervisor
  (`mesh.control.swarm.task`) with the image's entrypoint and command as the app;
- the ``NET_ADMIN`` capability for the task's firewall, which the supervisor
  keeps from every process it starts;
- the folder of mesh.toml as a Docker config (`bundle`), and the service's
  certificate, key and the mesh CA as Docker secrets readable only by the
  sidecar's user: never in the image, the environment or a command line;
- a health check run by the engine in the task (the sidecar's ``/readyz``, then
  the app's ``health`` path, or its port without one), so a task enters DNS once
  ready and an unhealthy one is replaced;
- for an exposed service, the public listener published in host mode on the
  ``expose`` port of each node running a task, at most one task per node.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.config import HealthCheck, MeshConfig, ServiceConfig
from mesh.control.docker.layout import (
    ADMIN_PORT,
    APP_GRACE,
    DEFAULT_APP_PORT,
    MESH_PORT,
    OUTBOUND_PORT,
    PUBLIC_PORT,
    SIDECAR_GRACE,
)
from mesh.control.docker.resources import inside, memory_bytes, plugin_path_problems, service_problems
from mesh.control.runtimes.base import instance_count
from mesh.control.swarm.firewall import task_rules
from mesh.control.swarm.layout import (
    BUNDLE,
    CONFIG_DIR,
    LABEL_VERSION,
    MESH_COMMAND,
    MESH_PYTHON,
    PROBE_GID,
    SIDECAR_UID,
    TLS_DIR,
    service_name,
)
from mesh.control.swarm.redis import redis_egress, redis_problems

__all__ = ["BUNDLE_LIMIT", "ServiceInputs", "bundle", "bundled_files", "callees", "config_problems", "digest",
           "service_spec", "sidecar_command"]

BUNDLE_LIMIT = 500 * 1024  # bytes: what a Docker config may hold
_NS = 1_000_000_000
_SKIP = {".mesh", "__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".venv", "node_modules"}


def config_problems(config: MeshConfig) -> list[str]:
    """What of mesh.toml the swarm runtime cannot run, one line each (empty: none)."""
    found = []
    for name, service in config.services.items():
        where = f"services.{name}"
        if not (service.build or service.image):
            found.append(f"{where}: no 'build' or 'image' to run on the swarm runtime (it has only 'command': "
                         f"add build = \"folder\" with a Dockerfile FROM mesh/base)")
        if service.instances is not None:
            found.append(f"{where}: keyed instances (instances = {{ key = ... }}) do not run on the swarm runtime: "
                         f"one task per key needs a front that creates tasks through the engine, which mesh "
                         f"does not do on swarm; use --runtime process or docker")
        if service.job:
            found.append(f"{where}: job = true does not run on the swarm runtime (a task's end and exit code, "
                         f"which depends_on waits for, are not reported from the swarm); use --runtime process "
                         f"or docker")
        found += service_problems(where, service, "task")
        swarm_name = service_name(config.name, name)
        if len(swarm_name) > 63:
            found.append(f"{where}: its Swarm service {swarm_name!r} is longer than 63 characters (a DNS "
                         f"label): use a shorter mesh or service name")
    found += redis_problems(config)
    return found + plugin_path_problems(config, "the swarm runtime gives tasks only the folder of mesh.toml")


# --- the folder of mesh.toml, as one Docker config -------------------------------------------------

def bundled_files(config: MeshConfig) -> Iterator[Path]:
    """The files of the folder of mesh.toml that tasks get: not its state folder, caches, nor the
    services' build folders (those are in the images), unless a plugin folder is inside one."""
    root = config.root.resolve()
    plugins = [folder.resolve() for folder in config.plugin_path]
    builds = {(root / s.build).resolve() for s in config.services.values() if s.build}
    builds = {b for b in builds if b != root and not any(inside(p, b) for p in plugins)}

    def walk(folder: Path) -> Iterator[Path]:
        for path in sorted(folder.iterdir()):
            if path.name in _SKIP or path.resolve() in builds or path.name.endswith((".pyc", ".pyo")):
                continue
            if path.is_symlink() and not inside(path, root):
                continue
            if path.is_dir():
                yield from walk(path)
            elif path.is_file():
                yield path

    yield from walk(root)


def bundle(config: MeshConfig) -> bytes:
    """The folder of mesh.toml as a gzipped tar, the same bytes for the same files (`bundled_files`).

    Raises ValueError when it is larger than a Docker config may be (`BUNDLE_LIMIT`).
    """
    root = config.root.resolve()
    raw = io.BytesIO()
    sizes = []
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in bundled_files(config):
            data = path.read_bytes()
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))
            sizes.append((len(data), info.name))
    packed = gzip.compress(raw.getvalue(), mtime=0)
    if len(packed) > BUNDLE_LIMIT:
        largest = ", ".join(f"{name} ({size // 1024} KiB)" for size, name in sorted(sizes, reverse=True)[:3])
        raise ValueError(f"the folder of mesh.toml is {len(packed) // 1024} KiB packed, more than a Docker "
                         f"config holds ({BUNDLE_LIMIT // 1024} KiB); the largest files: {largest}")
    return packed


def digest(*parts: bytes | str) -> str:
    hashed = hashlib.sha256()
    for part in parts:
        hashed.update(part.encode() if isinstance(part, str) else part)
        hashed.update(b"\0")
    return hashed.hexdigest()


# --- the service -------------------------------------------------------------------------------------

def callees(config: MeshConfig, name: str) -> list[str]:
    """The services that ``name``'s sidecar may call: itself and those its routes lead to (every
    service when the mesh's policy only audits)."""
    if config.mode == "audit":
        return list(config.services)
    allowed = {name} | {route.to for route in config.routes if route.source == name}
    return [other for other in config.services if other in allowed]


def sidecar_command(config: MeshConfig, name: str) -> list[str]:
    """`mesh sidecar` as a task runs it: the services it may call found through ``tasks.<...>`` DNS."""
    service = config.services[name]
    command = [MESH_COMMAND, "sidecar", "--config", f"{CONFIG_DIR}/{config.path.name}", "--service", name,
               "--app-port", str(service.port or DEFAULT_APP_PORT), "--host", "0.0.0.0",
               "--mesh-port", str(MESH_PORT), "--outbound-port", str(OUTBOUND_PORT),
               "--admin-port", str(ADMIN_PORT), "--tls", TLS_DIR]
    for other in callees(config, name):
        command += ["--registry-dns", f"{other}=tasks.{service_name(config.name, other)}:{MESH_PORT}"]
    if service.expose is not None:
        command += ["--public-port", str(PUBLIC_PORT), "--public-host", "0.0.0.0"]
    return command


# Run by the engine in the task as root:PROBE_GID (`python3 -I -S -c`): the sidecar ready, then the app.
_PROBE = r"""
import socket, sys
admin, port, path, wait = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def status(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        if path == "-":
            return "200"
        sock.settimeout(wait)
        sock.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % (path, port)).encode())
        line = sock.makefile("rb").readline(8192).decode("latin-1").split()
        return line[1] if len(line) > 1 else "no answer"
try:
    found = status(admin, "/readyz")
    if found != "200":
        sys.exit("the sidecar's /readyz answered %s" % found)
    found = status(port, path)
    if found != "200":
        sys.exit("GET %s on the app's port %d answered %s" % (path, port, found))
except OSError as exc:
    sys.exit("%s: %s" % (type(exc).__name__, exc))
"""


@dataclass
class ServiceInputs:
    """What one Swarm service is made of, besides mesh.toml: the engine's objects it refers to."""

    image: str                       # the service image's id (never pulled)
    image_config: dict[str, Any]     # its Config: Entrypoint, Cmd, User
    network: str                     # the overlay network's id
    subnet: str                      # and its IPv4 subnet
    bundle: tuple[str, str]          # the config holding the folder of mesh.toml: (id, name)
    tls: dict[str, tuple[str, str]]  # file (cert.pem, key.pem, ca.pem) -> its secret: (id, name)
    labels: dict[str, str]
    environment: dict[str, str]      # the app's (`Runtime.app_environment`)
    start_period: float              # seconds a task may take to become ready
    replicas: int | None = None      # the replica count now (a pool's changes); None: mesh.toml's
    version: str = ""                # the version (`mesh.config.version`) the bundle holds: a label of each task


def app_command(image_config: dict[str, Any]) -> list[str]:
    """What the image runs: its entrypoint, then its command."""
    return [*(image_config.get("Entrypoint") or []), *(image_config.get("Cmd") or [])]


def _health(service: ServiceConfig, start_period: float) -> Any:
    from docker.types import Healthcheck

    check = service.health_check or HealthCheck()
    wait = max(float(check.timeout), 1.0)
    test = ["CMD", MESH_PYTHON, "-I", "-S", "-c", _PROBE, str(ADMIN_PORT), str(service.port or DEFAULT_APP_PORT),
            service.health or "-", f"{wait:g}"]
    return Healthcheck(test=test, interval=int(max(float(check.interval), 1.0) * _NS),
                       timeout=int((2 * wait + 2) * _NS), retries=check.unhealthy_threshold,
                       start_period=int(start_period * _NS))


def service_spec(config: MeshConfig, name: str, inputs: ServiceInputs) -> dict[str, Any]:
    """The keyword arguments of ``APIClient.create_service`` (and ``update_service``) for mesh service ``name``."""
    from docker.types import (
        ConfigReference,
        ContainerSpec,
        DNSConfig,
        EndpointSpec,
        Placement,
        Resources,
        RestartPolicy,
        RollbackConfig,
        SecretReference,
        ServiceMode,
        TaskTemplate,
        UpdateConfig,
    )

    service = config.services[name]
    count = instance_count(service)
    single = count == 1 and (service.scale is None or service.scale.max <= 1)
    v4, v6 = task_rules(inputs.subnet, public=service.expose is not None,
                        redis=redis_egress(config, name, inputs.subnet))
    spec = {"service": name, "single": single, "user": inputs.image_config.get("User") or "",
            "sidecar": sidecar_command(config, name), "firewall": [v4, v6]}
    environment = {**inputs.environment, "MESH_INSTANCE": "{{.Task.Slot}}"}
    secrets = [SecretReference(secret_id, secret_name, filename=f"{Path(TLS_DIR).name}/{file}",
                               uid=str(SIDECAR_UID), gid=str(SIDECAR_UID), mode=0o400)
               for file, (secret_id, secret_name) in sorted(inputs.tls.items())]
    container = ContainerSpec(
        inputs.image,
        command=[MESH_PYTHON, "-m", "mesh.control.swarm.task"],
        args=[json.dumps(spec, separators=(",", ":")), "--", *app_command(inputs.image_config)],
        env=[f"{key}={value}" for key, value in sorted(environment.items())],
        user=f"0:{PROBE_GID}",
        labels={**inputs.labels, LABEL_VERSION: inputs.version} if inputs.version else inputs.labels,
        healthcheck=_health(service, inputs.start_period),
        stop_grace_period=int((SIDECAR_GRACE + APP_GRACE + 5) * _NS),
        secrets=secrets,
        configs=[ConfigReference(inputs.bundle[0], inputs.bundle[1], filename=BUNDLE, uid="0", gid="0",
                                 mode=0o400)],
        init=True,
        # A name the engine does not know goes on to the node's resolvers: when they do not answer, say so soon.
        dns_config=DNSConfig(options=["timeout:1", "attempts:1"]),
        cap_add=["NET_ADMIN"],  # for the firewall; the supervisor keeps it from the sidecar and the app
    )
    resources = None
    if service.cpus is not None or service.memory is not None:
        resources = Resources(cpu_limit=int(round(service.cpus * _NS)) if service.cpus is not None else None,
                              mem_limit=memory_bytes(service.memory) if service.memory is not None else None)
    exposed = service.expose is not None
    template = TaskTemplate(
        container, resources=resources,
        # As the controller does elsewhere: an app that ends with 0 is left ended, unless restart says otherwise.
        restart_policy=RestartPolicy(condition="on-failure" if service.restart_policy == "on-failure" else "none",
                                     delay=_NS, max_attempts=0),
        # Host-mode publishing: one task per node may hold the node's `expose` port.
        placement=Placement(maxreplicas=1) if exposed else None,
        networks=[inputs.network])
    ports = {service.expose: (PUBLIC_PORT, "tcp", "host")} if exposed else None
    return dict(
        task_template=template,
        name=service_name(config.name, name),
        labels=inputs.labels,
        mode=ServiceMode("replicated", replicas=count if inputs.replicas is None else inputs.replicas),
        # One task at a time; a new one first where it can (an exposed one cannot: its port is taken).
        # A task of the new spec that fails (or never passes its health check) rolls the service back.
        update_config=UpdateConfig(parallelism=1, order="stop-first" if exposed else "start-first",
                                   failure_action="rollback", monitor=2 * _NS),
        rollback_config=RollbackConfig(parallelism=1, order="stop-first" if exposed else "start-first",
                                       failure_action="pause", monitor=2 * _NS),
        endpoint_spec=EndpointSpec(mode="dnsrr", ports=ports),
    )
