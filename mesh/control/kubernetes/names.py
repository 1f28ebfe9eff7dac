"""Names and labels of the Kubernetes objects of a mesh.

A service's objects are named ``<mesh>-<service>`` (its public Service
``<mesh>-<service>-public``, its certificate's Secret ``<mesh>-<service>-tls``),
the mesh's own after the mesh (the ConfigMap, the CA's Issuer and Certificate).
Every object carries ``mesh.mesh`` and, a service's, ``mesh.service``: the
labels of the docker and swarm runtimes, valid Kubernetes keys as they are
(no prefix; a name part may hold dots); and the recommended
``app.kubernetes.io/part-of``, ``/name`` and ``/managed-by``.
"""

from __future__ import annotations

from typing import Any

from mesh.config import MeshConfig, ServiceConfig
from mesh.control.docker.layout import LABEL_MESH, LABEL_SERVICE

__all__ = ["LABEL_MESH", "LABEL_SERVICE", "REGISTRY", "is_job", "labels", "metadata", "object_name", "selector"]

REGISTRY = "registry.json"  # its key in the ConfigMap, its file name in the sidecar's container


def object_name(config: MeshConfig, service: str) -> str:
    return f"{config.name}-{service}"


def is_job(service: ServiceConfig) -> bool:
    """``job = true``: the service runs to completion without listening (a Job, not a Deployment)."""
    return bool(getattr(service, "job", False))


def labels(config: MeshConfig, service: str | None = None) -> dict[str, str]:
    found = {LABEL_MESH: config.name}
    if service is not None:
        found[LABEL_SERVICE] = service
        found["app.kubernetes.io/name"] = service
    found.update({"app.kubernetes.io/part-of": config.name, "app.kubernetes.io/managed-by": "mesh"})
    return found


def selector(config: MeshConfig, service: str) -> dict[str, str]:
    """What picks a service's pods: its mesh and service labels."""
    return {LABEL_MESH: config.name, LABEL_SERVICE: service}


def metadata(config: MeshConfig, name: str, service: str | None = None) -> dict[str, Any]:
    return {"name": name, "labels": labels(config, service)}
