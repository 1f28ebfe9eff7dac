"""Keyed services on the docker runtime: `mesh up -d --runtime docker` against the real engine.

One instance (a sidecar and an app container) per key, started by its first
request through the front the controller runs on the mesh network's gateway;
the same key reaches the same containers; idle, they are removed; a later
request starts them again; `mesh down` leaves nothing of the mesh. Every
container, network and image the test makes is recorded by id (after each
`mesh` command and at the end) and removed, whatever happened.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import pytest

from mesh.control.docker.firewall import firewall_rules

from ..docker_support import base_image, docker_engine  # noqa: F401
from ..harness import KEYED_APP, Answer, MeshMaker, docker_build, fetch, free_port, unique_name, wait_until

TOML = '''
[services.web]
build = "app"
port = 8000
expose = {web}

[services.sandbox]
build = "app"
port = 8000
expose = {sandbox}
instances = {{ key = "header:X-Session", sleep_after = "8s", max = 2, start_timeout = "60s" }}

[[routes]]
from = "web"
to = "sandbox"
'''


def test_the_firewall_lets_sidecars_out_to_the_fronts_only() -> None:
    v4, _ = firewall_rules("172.30.0.0/16", "172.30.0.1", "172.31.0.1", fronts=[41234])
    lines = v4.splitlines()
    allow = "-A OUTPUT -d 172.30.0.1/32 -p tcp --dport 41234 -j ACCEPT"
    assert lines.index(allow) < lines.index("-A OUTPUT -d 172.30.0.1/32 -j REJECT")
    assert [line for line in lines if "172.30.0.1/32" in line and "ACCEPT" in line] == [allow]
    assert "41234" not in firewall_rules("172.30.0.0/16", "172.30.0.1", "172.31.0.1")[0]


@pytest.mark.docker
def test_keyed_service_on_docker(docker_engine: Any, base_image: str, make_mesh: MeshMaker) -> None:
    web_port, port = free_port(), free_port()
    mesh = make_mesh(unique_name("k"), TOML.format(web=web_port, sandbox=port), None,
                     files=docker_build(KEYED_APP), engine=docker_engine)

    def keyed_containers() -> list[dict[str, Any]]:
        mesh.remember()
        return [c for c in mesh.containers() if "mesh.key" in c["Labels"]]

    def call(key: str) -> Answer:
        return fetch(f"http://127.0.0.1:{port}/", headers={"X-Session": key}, timeout=90)

    up = mesh.run("up", "-d", "--runtime", "docker")
    assert up.returncode == 0, up.stdout + up.stderr
    state = mesh.ps()
    [front] = [i for i in state["instances"] if i["instance"] == "front"]
    assert front["state"] == "running" and front["service"] == "sandbox"
    gateway = front["addresses"]["mesh"].rsplit(":", 1)[0]
    assert not gateway.startswith("127.")  # on the mesh network's gateway
    assert mesh.keyed("sandbox") == [] and keyed_containers() == []  # nothing keyed starts with the mesh

    # 20 concurrent first requests of one key: one container pair, serving them all.
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: call("alice"), range(20)))
    cold = time.monotonic() - began
    assert all(answer.status == 200 for answer in results), results
    assert len({(answer.json()["host"], answer.json()["pid"]) for answer in results}) == 1
    first = results[0].json()
    pair = keyed_containers()
    assert sorted(c["Labels"]["mesh.role"] for c in pair) == ["app", "sidecar"], pair
    assert all(c["State"] == "running" for c in pair)
    print(f"\nfirst request of a key (20 at once) on docker: {cold:.2f}s")

    # The same key: the same containers.
    again = call("alice")
    assert again.status == 200 and (again.json()["host"], again.json()["pid"]) == (first["host"], first["pid"])

    # Through another service's sidecar, by name: the registry lists the front on the gateway,
    # the sidecar's firewall lets it out to it, the app sees the caller.
    answer = fetch(f"http://127.0.0.1:{web_port}/call", headers={"X-Session": "alice"}, timeout=90)
    assert answer.status == 200, answer.text
    assert answer.json()["host"] == first["host"] and answer.json()["peer"] == "web"

    [alice] = mesh.keyed("sandbox")
    assert alice["key"] == "alice" and alice["state"] == "running", alice
    assert {c["status"] for c in alice["containers"].values()} == {"running"}

    # Idle: put to sleep, its containers removed; `mesh ps` says sleeping, not a problem.
    wait_until(lambda: keyed_containers() == [], every=0.2, what=lambda: f"asleep: {keyed_containers()}")
    [asleep] = mesh.keyed("sandbox")
    assert asleep["state"] == "sleeping" and not asleep.get("problem"), asleep

    # Woken transparently: new containers for the same key.
    woken = call("alice")
    assert woken.status == 200 and woken.json()["host"] != first["host"], woken
    assert len(keyed_containers()) == 2
    [row] = mesh.keyed("sandbox")
    assert row["state"] == "running" and row["label"] == alice["label"]

    # max = 2: a third key puts the least recently used idle one to sleep (its containers go).
    assert call("bob").status == 200
    assert call("alice").status == 200  # bob is now the least recently used
    assert call("carol").status == 200
    def states() -> dict[str, str]:
        return {i["key"]: i["state"] for i in mesh.keyed("sandbox")}

    wait_until(lambda: states().get("bob") == "sleeping", every=0.2, what=lambda: f"bob asleep: {states()}")
    # bob was put to sleep to make room, not for being idle; alice and carol may have slept since, idle
    # for their own sleep_after (8s) on a slow engine.
    assert "sandbox: key 'bob' goes to sleep: making room for a new key (2 instances)" in mesh.log()
    assert "sandbox: key 'alice' goes to sleep: making room" not in mesh.log()

    def pairs_match_keys() -> bool:
        """A container pair for each running key, none for a sleeping one (keys may go on sleeping)."""
        running = sum(state == "running" for state in states().values())
        return len(keyed_containers()) == 2 * running

    wait_until(pairs_match_keys, every=0.2, what=lambda: f"pairs of {states()}: {keyed_containers()}")

    # No key: 400, nothing starts.
    answer = fetch(f"http://127.0.0.1:{port}/", timeout=90)
    assert answer.status == 400 and "X-Session" in answer.text

    down = mesh.run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert mesh.containers() == [] and mesh.networks() == []
    assert all(i["state"] == "stopped" for i in mesh.ps()["instances"])
