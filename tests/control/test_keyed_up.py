"""Keyed services through `mesh up -d` on real processes: one start per key, same instance, sleep, wake, max.

The mesh (tests/harness.py's ``make_mesh``) records every process it starts
(the controller, the pids and groups in state.json, the run id every app and
sidecar inherits) and kills it at teardown if it is still there.
"""

from __future__ import annotations

import concurrent.futures

import pytest

from mesh.control.runtimes.procfs import pid_alive, run_processes

from ..harness import KEYED_APP, Answer, MeshMaker, fetch, free_port, wait_until

pytestmark = pytest.mark.slow

TOML = """
[services.web]
command = "python app.py"

[services.sandbox]
command = "python app.py"
expose = {expose}
instances = {{ key = "header:X-Session", sleep_after = "5s", max = 2, start_timeout = "20s" }}

[[routes]]
from = "web"
to = "sandbox"
"""


def test_keyed_service_through_mesh_up(make_mesh: MeshMaker) -> None:
    port = free_port()
    mesh = make_mesh("keyed", TOML.format(expose=port), KEYED_APP)
    up = mesh.run("up", "-d", timeout=90)
    assert up.returncode == 0, up.stdout + up.stderr

    def call(key: str) -> Answer:
        return fetch(f"http://127.0.0.1:{port}/", headers={"X-Session": key})

    state = mesh.ps()
    fronts = [i for i in state["instances"] if i["instance"] == "front"]
    assert [f["service"] for f in fronts] == ["sandbox"]
    assert mesh.keyed("sandbox") == []  # nothing started at `mesh up`

    # 20 concurrent first requests for one key: one instance, all served by it.
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: call("alice"), range(20)))
    assert all(answer.status == 200 for answer in results), results
    pids = {answer.json()["pid"] for answer in results}
    assert len(pids) == 1
    [alice] = mesh.keyed("sandbox")
    assert alice["key"] == "alice" and alice["state"] == "running"
    first_pid = results[0].json()["pid"]
    assert call("alice").json()["pid"] == first_pid

    # Through another service's sidecar, by name: the registry lists the front; the app sees the caller.
    web = next(i for i in mesh.ps()["instances"] if i["service"] == "web")
    answer = fetch(f"http://{web['addresses']['outbound']}/", headers={"Host": "sandbox", "X-Session": "alice"})
    assert answer.status == 200 and answer.json()["pid"] == first_pid and answer.json()["peer"] == "web"

    # A different key: a different instance.
    bob = call("bob")
    assert bob.status == 200 and bob.json()["pid"] != first_pid

    # Idle: both sleep (their processes end), and `mesh ps` says so.
    wait_until(lambda: {i["state"] for i in mesh.keyed("sandbox")} == {"sleeping"}, every=0.1,
               what=lambda: f"both asleep: {mesh.keyed('sandbox')}")
    assert not pid_alive(first_pid) and not pid_alive(bob.json()["pid"])

    # Wake transparently: a new process for the same key.
    again = call("alice")
    assert again.status == 200 and again.json()["pid"] != first_pid
    [woken] = [i for i in mesh.keyed("sandbox") if i["key"] == "alice"]
    assert woken["state"] == "running" and woken["label"] == alice["label"]

    # max = 2: a third key puts the least recently used to sleep; never more than two run.
    assert call("bob").status == 200
    assert call("alice").status == 200  # bob is now the least recently used
    assert call("carol").status == 200
    states = {i["key"]: i["state"] for i in mesh.keyed("sandbox")}
    assert sum(1 for s in states.values() if s in ("running", "starting")) <= 2, states
    # Why bob sleeps is in the log (by now carol may have slept too, idle, on a slow machine).
    assert "sandbox: key 'bob' goes to sleep: making room for a new key (2 instances)" in mesh.log()

    # No key: 400, and nothing starts.
    answer = fetch(f"http://127.0.0.1:{port}/")
    assert answer.status == 400 and "X-Session" in answer.text

    run = mesh.ps()["run"]
    done = mesh.run("down", timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert run_processes(run) == []
    mesh.assert_all_gone()
    assert all(i["state"] == "stopped" for i in mesh.ps()["instances"])
