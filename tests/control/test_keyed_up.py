"""Keyed services through `mesh up -d` on real processes: one start per key, same instance, sleep, wake, max.

Every process a test starts is recorded (the controller, the pids and groups
in state.json, the run id every app and sidecar inherits) and killed at
teardown if it is still there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.control.controller import StateDir
from mesh.control.runtimes.base import group_alive, pid_alive, run_processes

pytestmark = pytest.mark.slow

APP = '''
import json, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"pid": os.getpid(), "service": os.environ["MESH_SERVICE"],
                           "session": self.headers.get("x-session"),
                           "peer": self.headers.get("x-mesh-peer")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''

TOML = """
[mesh]
name = "keyed"

[services.web]
command = "python app.py"

[services.sandbox]
command = "python app.py"
expose = {expose}
instances = {{ key = "header:X-Session", sleep_after = "{sleep}", max = {max}, start_timeout = "20s" }}

[[routes]]
from = "web"
to = "sandbox"
"""

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with NO_PROXY.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def mesh(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class KeyedMesh:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen_pids: set[int] = set()
        self.seen_groups: set[int] = set()
        self.runs: set[str] = set()
        self.controllers: set[int] = set()

    def up(self, sleep: str = "30s", max: int = 100) -> None:
        self.port = free_port()
        (self.folder / "app.py").write_text(APP)
        (self.folder / "mesh.toml").write_text(TOML.format(expose=self.port, sleep=sleep, max=max))
        done = mesh("up", "-d", str(self.folder))
        self.ps()
        assert done.returncode == 0, done.stdout + done.stderr

    def ps(self) -> dict[str, Any]:
        done = mesh("ps", "--json", str(self.folder))
        state = json.loads(done.stdout)
        if state.get("run"):
            self.runs.add(state["run"])
        if state.get("controller", {}).get("pid"):
            self.controllers.add(state["controller"]["pid"])
        for inst in state.get("instances", []):
            self.seen_pids.update(p for role, p in inst.get("pids", {}).items() if role != "controller")
            self.seen_groups.update(inst.get("pgids", {}).values())
        return state

    def keyed(self) -> list[dict[str, Any]]:
        return [i for i in self.ps()["instances"] if i["service"] == "sandbox" and i["instance"] != "front"]

    def call(self, key: str) -> tuple[int, Any]:
        return get(f"http://127.0.0.1:{self.port}/", {"X-Session": key})

    def cleanup(self) -> None:
        state_file = next(self.folder.glob(".mesh/*/state.json"), None)
        if state_file is not None and StateDir(state_file.parent).running():
            for pid in self.controllers:
                if pid != os.getpid():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
        for pgid in self.seen_groups:
            if group_alive(pgid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        for run in self.runs:
            for pid in run_processes(run):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[KeyedMesh]:
    keeper = KeyedMesh(tmp_path)
    try:
        yield keeper
    finally:
        keeper.cleanup()


def wait_for(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_keyed_service_through_mesh_up(keyed: KeyedMesh) -> None:
    keyed.up(sleep="1500ms", max=2)
    state = keyed.ps()
    fronts = [i for i in state["instances"] if i["instance"] == "front"]
    assert [f["service"] for f in fronts] == ["sandbox"]
    assert keyed.keyed() == []  # nothing started at `mesh up`

    # 20 concurrent first requests for one key: one instance, all served by it.
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: keyed.call("alice"), range(20)))
    assert all(status == 200 for status, _ in results), results
    pids = {body["pid"] for _, body in results}
    assert len(pids) == 1
    [alice] = keyed.keyed()
    assert alice["key"] == "alice" and alice["state"] == "running"
    first_pid = results[0][1]["pid"]
    assert keyed.call("alice")[1]["pid"] == first_pid

    # Through another service's sidecar, by name: the registry lists the front; the app sees the caller.
    web = next(i for i in keyed.ps()["instances"] if i["service"] == "web")
    status, body = get(f"http://{web['addresses']['outbound']}/", {"Host": "sandbox", "X-Session": "alice"})
    assert status == 200 and body["pid"] == first_pid and body["peer"] == "web"

    # A different key: a different instance.
    status, bob = keyed.call("bob")
    assert status == 200 and bob["pid"] != first_pid

    # Idle: both sleep (their processes end), and `mesh ps` says so.
    assert wait_for(lambda: {i["state"] for i in keyed.keyed()} == {"sleeping"}, 15), keyed.keyed()
    assert not pid_alive(first_pid) and not pid_alive(bob["pid"])

    # Wake transparently: a new process for the same key.
    status, again = keyed.call("alice")
    assert status == 200 and again["pid"] != first_pid
    [woken] = [i for i in keyed.keyed() if i["key"] == "alice"]
    assert woken["state"] == "running" and woken["label"] == alice["label"]

    # max = 2: a third key puts the least recently used to sleep; never more than two run.
    assert keyed.call("bob")[0] == 200
    assert keyed.call("alice")[0] == 200  # bob is now the least recently used
    status, carol = keyed.call("carol")
    assert status == 200
    states = {i["key"]: i["state"] for i in keyed.keyed()}
    assert sum(1 for s in states.values() if s in ("running", "starting")) <= 2, states
    assert states["carol"] == "running" and states["bob"] == "sleeping", states

    # No key: 400, and nothing starts.
    status, text = get(f"http://127.0.0.1:{keyed.port}/")
    assert status == 400 and "X-Session" in text

    run = keyed.ps()["run"]
    done = mesh("down", str(keyed.folder))
    assert done.returncode == 0, done.stdout + done.stderr
    assert run_processes(run) == []
    assert not any(pid_alive(p) for p in keyed.seen_pids)
    assert not any(group_alive(g) for g in keyed.seen_groups)
    assert all(i["state"] == "stopped" for i in keyed.ps()["instances"])
