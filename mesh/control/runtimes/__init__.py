"""The runtimes a mesh runs on, by the name ``mesh up --runtime`` takes.

The process runtime is always there; the Docker and Swarm runtimes are
imported only when asked for, so a mesh on local processes never loads the
Docker SDK.
A new runtime (`mesh.control.runtimes.base` says what it implements) is one
more name here.
"""

from __future__ import annotations

from mesh.config import MeshConfig
from mesh.control.runtimes.base import OnExit, Output, Runtime, RuntimeUnavailable
from mesh.control.runtimes.process import ProcessRuntime
from mesh.sidecar import admin

__all__ = ["RUNTIMES", "get_runtime", "runtime_class"]

RUNTIMES = ("process", "docker", "swarm")


def runtime_class(name: str) -> type[Runtime]:
    """The runtime called ``name``, or raise `RuntimeUnavailable` saying why not."""
    if name == "process":
        return ProcessRuntime
    if name == "docker":
        from mesh.control.runtimes.docker import DockerRuntime  # here: the process runtime needs no docker SDK

        return DockerRuntime
    if name == "swarm":
        from mesh.control.runtimes.swarm import SwarmRuntime  # here too: the docker SDK only when asked for

        return SwarmRuntime
    raise RuntimeUnavailable(f"unknown runtime {name!r} (expected {' or '.join(map(repr, RUNTIMES))})")


def get_runtime(name: str, config: MeshConfig, *, output: Output, on_exit: OnExit,
                run_id: str = "", admin_token: admin.AdminToken | None = None) -> Runtime:
    """The runtime called ``name`` for one run, or raise `RuntimeUnavailable` saying why not."""
    return runtime_class(name)(config, output=output, on_exit=on_exit, run_id=run_id, admin_token=admin_token)
