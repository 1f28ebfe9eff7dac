"""Shared fixtures and helpers for tests that need a Docker engine.

Mark such tests ``@pytest.mark.docker`` and import the fixtures you use::

    from ..docker_support import base_image, docker_engine, leftovers, run_container

- ``docker_engine`` (session): a ``docker.DockerClient`` that answered a ping.
  Without an engine the test is skipped, or FAILS when ``MESH_REQUIRE_DOCKER=1``
  (CI sets it, after starting the engine with scripts/dockerd.sh).
- ``base_image`` (session): the id of ``mesh/base:<version>``, built once and
  kept between runs (the build is cached by mesh itself).
- ``leftovers``: records every container, image and network a test creates, by
  id, and removes them when the test ends, whatever happened.
- ``run_container(client, image, command, leftovers, ...)``: run a command to its
  end with no network, return (exit code, output); the container is removed.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest

REQUIRE_VARIABLE = "MESH_REQUIRE_DOCKER"


def engine_or_skip():
    """A client of the local engine; skip the test without one (fail if MESH_REQUIRE_DOCKER=1)."""
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any reason means "no engine"
        message = (f"no Docker engine answers ({type(exc).__name__}: {exc}); "
                   f"start one with: sudo scripts/dockerd.sh")
        if os.environ.get(REQUIRE_VARIABLE) == "1":
            pytest.fail(f"{REQUIRE_VARIABLE}=1 but {message}", pytrace=False)
        pytest.skip(message)
    return client


@pytest.fixture(scope="session")
def docker_engine():
    client = engine_or_skip()
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_engine):
    """``mesh/base:<version>``, built (or found up to date) once per test session."""
    from mesh.control.docker import images

    lines: list[str] = []
    started = time.monotonic()
    try:
        image_id = images.build_base(docker_engine, log=lines.append)
    except images.ImageError as exc:
        pytest.fail(f"building mesh/base failed: {exc}\n" + "\n".join(lines), pytrace=False)
    print(f"\nmesh/base ready in {time.monotonic() - started:.1f}s: " + " / ".join(lines[-3:]))
    return image_id


class Leftovers:
    """What a test created in the engine, by id, to remove at its end."""

    def __init__(self, client) -> None:
        self.client = client
        self.containers: list[str] = []
        self.images: list[str] = []
        self.networks: list[str] = []

    def container(self, container_id: str) -> str:
        self.containers.append(container_id)
        return container_id

    def image(self, image_id: str) -> str:
        if image_id not in self.images:
            self.images.append(image_id)
        return image_id

    def network(self, network_id: str) -> str:
        self.networks.append(network_id)
        return network_id

    def remove_all(self) -> list[str]:
        import docker

        api = self.client.api
        failures = []
        for kind, ids, remove in (("container", self.containers, lambda i: api.remove_container(i, force=True, v=True)),
                                  ("network", self.networks, api.remove_network),
                                  ("image", self.images, lambda i: api.remove_image(i, force=True, noprune=False))):
            for found in reversed(ids):
                try:
                    remove(found)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError as exc:
                    if "not found" in str(exc.explanation):  # removed meanwhile (a swarm says so with a 500)
                        continue
                    failures.append(f"{kind} {found[:19] if kind == 'image' else found[:12]}: {exc}")
        return failures


@pytest.fixture
def leftovers(docker_engine):
    record = Leftovers(docker_engine)
    yield record
    failures = record.remove_all()
    assert not failures, f"could not remove what the test created: {failures}"


def run_container(client, image: str, command: list[str], leftovers: Leftovers, *,
                  timeout: float = 60, **options) -> tuple[int, str]:
    """Run ``command`` in a new container of ``image`` (no network unless ``options`` say
    otherwise) until it ends; return its exit code and output. The container is removed."""
    options.setdefault("network_mode", "none")
    container = client.containers.create(image, command, **options)
    leftovers.container(container.id)
    try:
        container.start()
        status = container.wait(timeout=timeout)
        output = container.logs(stdout=True, stderr=True).decode(errors="replace")
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True)
    return int(status.get("StatusCode", -1)), output
