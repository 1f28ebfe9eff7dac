"""Keyed services through `mesh up -d` on real processes: one start per key, same instance, sleep, wake, max.

The mesh (tests/harness.py's ``make_mesh``) records every process it starts
(the controller, the pids and groups in state.json, the run id every app and
sidecar inherits) and kills it at teardown if it is still there.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
from pathlib import Path
from typing import Any

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


def _spares(mesh: Any) -> list[int]:
    """The run's spare sidecars still waiting: started as spares (their command line says so, also once
    used) and not yet any instance's sidecar."""
    state = mesh.ps()
    used = {pid for i in state["instances"] for pid in i.get("pids", {}).values()}
    found = []
    for pid in run_processes(state["run"]):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mesh.sidecar.spare" in command and pid not in used:
            found.append(pid)
    return found


def test_a_new_key_takes_the_spare_sidecar_and_another_waits_behind_it(make_mesh: MeshMaker) -> None:
    """A keyed mesh keeps one spare sidecar: a new key's instance runs in it (its pid is the spare's),
    a new spare starts, and the spare goes with the mesh, or with its controller when that dies."""
    port = free_port()
    mesh = make_mesh("spare", TOML.format(expose=port), KEYED_APP)
    up = mesh.run("up", "-d", timeout=90)
    assert up.returncode == 0, up.stdout + up.stderr
    run = mesh.ps()["run"]
    wait_until(lambda: len(_spares(mesh)) == 1, what=lambda: f"one spare: {_spares(mesh)}")
    [spare] = _spares(mesh)

    answer = fetch(f"http://127.0.0.1:{port}/", headers={"X-Session": "alice"})
    assert answer.status == 200, answer.text
    [alice] = mesh.keyed("sandbox")
    assert alice["pids"]["sidecar"] == spare  # the spare became alice's sidecar
    wait_until(lambda: len(_spares(mesh)) == 1 and _spares(mesh) != [spare],
               what=lambda: f"a new spare: {_spares(mesh)}")
    # alice's sidecar runs as any sidecar does: by name through web's sidecar, with mutual TLS.
    web = next(i for i in mesh.ps()["instances"] if i["service"] == "web")
    through = fetch(f"http://{web['addresses']['outbound']}/", headers={"Host": "sandbox", "X-Session": "alice"})
    assert through.status == 200 and through.json()["peer"] == "web", through.text

    # A spare that died waiting is no spare: the next key's sidecar starts as usual.
    [dead] = _spares(mesh)
    os.kill(dead, signal.SIGKILL)
    wait_until(lambda: not pid_alive(dead), what=f"the spare {dead} killed")
    bob = fetch(f"http://127.0.0.1:{port}/", headers={"X-Session": "bob"})
    assert bob.status == 200, bob.text
    [bob_row] = [i for i in mesh.keyed("sandbox") if i["key"] == "bob"]
    assert pid_alive(bob_row["pids"]["sidecar"]) and bob_row["pids"]["sidecar"] != dead

    # Its controller killed: the spare, waiting on the controller, exits by itself.
    wait_until(lambda: len(_spares(mesh)) == 1, what=lambda: f"a spare again: {_spares(mesh)}")
    [waiting] = _spares(mesh)
    mesh.kill_controller()
    wait_until(lambda: not pid_alive(waiting), what=f"the spare {waiting} exits with its controller")
    done = mesh.run("down", timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert run_processes(run) == []
