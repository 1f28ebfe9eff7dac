"""The firewall of an instance's network namespace on the docker runtime.

The sidecar container's entrypoint (`ENTRYPOINT`) installs the rules
(`firewall_rules`, iptables, with NET_ADMIN) before the sidecar runs, and says
so (`FIREWALL_MARKER`); the app container starts only after that. The sidecar
process runs as `SIDECAR_UID`, with no capability but ``DAC_OVERRIDE`` (it
reads the mounted files the host's user owns, and writes its access log). From outside the namespace only the mesh
listener (from the mesh network) and the admin listener (from the host, through
its published port) take connections; the app's port and everything else
answer with a reset. (An exposed service's public listener is no port of the
namespace: the sidecar serves a socket made on the host's 127.0.0.1 and handed
to it, whose connections never pass this firewall; `mesh.control.runtimes.public`.) Inside, nothing (the app
included) may connect to the admin port. Out of the namespace only other
sidecars' mesh listeners, and the keyed services' fronts on the mesh network's
gateway (`mesh.control.keyed`); in an instance that may call hosts outside the
mesh (``egress``), also the sidecar's own connections (matched by its uid, which
the app container cannot take: it has no ``SETUID``/``SETGID``), to anything but
the mesh network, and DNS to the engine's resolvers (see `firewall_rules`).

The admin listener stays on the namespace's loopback; the firewall forwards
(DNAT) what arrives from the edge network's gateway (the host's side of the
published port) to it, which needs ``route_localnet`` in the namespace; packets
that claim a loopback destination from outside are dropped first (the
CVE-2020-8558 rule).
"""

from __future__ import annotations

from collections.abc import Sequence

from mesh.control.docker.layout import ADMIN_PORT, MESH_PORT, SIDECAR_UID

__all__ = ["ENTRYPOINT", "FIREWALL_MARKER", "firewall_rules"]

FIREWALL_MARKER = "mesh-firewall: installed"

# The sidecar container's entrypoint: the firewall first, then the sidecar as SIDECAR_UID, with
# DAC_OVERRIDE only (the mounted token, key and log folder are the host user's, mode 0600/0700).
# iptables-restore --noflush: Docker's embedded DNS keeps its own nat rules in the namespace.
ENTRYPOINT = r"""set -e
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
""" + (f"exec setpriv --reuid={SIDECAR_UID} --regid={SIDECAR_UID} --clear-groups --inh-caps=+dac_override "
       f"--ambient-caps=+dac_override --bounding-set=-net_admin -- \"$@\"\n")


def firewall_rules(mesh_subnet: str, mesh_gateway: str, edge_gateway: str, *,
                   fronts: Sequence[int] = (), egress: bool = False,
                   resolvers: Sequence[str] = ()) -> tuple[str, str]:
    """The iptables-restore input (IPv4, IPv6) installed in an instance's network namespace.

    In: loopback; replies; the mesh listener from the mesh network; the admin
    listener from the edge gateway, that is through its port published on the
    host. Everything else is refused, the
    app's port first of all. Out: loopback, replies, other sidecars' mesh
    listeners and, on the mesh network's gateway (the host's side of it), only
    the ``fronts`` ports: the keyed services' fronts, which the controller runs
    there. Nothing inside reaches the admin port: it is the controller's, from
    the host, and the app shares this namespace. IPv6 (when the namespace has
    it at all): loopback (but the admin port) and replies only.

    With ``egress`` (the instance is on the egress network, whose gateway is
    then ``edge_gateway``), TCP connections of `SIDECAR_UID` may go anywhere
    but the mesh network and its gateway, and DNS (port 53) may go to
    ``resolvers``: the engine's embedded DNS (127.0.0.11) forwards names it
    does not know from inside the namespace, with the engine's uid, on older
    engines (20.10 does). The app reaches those resolvers too, as it reaches them through
    127.0.0.11 anyway, and nothing else.
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
    ]
    if egress:
        v4 += [
            f"-A OUTPUT -d {mesh_subnet} -p tcp -j REJECT --reject-with tcp-reset",
            f"-A OUTPUT -d {mesh_subnet} -j REJECT",
            *(f"-A OUTPUT -d {address}/32 -p {protocol} --dport 53 -j ACCEPT"
              for address in resolvers for protocol in ("udp", "tcp")),
            # SECURITY: the sidecar's uid, which the app container cannot take (no SETUID, SETGID,
            # no-new-privileges); the sidecar checks each call against the [[egress]] entries.
            f"-A OUTPUT -p tcp -m owner --uid-owner {SIDECAR_UID} -j ACCEPT",
        ]
    v4 += [
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

