"""The Docker networks of a docker-runtime mesh, made by its first instance to start.

- ``mesh-<name>`` (``internal``): sidecars reach each other here, by an alias
  each has on this network only (``<service>-<index>.<name>:15001`` is an
  instance's address in the registry). Nothing on it reaches outside.
- ``mesh-<name>-edge``: Docker publishes ports only from a network that is not
  internal, so every sidecar is attached here too, only so that its admin
  listener (an ephemeral port, or the one its service pins) is published on the
  host's 127.0.0.1. Containers on it cannot
  reach each other (``enable_icc=false``) nor, un-masqueraded, the outside; the
  namespace firewall (`mesh.control.docker.firewall`) refuses new connections
  out of it anyway.
- ``mesh-<name>-egress``, only when ``[[egress]]`` entries name a service
  (`calls_out`): its instances are attached here instead of to the edge
  network, which publishes their listeners the same way and, with Docker's
  defaults (NAT, containers on it reach each other), is their route out. Their
  firewall lets only the sidecar's uid out of it (`mesh.control.docker.firewall`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.control.docker.layout import egress_network_name, network_names
from mesh.control.runtimes.base import StartFailed

if TYPE_CHECKING:
    import docker

    from mesh.config import MeshConfig

__all__ = ["Network", "calls_out", "create_networks", "engine_resolvers", "network_roles", "publishing_role"]

_SETTINGS: dict[str, dict[str, Any]] = {
    "mesh": {"internal": True},
    "edge": {"options": {"com.docker.network.bridge.enable_icc": "false",
                         "com.docker.network.bridge.enable_ip_masquerade": "false"}},
    "egress": {},
}


def calls_out(config: MeshConfig, service: str) -> bool:
    """Whether an ``[[egress]]`` entry names ``service``: its instances get the egress network, and a
    firewall that lets their sidecar (only) out of it."""
    return any(entry.source == service for entry in config.egress)


def network_roles(config: MeshConfig) -> list[str]:
    """The networks the mesh needs: ``mesh`` and ``edge``, and ``egress`` when `calls_out` holds for a service."""
    return ["mesh", "edge"] + (["egress"] if any(calls_out(config, name) for name in config.services) else [])


def publishing_role(config: MeshConfig, service: str) -> str:
    """The network that publishes the listeners of ``service``'s instances: ``egress`` or ``edge``."""
    return "egress" if calls_out(config, service) else "edge"


@dataclass
class Network:
    """One of a mesh's networks (``mesh``, ``edge``, ``egress``): its id, name, IPv4 subnet and gateway."""

    id: str
    name: str
    subnet: str
    gateway: str


def create_networks(client: docker.DockerClient, mesh: str, labels: Callable[[str], dict[str, str]],
                    made: dict[str, Network], roles: Sequence[str] = ("mesh", "edge")) -> None:
    """Create the networks ``roles`` (``mesh``, ``edge``, ``egress``) of the mesh called ``mesh`` that
    ``made`` lacks, each with ``labels(role)``, into ``made`` by role as each is made: when one cannot
    be (`StartFailed` says why), the ones before it are known, to remove."""
    import docker

    names = {**network_names(mesh), "egress": egress_network_name(mesh)}
    for role in roles:
        if role in made:
            continue
        name = names[role]
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


def engine_resolvers() -> list[str]:
    """The IPv4 name servers a local engine's embedded DNS forwards to, picked as Docker picks them:
    the machine's ``/etc/resolv.conf`` (systemd-resolved's upstream file when it names only
    127.0.0.53), without loopback addresses; Google's two when none is left."""
    found = _name_servers("/etc/resolv.conf")
    if found == ["127.0.0.53"]:
        found = _name_servers("/run/systemd/resolve/resolv.conf") or found
    kept = []
    for text in found:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if address.version == 4 and not address.is_loopback:
            kept.append(str(address))
    return kept or ["8.8.8.8", "8.8.4.4"]


def _name_servers(path: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [parts[1] for parts in map(str.split, text.splitlines()) if len(parts) > 1 and parts[0] == "nameserver"]
