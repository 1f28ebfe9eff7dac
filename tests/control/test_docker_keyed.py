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
import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from mesh.control.runtimes.docker import firewall_rules

from ..docker_support import Leftovers, base_image, docker_engine  # noqa: F401
from .test_docker_runtime import DockerMesh, free_port

APP = '''
import json, os, socket, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/call":  # web: to the keyed service, by name, through this sidecar
            request = urllib.request.Request("http://sandbox/",
                                             headers={"X-Session": self.headers.get("x-session", "")})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return self.reply(response.status, response.read())
            except urllib.error.HTTPError as error:
                return self.reply(error.code, error.read())
        self.reply(200, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                    "service": os.environ["MESH_SERVICE"],
                                    "session": self.headers.get("x-session"),
                                    "peer": self.headers.get("x-mesh-peer")}).encode())

    def reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''

DOCKERFILE = 'FROM mesh/base\nCOPY app.py /app/\nCMD ["python3", "/app/app.py"]\n'

TOML = '''
[mesh]
name = "{name}"

[services.web]
build = "app"
port = 8000
expose = {web}

[services.sandbox]
build = "app"
port = 8000
expose = {sandbox}
instances = {{ key = "header:X-Session", sleep_after = "4s", max = 2, start_timeout = "60s" }}

[[routes]]
from = "web"
to = "sandbox"
'''

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with NO_PROXY.open(request, timeout=90) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def wait_for(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def test_the_firewall_lets_sidecars_out_to_the_fronts_only() -> None:
    v4, _ = firewall_rules("172.30.0.0/16", "172.30.0.1", "172.31.0.1", public=False, fronts=[41234])
    lines = v4.splitlines()
    allow = "-A OUTPUT -d 172.30.0.1/32 -p tcp --dport 41234 -j ACCEPT"
    assert lines.index(allow) < lines.index("-A OUTPUT -d 172.30.0.1/32 -j REJECT")
    assert [line for line in lines if "172.30.0.1/32" in line and "ACCEPT" in line] == [allow]
    assert "41234" not in firewall_rules("172.30.0.0/16", "172.30.0.1", "172.31.0.1", public=False)[0]


@pytest.mark.docker
def test_keyed_service_on_docker(docker_engine: Any, base_image: str, tmp_path: Path) -> None:
    record = Leftovers(docker_engine)
    name = f"k{uuid.uuid4().hex[:10]}"
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "Dockerfile").write_text(DOCKERFILE)
    (tmp_path / "app" / "app.py").write_text(APP)
    web_port, port = free_port(), free_port()
    (tmp_path / "mesh.toml").write_text(TOML.format(name=name, web=web_port, sandbox=port))
    mesh = DockerMesh(docker_engine, tmp_path, name, record)

    def keyed_containers() -> list[dict[str, Any]]:
        mesh.remember()
        return [c for c in mesh.containers() if "mesh.key" in c["Labels"]]

    def keyed_rows() -> list[dict[str, Any]]:
        return [i for i in mesh.ps()["instances"] if i["service"] == "sandbox" and i["instance"] != "front"]

    def call(key: str) -> tuple[int, Any]:
        return get(f"http://127.0.0.1:{port}/", {"X-Session": key})

    try:
        up = mesh.mesh("up", "-d", "--runtime", "docker")
        assert up.returncode == 0, up.stdout + up.stderr
        state = mesh.ps()
        [front] = [i for i in state["instances"] if i["instance"] == "front"]
        assert front["state"] == "running" and front["service"] == "sandbox"
        gateway = front["addresses"]["mesh"].rsplit(":", 1)[0]
        assert not gateway.startswith("127.")  # on the mesh network's gateway
        assert keyed_rows() == [] and keyed_containers() == []  # nothing keyed starts with the mesh

        # 20 concurrent first requests of one key: one container pair, serving them all.
        began = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda _: call("alice"), range(20)))
        cold = time.monotonic() - began
        assert all(status == 200 for status, _ in results), results
        assert len({(body["host"], body["pid"]) for _, body in results}) == 1
        first = results[0][1]
        pair = keyed_containers()
        assert sorted(c["Labels"]["mesh.role"] for c in pair) == ["app", "sidecar"], pair
        assert all(c["State"] == "running" for c in pair)
        print(f"\nfirst request of a key (20 at once) on docker: {cold:.2f}s")

        # The same key: the same containers.
        status, again = call("alice")
        assert status == 200 and (again["host"], again["pid"]) == (first["host"], first["pid"])

        # Through another service's sidecar, by name: the registry lists the front on the gateway,
        # the sidecar's firewall lets it out to it, the app sees the caller.
        status, body = get(f"http://127.0.0.1:{web_port}/call", {"X-Session": "alice"})
        assert status == 200, body
        assert body["host"] == first["host"] and body["peer"] == "web"

        [alice] = keyed_rows()
        assert alice["key"] == "alice" and alice["state"] == "running", alice
        assert {c["status"] for c in alice["containers"].values()} == {"running"}

        # Idle: put to sleep, its containers removed; `mesh ps` says sleeping, not a problem.
        assert wait_for(lambda: keyed_containers() == [], 30), keyed_containers()
        [asleep] = keyed_rows()
        assert asleep["state"] == "sleeping" and not asleep.get("problem"), asleep

        # Woken transparently: new containers for the same key.
        status, woken = call("alice")
        assert status == 200 and woken["host"] != first["host"], woken
        assert len(keyed_containers()) == 2
        [row] = keyed_rows()
        assert row["state"] == "running" and row["label"] == alice["label"]

        # max = 2: a third key puts the least recently used idle one to sleep (its containers go).
        assert call("bob")[0] == 200
        assert call("alice")[0] == 200  # bob is now the least recently used
        assert call("carol")[0] == 200
        assert wait_for(lambda: len(keyed_containers()) == 4, 30), keyed_containers()
        states = {i["key"]: i["state"] for i in keyed_rows()}
        assert states == {"alice": "running", "bob": "sleeping", "carol": "running"}, states

        # No key: 400, nothing starts.
        status, text = get(f"http://127.0.0.1:{port}/")
        assert status == 400 and "X-Session" in text

        down = mesh.mesh("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert mesh.containers() == [] and mesh.networks() == []
        assert all(i["state"] == "stopped" for i in mesh.ps()["instances"])
    finally:
        failures = mesh.cleanup()
        assert not failures, failures
