"""The Docker engine as the docker support sees it: a client that answered, the errors it raises,
and the small steps builds share.

    client = docker_client()        # or DockerUnavailable saying how to start the engine
    find_image(client, "mesh/base:latest")   # the image, or None

Everything here blocks; from asyncio, call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.errors import MeshError

if TYPE_CHECKING:
    import docker

__all__ = ["CHECKOUT", "DockerUnavailable", "ImageError", "Log", "docker_client", "find_image",
           "short_id", "step"]

Log = Callable[[str], None]


class ImageError(MeshError):
    """An image could not be built or found; ``problems`` lists each reason, one a line."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class DockerUnavailable(MeshError):
    """No Docker engine answers (or the docker package is missing); the message says what to do."""


# The checkout mesh runs from: pyproject.toml, mesh/, plugins/, scripts/
# (this file is mesh/control/docker/engine.py).
CHECKOUT = Path(__file__).resolve().parents[3]


def _start_hint() -> str:
    script = CHECKOUT / "scripts" / "dockerd.sh"
    if script.is_file():
        return f"start it with: sudo {script}"
    return "start it (sudo systemctl start docker, or sudo dockerd &)"


def docker_client(timeout: float = 120) -> docker.DockerClient:
    """A client of the local engine (``DOCKER_HOST`` and friends honoured) that answered a ping.

    Raises `DockerUnavailable` saying how to start the engine when none answers.
    """
    try:
        import docker
    except ImportError:  # pragma: no cover - a dependency of mesh
        raise DockerUnavailable("the docker runtime needs the Python package 'docker': "
                                "pip install docker") from None
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except docker.errors.DockerException as exc:
        reason = str(exc)
        if "ermission denied" in reason:
            raise DockerUnavailable(
                f"the Docker engine at {where} refused this user ({reason}); "
                f"run as root or join the 'docker' group") from None
        raise DockerUnavailable(f"no Docker engine answers at {where} ({reason}); "
                                f"{_start_hint()}") from None
    return client




def short_id(image_id: str) -> str:
    """An image id as ``docker images`` shows it: 12 hex digits."""
    return image_id.removeprefix("sha256:")[:12]


def find_image(client: docker.DockerClient, ref: str) -> Any | None:
    """The image ``ref`` names in the local engine, or None."""
    import docker

    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None


@contextlib.contextmanager
def step(log: Log, what: str) -> Iterator[None]:
    """Say ``what`` starts, and how long it took once done."""
    log(f"{what} ...")
    started = time.monotonic()
    yield
    log(f"{what}: done in {time.monotonic() - started:.1f}s")
