"""Autoscaling (mesh.control.autoscale) on the docker runtime, against the real engine.

A pool ``scale = { min = 1, max = 2, cpu = 0.1, cooldown = "2s" }`` of an app FROM mesh/base with a
CPU-burning endpoint, exposed on 127.0.0.1. `mesh up -d --runtime docker` with a short window and
interval (MESH_AUTOSCALE_*); a bounded load (a fixed number of requests, a time limit) makes it add
a second instance (two running container pairs in `mesh ps --json`, the new one serving), and once
the load stops it goes back to one. `mesh down` at the end; then whatever is left, by recorded id.
"""

from __future__ import annotations

from typing import Any

import pytest

from mesh.sidecar.admin import operator_token

from ..docker_support import base_image, docker_engine  # noqa: F401
from ..harness import DOCKER_BURN_APP, Load, MeshMaker, docker_build, fetch, free_port, unique_name, wait_until

MESH = '''
[services.pool]
build = "app"
port = 8000
expose = {expose}
health = "/healthz"
scale = {{ min = 1, max = 2, cpu = 0.1, cooldown = "2s" }}
'''

# A short window and interval, so that it scales within seconds.
SHORT = {"MESH_AUTOSCALE_WINDOW": "2", "MESH_AUTOSCALE_INTERVAL": "0.25", "MESH_AUTOSCALE_DRAIN": "0.5"}


@pytest.mark.docker
@pytest.mark.slow
def test_a_docker_pool_scales_up_under_load_and_down_after(docker_engine: Any, base_image: str,  # noqa: F811
                                                           make_mesh: MeshMaker) -> None:
    expose = free_port()
    pool = make_mesh(unique_name(), MESH.format(expose=expose), None, files=docker_build(DOCKER_BURN_APP),
                     engine=docker_engine, env=SHORT)

    def running() -> list[dict[str, Any]]:
        """The pool's instances with both containers running, per `mesh ps --json`."""
        found = [i for i in pool.ps()["instances"] if i["service"] == "pool" and i["state"] == "running"]
        return [i for i in found if {c.get("status") for c in i["containers"].values()} == {"running"}
                and set(i["containers"]) == {"sidecar", "app"}]

    def burn(url: str) -> tuple[int, bytes]:
        answer = fetch(f"{url}/burn?ms=1", timeout=15)
        return answer.status, answer.body

    up = pool.run("up", "-d", "--runtime", "docker")
    assert up.returncode == 0, f"mesh up -d failed:\n{up.stdout}\n{up.stderr}"
    first = running()
    assert [i["label"] for i in first] == ["pool.1"], first
    public = f"http://127.0.0.1:{expose}"
    assert burn(public) == (200, b"1")

    # Bounded load: 3 clients, ~300ms of CPU per request, until scaled up, 40s or 300 requests.
    load = Load(f"{public}/burn?ms=300", requests=300, seconds=40, timeout=15).start()
    try:
        wait_until(lambda: len(running()) == 2, timeout=45, every=0.5, what=pool.log)
    finally:
        load.stop()
    log = pool.log()
    added = [line for line in log.splitlines() if "adding pool.2" in line]
    assert added and "pool: average CPU " in added[0] and " over 2s across 1 instance > 0.1" in added[0], log
    assert "pool.2: ready after" in log

    # `mesh ps --json`: two running pairs of containers, distinct, the second one serving.
    two = running()
    assert [i["label"] for i in two] == ["pool.1", "pool.2"], two
    ids = {c["id"] for i in two for c in i["containers"].values()}
    assert len(ids) == 4
    for inst in two:
        found = docker_engine.api.inspect_container(inst["containers"]["app"]["id"])
        assert found["State"]["Running"] and found["Config"]["Labels"]["mesh.role"] == "app"
    assert two[1]["public"] == public  # one socket, both serve it
    wait_until(lambda: burn(public) == (200, b"2"), timeout=30, what="pool.2 answering on the public port")
    admin = f"http://{two[0]['addresses']['admin']}/registry"
    token = operator_token(pool.state_dir)
    assert token is not None

    def registry() -> list[str]:
        answer = fetch(admin, headers=token.headers(), timeout=15)
        return sorted(answer.json()["services"].get("pool", [])) if answer.status == 200 else []

    wait_until(lambda: registry() == [f"pool-1.{pool.name}:15001", f"pool-2.{pool.name}:15001"], every=0.5,
               what=lambda: f"pushed to the sidecars: {registry()}")

    # No load: below 0.05 for the 2s cooldown: pool.2 is drained and removed.
    wait_until(lambda: [i["label"] for i in running()] == ["pool.1"] and "pool.2: stopped (scaled down)" in pool.log(),
               timeout=45, every=0.5, what=pool.log)
    log = pool.log()
    removed = [line for line in log.splitlines() if "removing pool.2" in line]
    assert removed and " < 0.05 for 2s: removing pool.2 (draining 0.5s first)" in removed[0], log
    gone = [c["id"] for c in two[1]["containers"].values()]
    assert not [c for c in docker_engine.api.containers(all=True, filters={"id": gone})]
    assert burn(public) == (200, b"1")
    assert registry() == [f"pool-1.{pool.name}:15001"]
    print(f"\nrequests sent: {load.sent}; decisions:\n" + "\n".join(added + removed))

    down = pool.run("down")
    assert down.returncode == 0 and f"mesh '{pool.name}' stopped" in down.stdout, down.stdout + down.stderr
    assert pool.containers() == []
