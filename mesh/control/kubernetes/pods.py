"""A service's pods on Kubernetes: the Deployment (or Job) and its autoscaler.

Each pod holds what an instance holds on the docker runtime. The sidecar is
a native sidecar container: an init container with ``restartPolicy: Always``
(Kubernetes 1.29+), so it starts, and is ready by its startup probe, before
the app; it stops after the app; and a Job completes when its app exits.
It runs ``mesh sidecar`` on ``mesh/base`` with, read-only and in its
container only, the mesh's files (`CONFIG_MOUNT`, also its working
directory), the registry (`REGISTRY_MOUNT`) and the service's certificate
(`TLS_MOUNT`); its access log goes to stderr, where ``kubectl logs`` reads
it, each line naming the pod. The app gets the environment every runtime
gives it (``MESH_INSTANCE``: the pod's name), ``cpus`` and ``memory`` as
limits, and no ``NET_RAW``.

Readiness is asked on the pod's loopback from the sidecar's container: the
sidecar's ``/readyz``, then the app's ``health`` path (or its port taking a
connection), with the probe the docker runtime runs; the app may listen on
loopback only and its image may have no Python.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import Any

from mesh.config import MeshConfig, ServiceConfig
from mesh.config.model import HealthCheck
from mesh.control.docker import images
from mesh.control.docker.containers import probe_command
from mesh.control.docker.layout import ADMIN_PORT, DEFAULT_APP_PORT, MESH_PORT, OUTBOUND_PORT, PUBLIC_PORT
from mesh.control.docker.resources import memory_bytes
from mesh.control.kubernetes.certificates import TLS_FILES, secret_name
from mesh.control.kubernetes.names import REGISTRY, is_job, labels, metadata, object_name, selector
from mesh.control.runtimes.base import instance_count

__all__ = ["CONFIG_MOUNT", "REGISTRY_MOUNT", "TLS_MOUNT", "PodOptions", "app_image", "autoscaled", "autoscaler",
           "workload"]

CONFIG_MOUNT = "/mesh/config"
REGISTRY_MOUNT = "/mesh/registry"
TLS_MOUNT = "/mesh/tls"


@dataclass(frozen=True)
class PodOptions:
    """What every pod of a mesh shares: the prefix of the images mesh builds, the ConfigMap's
    ``items`` (a file's key -> its path under `CONFIG_MOUNT`) and checksum."""

    image_prefix: str
    items: list[dict[str, str]]
    checksum: str


def app_image(config: MeshConfig, name: str, service: ServiceConfig, options: PodOptions) -> str:
    """``image`` as given, else what `mesh build` names the service's image, after the prefix."""
    if service.image:
        return service.image
    return options.image_prefix + images.service_image(config.name, name)


def autoscaled(service: ServiceConfig) -> bool:
    """Whether the service is a pool that may grow: it gets an `autoscaler`."""
    return not is_job(service) and service.scale is not None and service.scale.max > instance_count(service)


def workload(config: MeshConfig, name: str, service: ServiceConfig, options: PodOptions) -> dict[str, Any]:
    """A Deployment of ``replicas`` pods, or for a ``job`` a Job run once. A pool's Deployment
    leaves its replicas to its autoscaler (``scale.min`` to start), so applying it again
    does not undo the scaling."""
    template = {"metadata": {"labels": labels(config, name),
                             "annotations": {"kubectl.kubernetes.io/default-container": "app",
                                             "mesh.config-sha256": options.checksum}},
                "spec": _pod(config, name, service, options)}
    meta = metadata(config, object_name(config, name), name)
    if is_job(service):
        template["spec"]["restartPolicy"] = "Never"
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
                "spec": {"backoffLimit": 0, "template": template}}
    spec: dict[str, Any] = {"selector": {"matchLabels": selector(config, name)}, "template": template}
    if not autoscaled(service):
        spec = {"replicas": instance_count(service), **spec}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def autoscaler(config: MeshConfig, name: str, service: ServiceConfig) -> dict[str, Any]:
    """A pool's ``scale``: the app container's average CPU against ``cpu`` of a core (what the
    controller measures), between ``min`` and ``max`` pods; ``cooldown`` as the scale-down window."""
    assert service.scale is not None
    scale = service.scale
    target = {"type": "AverageValue", "averageValue": f"{round(scale.cpu * 1000)}m"}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": metadata(config, object_name(config, name), name),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": object_name(config, name)},
                     "minReplicas": instance_count(service), "maxReplicas": scale.max,
                     "metrics": [{"type": "ContainerResource",
                                  "containerResource": {"name": "cpu", "container": "app", "target": target}}],
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": math.ceil(scale.cooldown)}}}}


def _pod(config: MeshConfig, name: str, service: ServiceConfig, options: PodOptions) -> dict[str, Any]:
    return {
        "initContainers": [_sidecar(config, name, service, options)],
        "containers": [_app(config, name, service, options)],
        "volumes": [
            {"name": "mesh-config", "configMap": {"name": config.name, "items": options.items}},
            {"name": "mesh-registry", "configMap": {"name": config.name,
                                                    "items": [{"key": REGISTRY, "path": REGISTRY}]}},
            {"name": "mesh-tls", "secret": {"secretName": secret_name(config, name), "defaultMode": 0o440,
                                            "items": [{"key": key, "path": path} for key, path in TLS_FILES]}},
        ],
        # The app has no use for the Kubernetes API, nor for other Services' variables in its environment.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
    }


def _sidecar(config: MeshConfig, name: str, service: ServiceConfig, options: PodOptions) -> dict[str, Any]:
    port = service.port or DEFAULT_APP_PORT
    command = ["mesh", "sidecar", "--config", f"{CONFIG_MOUNT}/{config.path.name}", "--service", name,
               "--app-port", str(port), "--host", "0.0.0.0", "--mesh-port", str(MESH_PORT),
               "--outbound-port", str(OUTBOUND_PORT), "--admin-port", str(ADMIN_PORT),
               "--registry", f"{REGISTRY_MOUNT}/{REGISTRY}", "--tls", TLS_MOUNT,
               "--instance", "$(MESH_POD)", "--access-log", "-"]
    ports = [{"name": "mesh", "containerPort": MESH_PORT, "protocol": "TCP"}]
    if service.expose is not None and not is_job(service):
        command += ["--public-port", str(PUBLIC_PORT), "--public-host", "0.0.0.0"]
        ports.append({"name": "public", "containerPort": PUBLIC_PORT, "protocol": "TCP"})
    ready = probe_command(ADMIN_PORT, "/readyz", 1.0)
    return {
        "name": "sidecar",
        "image": options.image_prefix + images.base_tag(),
        "imagePullPolicy": "IfNotPresent",
        "restartPolicy": "Always",  # a native sidecar: up before the app, down after it
        "command": command,
        "workingDir": CONFIG_MOUNT,
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "MESH_POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "ports": ports,
        "startupProbe": {"exec": {"command": ready}, "periodSeconds": 1, "timeoutSeconds": 5,
                         "failureThreshold": 60},
        "readinessProbe": _readiness(service, port, ready),
        "volumeMounts": [
            {"name": "mesh-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
            {"name": "mesh-registry", "mountPath": REGISTRY_MOUNT, "readOnly": True},
            # SECURITY: the service's key, in the sidecar's container only; the app's mounts nothing.
            {"name": "mesh-tls", "mountPath": TLS_MOUNT, "readOnly": True},
        ],
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }


def _readiness(service: ServiceConfig, port: int, sidecar_ready: list[str]) -> dict[str, Any]:
    """The sidecar's ``/readyz`` and, but for a job, the app's health, every steady gap of
    ``health_check`` (10 x ``interval``, at most 10 s unless ``interval`` is longer)."""
    check = service.health_check or HealthCheck()
    command = sidecar_ready
    if not is_job(service):
        app_ready = probe_command(port, service.health, float(check.timeout))
        command = ["sh", "-c", f"{shlex.join(sidecar_ready)} && {shlex.join(app_ready)}"]
    interval = float(check.interval)
    gap = interval if interval > 10 else min(10.0, 10 * interval)
    return {"exec": {"command": command}, "periodSeconds": max(1, math.ceil(gap)),
            "timeoutSeconds": math.ceil(float(check.timeout)) + 3,
            "failureThreshold": check.unhealthy_threshold}


def _app(config: MeshConfig, name: str, service: ServiceConfig, options: PodOptions) -> dict[str, Any]:
    proxy = f"http://127.0.0.1:{OUTBOUND_PORT}"
    env = {key: str(value) for key, value in service.env.items()}
    env.update({"PORT": str(service.port or DEFAULT_APP_PORT), "HTTP_PROXY": proxy, "http_proxy": proxy,
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", "MESH_SERVICE": name})
    container: dict[str, Any] = {
        "name": "app",
        "image": app_image(config, name, service, options),
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": key, "value": value} for key, value in env.items()]
        + [{"name": "MESH_INSTANCE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        # SECURITY: it shares the sidecar's network namespace: no raw sockets in it.
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["NET_RAW"]}},
    }
    limits = {}
    if service.cpus is not None:
        limits["cpu"] = f"{round(service.cpus * 1000)}m"
    if service.memory is not None:
        size = memory_bytes(service.memory)
        limits["memory"] = f"{size >> 20}Mi" if size % (1 << 20) == 0 else str(size)
    if limits:
        container["resources"] = {"limits": limits}
    return container
