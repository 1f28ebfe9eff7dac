"""The firewall of a swarm task's network namespace: the app is reachable only through its sidecar.

A Swarm task is one container, so its app and its sidecar share one network
namespace, as on the docker runtime; the task's supervisor
(`mesh.control.swarm.task`) installs these rules (iptables, with the
``NET_ADMIN`` capability the service adds to the task and no process after it
keeps) before the sidecar or the app runs. From outside the namespace only the
mesh listener (from the mesh's overlay network) and, for an exposed service,
the public listener (its port published on the node, in host mode) take
connections; the app's port and everything else answer with a reset. Inside,
only the group `PROBE_GID` (the engine's health checks, ``docker exec``; never
the app nor the sidecar) may connect to the admin port. Out of the namespace:
only other sidecars' mesh listeners on the overlay network, the engine's DNS on
loopback (``tasks.<service>``) and, for the sidecar's user alone, the Redis its
plugins count in (`mesh.control.swarm.redis`).
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.control.docker.layout import ADMIN_PORT, MESH_PORT, PUBLIC_PORT
from mesh.control.swarm.layout import PROBE_GID, SIDECAR_UID

__all__ = ["FIREWALL_MARKER", "task_rules"]

FIREWALL_MARKER = "mesh-firewall: installed"


def task_rules(overlay_subnet: str, *, public: bool,
               redis: Sequence[tuple[str | None, int]] = ()) -> tuple[str, str]:
    """The iptables-restore input (IPv4, IPv6) installed in each task of a service (see the module
    docstring); ``redis``: (destination, None for any, and port) the sidecar's user may reach too."""
    admin = (f"-A OUTPUT -o lo -p tcp --dport {ADMIN_PORT} -m owner ! --gid-owner {PROBE_GID} "
             f"-j REJECT --reject-with tcp-reset")
    v4 = [
        "*filter",
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A INPUT -s {overlay_subnet} -p tcp --dport {MESH_PORT} -j ACCEPT",
    ]
    if public:
        # Published in host mode: the engine forwards the node's port to the task from any address.
        v4.append(f"-A INPUT -p tcp --dport {PUBLIC_PORT} -j ACCEPT")
    v4 += [
        # SECURITY: the app's port (and any other) is refused, however the app binds.
        "-A INPUT -p tcp -j REJECT --reject-with tcp-reset",
        "-A INPUT -j DROP",
        # SECURITY: the app shares this namespace; only the probe group reaches the admin listener.
        admin,
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A OUTPUT -d {overlay_subnet} -p tcp --dport {MESH_PORT} -j ACCEPT",
        # Redis for the sidecar's plugins: its user only, never the app's.
        *(f"-A OUTPUT{f' -d {dest}' if dest else ''} -p tcp --dport {port} -m owner --uid-owner {SIDECAR_UID} "
          f"-j ACCEPT" for dest, port in redis),
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
        admin,
        "-A OUTPUT -o lo -j ACCEPT",
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A OUTPUT -p ipv6-icmp -j ACCEPT",
        "-A OUTPUT -j REJECT",
        "COMMIT",
    ]
    return "\n".join(v4) + "\n", "\n".join(v6) + "\n"
