"""How the docker runtime lays a mesh out in the engine: ports inside an instance, mounts, names, labels.

Every container and network carries labels (`LABEL_MESH`, `LABEL_STATE`: the
state folder of the mesh, `LABEL_RUN`, `LABEL_SERVICE`, `LABEL_INSTANCE`,
`LABEL_ROLE`), so `mesh ps` and `mesh down` (`mesh.control.docker.status`) find
them without the controller, after a crash too, and touch nothing else.
Images carry ``mesh.mesh`` too, and containers inherit image labels, so a
container is this mesh's only with this mesh's `LABEL_STATE` and a `LABEL_ROLE`.
"""

from __future__ import annotations

from mesh.control.docker import images

__all__ = [
    "ADMIN_PORT", "ADMIN_TOKEN_MOUNT", "APP_GRACE", "CONFIG_MOUNT", "DEFAULT_APP_PORT", "HANDOFF_MOUNT",
    "LABEL_INSTANCE", "LABEL_KEY", "LABEL_MESH", "LABEL_ROLE", "LABEL_RUN", "LABEL_SERVICE", "LABEL_STATE", "MESH_PORT",
    "OUTBOUND_PORT", "PUBLIC_PORT", "REGISTRY_MOUNT", "SIDECAR_GRACE", "SIDECAR_PORTS", "SIDECAR_UID", "TLS_MOUNT",
    "container_name", "egress_network_name", "mesh_alias", "network_names",
]

# Where the sidecar listens inside an instance; the app may use any other port.
ADMIN_PORT = 15000
MESH_PORT = 15001
OUTBOUND_PORT = 15002
PUBLIC_PORT = 15080
SIDECAR_PORTS = (ADMIN_PORT, MESH_PORT, OUTBOUND_PORT, PUBLIC_PORT)
DEFAULT_APP_PORT = 8000

# The sidecar process's uid and gid (the container's entrypoint starts it so): the firewall lets only
# this uid open connections out of an instance that may call hosts outside the mesh.
SIDECAR_UID = 15100

CONFIG_MOUNT = "/mesh/config"
TLS_MOUNT = "/mesh/tls"
REGISTRY_MOUNT = "/mesh/registry.json"
ADMIN_TOKEN_MOUNT = "/mesh/admin.token"
HANDOFF_MOUNT = "/mesh/handoff"  # an exposed service's sidecar: where it is handed its public socket

LABEL_MESH = images.LABEL_MESH      # mesh.mesh: the mesh's name
LABEL_STATE = "mesh.state"          # the mesh's state folder: which mesh.toml's mesh this is
LABEL_RUN = "mesh.run"              # the `mesh up` run that made it
LABEL_SERVICE = images.LABEL_SERVICE
LABEL_INSTANCE = "mesh.instance"    # the instance's number
LABEL_ROLE = "mesh.role"            # sidecar | app (containers), mesh | edge | egress (networks)
LABEL_KEY = "mesh.key"              # a keyed instance's label (`keyed.key_label`: a hash, never the key)

SIDECAR_GRACE = 15.0  # a sidecar drains requests in flight for up to 10s
APP_GRACE = 5.0


def container_name(mesh: str, service: str, index: int, role: str = "sidecar") -> str:
    """``mesh-<mesh>-<service>-<index>`` for a sidecar (also its name on the mesh network),
    with ``-app`` for its app. The index ends in digits, so no two instances share a name."""
    base = f"mesh-{mesh}-{service}-{index}"
    return base if role == "sidecar" else f"{base}-{role}"


def mesh_alias(mesh: str, service: str, index: int) -> str:
    """An instance's name on the mesh network only (``<service>-<index>.<mesh>``), its host in the registry.

    Not the container's name: that one resolves on the edge network too, to an
    address the namespace firewall rightly refuses to call.
    """
    return f"{service}-{index}.{mesh}"


def network_names(mesh: str) -> dict[str, str]:
    """The two networks of a mesh: ``mesh`` (internal, between sidecars) and ``edge`` (publishing)."""
    return {"mesh": f"mesh-{mesh}", "edge": f"mesh-{mesh}-edge"}


def egress_network_name(mesh: str) -> str:
    """The network of a mesh's instances that may call hosts outside it (``[[egress]]``): ``mesh-<mesh>-egress``."""
    return f"mesh-{mesh}-egress"
