"""Redis for a mesh on swarm: the shared store of ``ratelimit`` (a plugin whose ``storage`` is a Redis URL).

Where the URL points decides (`redis_storages`):

- the host `REDIS_HOST` (``redis://mesh-redis:6379/0``): `mesh up --runtime
  swarm` runs Redis as a Swarm service of the mesh, ``<mesh>_mesh-redis``, one
  task on the mesh's overlay network, found by that name (a network alias,
  ``dnsrr`` as every service of the mesh). Its image, ``mesh/redis:<os key>``,
  is Debian's ``redis-server`` package installed on ``mesh/base-os`` (the same
  Debian as the sidecars), built once, from the Debian mirror the base was
  made from (`redis_image`): no image registry is needed. Redis keeps its
  counters in memory only (no snapshot, no append-only file): they are rate
  windows, and a new task starts them afresh;
- any other host: a Redis of one's own, reached at that address from the tasks.

Either way each task's firewall lets the sidecar's user, and no other, out to
that port (`mesh.control.swarm.firewall`): an app cannot reach Redis, and the
Redis service itself is on the mesh's overlay only (not attachable, nothing
published), so only the mesh's sidecars reach it.

Everything here that asks the engine blocks; from asyncio, call it on a thread.
"""

from __future__ import annotations

import io
import ipaddress
import urllib.parse
from typing import TYPE_CHECKING, Any

from mesh.config import MeshConfig, PluginSpec
from mesh.control.docker.engine import ImageError, Log, find_image
from mesh.control.docker.images import BASE_OS_IMAGE
from mesh.control.docker.rootfs import LABEL_OS_KEY
from mesh.control.swarm.layout import service_name

if TYPE_CHECKING:
    import docker

__all__ = ["REDIS_HOST", "REDIS_IMAGE", "REDIS_PORT", "REDIS_SERVICE", "redis_egress", "redis_image",
           "redis_problems", "redis_spec", "redis_storages"]

REDIS_HOST = "mesh-redis"
REDIS_SERVICE = "mesh-redis"  # as a mesh service's name: ``<mesh>_mesh-redis``
REDIS_PORT = 6379
REDIS_IMAGE = "mesh/redis"
_SCHEMES = ("redis://", "rediss://", "redis+unix://")
_NS = 1_000_000_000

_DOCKERFILE = """\
FROM {base}
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/* \\
 && redis-server --version
USER redis
"""


def _specs(config: MeshConfig, only: str | None) -> list[tuple[str, PluginSpec]]:
    """(where, plugin) of the plugins the sidecars of service ``only`` (else every service) run: its
    chains, and those of the routes it calls by."""
    found = []
    for name, service in config.services.items():
        if only in (None, name):
            for spec in [*service.plugin_specs, *service.outbound_specs,
                         *(s for route in service.routes for s in route.plugin_specs)]:
                found.append((f"services.{name}", spec))
    for route in config.routes:
        if only in (None, route.source):
            found += [(f"the route {route.source} -> {route.to}", spec) for spec in route.plugin_specs]
    return found


def redis_storages(config: MeshConfig, only: str | None = None) -> list[tuple[str, str]]:
    """(where, URL) of every plugin whose ``storage`` is a Redis URL (of service ``only``'s sidecars)."""
    return [(where, spec.options["storage"]) for where, spec in _specs(config, only)
            if isinstance(spec.options.get("storage"), str) and spec.options["storage"].startswith(_SCHEMES)]


def redis_problems(config: MeshConfig) -> list[str]:
    """What of the mesh's Redis storages the swarm runtime cannot give its tasks."""
    found = []
    for where, url in redis_storages(config):
        if url.startswith("redis+unix://"):
            found.append(f"{where}: storage {url!r} is a unix socket, which tasks on swarm do not share; use "
                         f"redis://{REDIS_HOST}:{REDIS_PORT}/0 (a Redis the mesh runs) or a redis:// address")
            continue
        parts = urllib.parse.urlsplit(url)
        if parts.hostname == REDIS_HOST and (parts.port or REDIS_PORT) != REDIS_PORT:
            found.append(f"{where}: the Redis the mesh runs ({REDIS_HOST}) listens on {REDIS_PORT}, "
                         f"not {parts.port}")
    if redis_wanted(config) and REDIS_SERVICE in config.services:
        found.append(f"services.{REDIS_SERVICE}: the name of the Redis the swarm runtime runs for "
                     f"{REDIS_HOST}: give the service another name")
    return found


def redis_wanted(config: MeshConfig) -> bool:
    """Whether a storage names `REDIS_HOST`: the mesh runs Redis."""
    return any(urllib.parse.urlsplit(url).hostname == REDIS_HOST for _, url in redis_storages(config))


def redis_egress(config: MeshConfig, name: str, overlay: str) -> list[tuple[str | None, int]]:
    """Where service ``name``'s sidecars go for Redis, as (destination, port): the ``overlay`` subnet
    for the mesh's own, an IP address as given, None (anywhere) for a host name of one's own."""
    found: set[tuple[str | None, int]] = set()
    for _, url in redis_storages(config, name):
        parts = urllib.parse.urlsplit(url)
        if url.startswith("redis+unix://") or not parts.hostname:
            continue
        if parts.hostname == REDIS_HOST:
            found.add((overlay, REDIS_PORT))
            continue
        try:
            host: str | None = str(ipaddress.ip_address(parts.hostname))
        except ValueError:
            host = None
        found.add((host, parts.port or REDIS_PORT))
    return sorted(found, key=lambda item: (item[0] or "", item[1]))


def redis_image(client: docker.DockerClient, base: str, log: Log) -> str:
    """``mesh/redis:<os key>`` (`REDIS_IMAGE`) on the mesh/base-os that ``base`` (mesh/base's id) is
    built on: found, or built now (apt-get, on the host's network). Raises `ImageError`."""
    import docker

    key = client.images.get(base).labels.get(LABEL_OS_KEY)
    if not key:
        raise ImageError(f"mesh/base ({base[7:19]}) does not say which {BASE_OS_IMAGE} it is built on")
    tag = f"{REDIS_IMAGE}:{key}"
    found = find_image(client, tag)
    if found is not None:
        return str(found.id)
    log(f"mesh up: building {tag} (Debian's redis-server on {BASE_OS_IMAGE}:{key}, from the Debian mirror)")
    try:
        image, _ = client.images.build(fileobj=io.BytesIO(_DOCKERFILE.format(base=f"{BASE_OS_IMAGE}:{key}").encode()),
                                       tag=tag, rm=True, forcerm=True, pull=False, network_mode="host",
                                       labels={LABEL_OS_KEY: key})
    except (docker.errors.BuildError, docker.errors.APIError) as exc:
        said = getattr(exc, "msg", None) or getattr(exc, "explanation", None) or exc
        raise ImageError(f"building {tag} failed: {said} (it needs the Debian mirror; or give ratelimit the "
                         f"address of a Redis of your own)") from None
    return str(image.id)


def redis_spec(config: MeshConfig, image: str, network: str, labels: dict[str, str]) -> dict[str, Any]:
    """The keyword arguments of ``APIClient.create_service`` for the mesh's Redis."""
    from docker.types import (
        ContainerSpec,
        EndpointSpec,
        Healthcheck,
        NetworkAttachmentConfig,
        RestartPolicy,
        ServiceMode,
        TaskTemplate,
    )

    command = ["redis-server", "--port", str(REDIS_PORT), "--bind", "0.0.0.0", "--protected-mode", "no",
               "--save", "", "--appendonly", "no"]
    health = Healthcheck(test=["CMD", "redis-cli", "-p", str(REDIS_PORT), "ping"], interval=_NS, timeout=3 * _NS,
                         retries=3, start_period=30 * _NS)
    container = ContainerSpec(image, command=command, labels=labels, healthcheck=health,
                              stop_grace_period=5 * _NS, init=True)
    template = TaskTemplate(container, restart_policy=RestartPolicy(condition="any", delay=_NS),
                            networks=[NetworkAttachmentConfig(network, aliases=[REDIS_HOST])])
    return dict(task_template=template, name=service_name(config.name, REDIS_SERVICE), labels=labels,
                mode=ServiceMode("replicated", replicas=1), endpoint_spec=EndpointSpec(mode="dnsrr"))
