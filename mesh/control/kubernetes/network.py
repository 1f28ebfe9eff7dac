"""How a service is reached on Kubernetes: its Services and its NetworkPolicy.

The headless Service (``clusterIP: None``) is what the registry names: its
DNS name answers with the addresses of the service's ready pods, so each new
connection a sidecar opens goes to one of them, never through a virtual IP.
An exposed service also gets a ClusterIP Service ``<mesh>-<service>-public``
on its ``expose`` port, to the public listener: what an Ingress, a
LoadBalancer or ``kubectl port-forward`` takes.

The NetworkPolicy lets in only the sidecar's listeners, as the docker
runtime's firewall does: the mesh listener from the pods of the services
that have a route here (from every pod of the mesh while such a route, or
the mesh, is in audit mode), the public listener from anywhere when the
service is exposed, and nothing else, the app's port least of all. The
admin listener is on the pod's loopback, out of reach anyway.
"""

from __future__ import annotations

from typing import Any

from mesh.config import MeshConfig, ServiceConfig
from mesh.control.docker.layout import MESH_PORT, PUBLIC_PORT
from mesh.control.kubernetes.names import LABEL_MESH, LABEL_SERVICE, is_job, metadata, object_name, selector

__all__ = ["PUBLIC_SUFFIX", "callers", "network_policy", "services"]

PUBLIC_SUFFIX = "-public"


def services(config: MeshConfig, name: str, service: ServiceConfig) -> list[dict[str, Any]]:
    """The headless Service and, when exposed, the public one."""
    docs = [{"apiVersion": "v1", "kind": "Service", "metadata": metadata(config, object_name(config, name), name),
             "spec": {"clusterIP": "None", "selector": selector(config, name),
                      "ports": [{"name": "mesh", "port": MESH_PORT, "targetPort": "mesh"}]}}]
    if service.expose is not None:
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": metadata(config, object_name(config, name) + PUBLIC_SUFFIX, name),
                     "spec": {"type": "ClusterIP", "selector": selector(config, name),
                              "ports": [{"name": "public", "port": service.expose, "targetPort": "public"}]}})
    return docs


def callers(config: MeshConfig, name: str) -> list[str] | None:
    """The services with a route to ``name``; None (any service of the mesh) while they are audited."""
    routes = [route for route in config.routes if route.to == name]
    if config.mode == "audit" or any(route.mode == "audit" for route in routes):
        return None
    return sorted({route.source for route in routes})


def network_policy(config: MeshConfig, name: str, service: ServiceConfig) -> dict[str, Any]:
    """Ingress to the service's pods: the sidecar's mesh listener from its callers, its public
    listener when exposed; nothing else. Egress is not restricted (docs/kubernetes.md says why)."""
    rules: list[dict[str, Any]] = []
    allowed = callers(config, name)
    if allowed is None or allowed:
        peers: dict[str, Any] = {"matchLabels": {LABEL_MESH: config.name}}
        if allowed:
            peers["matchExpressions"] = [{"key": LABEL_SERVICE, "operator": "In", "values": allowed}]
        rules.append({"from": [{"podSelector": peers}], "ports": [{"protocol": "TCP", "port": MESH_PORT}]})
    if service.expose is not None and not is_job(service):
        rules.append({"ports": [{"protocol": "TCP", "port": PUBLIC_PORT}]})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": metadata(config, object_name(config, name), name),
            "spec": {"podSelector": {"matchLabels": selector(config, name)}, "policyTypes": ["Ingress"],
                     "ingress": rules}}
