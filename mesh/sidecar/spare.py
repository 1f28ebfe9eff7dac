"""A spare sidecar: Python started and the sidecar's modules imported ahead of demand.

The process runtime keeps one while a mesh has keyed services, so a new
key's instance does not wait for an interpreter to start and import mesh
(most of a sidecar's start). It runs as ``python -m mesh.sidecar.spare FD``,
where FD is its end of a unix socket pair whose other end only the
controller holds. It waits there for one message: the `mesh sidecar`
command line of the instance it is to serve (``{"argv": [...], "fds":
[role, ...]}``, JSON) and, with it, that instance's listening sockets
(SCM_RIGHTS, in the order of ``fds``). It then runs that command as if it
had been started with it: the configuration, registry, certificates and
plugins are read then, not at its start. If the controller closes its end
first (the mesh stops), it exits.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from pathlib import Path

__all__ = ["MAX_ORDER", "main"]

MAX_ORDER = 1 << 16  # bytes: a command line fits many times over
_ROLES = frozenset({"mesh", "outbound", "admin", "public"})


def main(args: list[str]) -> int:
    channel = socket.socket(fileno=int(args[0]))
    # What `mesh sidecar` imports before it serves: the cost paid ahead.
    from mesh import cli, lifecycle  # noqa: F401
    from mesh.sidecar import sidecar  # noqa: F401

    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

    try:
        message, fds, _, _ = socket.recv_fds(channel, MAX_ORDER, len(_ROLES))
    except OSError:
        return 0
    finally:
        channel.close()
    if not message:
        return 0  # not needed after all
    order = json.loads(message)
    roles = order["fds"]
    if len(roles) != len(fds) or not set(roles) <= _ROLES:
        print(f"spare sidecar: {len(fds)} sockets for the roles {roles}", file=sys.stderr)
        return 2
    argv = [str(part) for part in order["argv"]]
    for role, fd in zip(roles, fds, strict=True):
        argv += [f"--{role}-fd", str(fd)]
    with contextlib.suppress(OSError):  # what `ps -o comm` and top show from now on
        Path("/proc/self/comm").write_text("mesh sidecar")
    return cli.main(["sidecar", *argv])  # as if started as `mesh sidecar ARGV`


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
