"""The two Docker networks of a docker-runtime mesh, made by its first instance to start.

- ``mesh-<name>`` (``internal``): sidecars reach each other here, by an alias
  each has on this network only (``<service>-<index>.<name>:15001`` is an
  instance's address in the registry). Nothing on it reaches outside.
- ``mesh-<name>-edge``: Docker publishes ports only from a network that is not
  internal, so every sidecar is attached here too, only so that its admin
  listener (an ephemeral port) and, when exposed, its public listener
  (``expose``) are published on the host's 127.0.0.1. Containers on it cannot
  reach each other (``enable_icc=false``) nor, un-masqueraded, the outside; the
  namespace firewall (`mesh.control.docker.firewall`) refuses new connections
  out of it anyway.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mesh.control.docker.layout import network_names
from mesh.control.runtimes.base import StartFailed

if TYPE_CHECKING:
    import docker

__all__ = ["Network", "create_networks"]

_SETTINGS: dict[str, dict[str, Any]] = {
    "mesh": {"internal": True},
    "edge": {"options": {"com.docker.network.bridge.enable_icc": "false",
                         "com.docker.network.bridge.enable_ip_masquerade": "false"}},
}


@dataclass
class Network:
    """One of a mesh's two networks (``mesh``, ``edge``): its id, name, IPv4 subnet and gateway."""

    id: str
    name: str
    subnet: str
    gateway: str


def create_networks(client: docker.DockerClient, mesh: str, labels: Callable[[str], dict[str, str]],
                    made: dict[str, Network]) -> None:
    """Create the networks of the mesh called ``mesh``, each with ``labels(role)``, into ``made`` by
    role (``mesh``, ``edge``) as each is made: when one cannot be (`StartFailed` says why), the
    ones before it are known, to remove."""
    import docker

    for role, name in network_names(mesh).items():
        try:
            network = client.networks.create(name, driver="bridge", check_duplicate=True,
                                             labels=labels(role), **_SETTINGS[role])
        except docker.errors.APIError as exc:
            raise StartFailed(name, f"cannot create the Docker network {name}: "
                              f"{exc.explanation or exc} (a network of that name that is not this "
                              f"mesh's: another mesh named '{mesh}'? `docker network "
                              f"inspect {name}` shows whose)") from None
        network.reload()
        ipam = (network.attrs.get("IPAM") or {}).get("Config") or [{}]
        subnet = ipam[0].get("Subnet")
        if not subnet:
            raise StartFailed(name, f"the Docker network {name} has no IPv4 subnet")
        gateway = ipam[0].get("Gateway") or str(next(ipaddress.ip_network(subnet).hosts()))
        made[role] = Network(network.id, name, subnet, gateway.split("/")[0])
