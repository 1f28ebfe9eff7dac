"""Autoscaling (mesh.control.autoscale) on the docker runtime, against the real engine.

A pool ``scale = { min = 1, max = 2, cpu = 0.5, cooldown = "2s" }`` of an app FROM mesh/base with a
CPU-burning endpoint, exposed on 127.0.0.1. `mesh up -d --runtime docker` with a short window and
interval (MESH_AUTOSCALE_*); a bounded load (a fixed number of requests, a time limit) makes it add
a second instance (two running container pairs in `mesh ps --json`, the new one serving), and once
the load stops it goes back to one. `mesh down` at the end; then whatever is left, by recorded id.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from mesh.sidecar.admin import AdminToken, operator_token

from ..docker_support import Leftovers, base_image, docker_engine  # noqa: F401

APP = '''
import os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urlparse(self.path)
        if url.path == "/healthz":
            return self.reply(b"ok")
        end = time.process_time() + int(parse_qs(url.query).get("ms", ["0"])[0]) / 1000
        while time.process_time() < end:   # burn CPU
            pass
        self.reply(os.environ["MESH_INSTANCE"].encode())

    def reply(self, body):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
'''

DOCKERFILE = 'FROM mesh/base\nCOPY app.py /app/\nCMD ["python3", "/app/app.py"]\n'

MESH = '''
[mesh]
name = "{name}"

[services.pool]
build = "app"
port = 8000
expose = {expose}
health = "/healthz"
scale = {{ min = 1, max = 2, cpu = 0.5, cooldown = "2s" }}
'''

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
SHORT = {"MESH_AUTOSCALE_WINDOW": "2", "MESH_AUTOSCALE_INTERVAL": "0.25", "MESH_AUTOSCALE_DRAIN": "0.5"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with NO_PROXY.open(urllib.request.Request(url, headers=headers or {}), timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


class Pool:
    """The mesh in its folder; everything of it the engine holds, recorded by id for removal."""

    def __init__(self, client: Any, folder: Path, record: Leftovers) -> None:
        self.client = client
        self.folder = folder
        self.name = f"t{uuid.uuid4().hex[:10]}"
        self.record = record
        self.state = str((folder / ".mesh" / self.name).resolve())
        (folder / "app").mkdir(parents=True, exist_ok=True)
        (folder / "app" / "Dockerfile").write_text(DOCKERFILE)
        (folder / "app" / "app.py").write_text(APP)
        self.expose = free_port()
        (folder / "mesh.toml").write_text(MESH.format(name=self.name, expose=self.expose))

    def mesh(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([sys.executable, "-m", "mesh", *args, str(self.folder)],
                                  capture_output=True, text=True, timeout=timeout, cwd=self.folder,
                                  stdin=subprocess.DEVNULL, env={**os.environ, **SHORT})
        finally:
            self.remember()

    def remember(self) -> None:
        for container in self.client.api.containers(all=True, filters={"label": [f"mesh.state={self.state}"]}):
            if container["Id"] not in self.record.containers:
                self.record.container(container["Id"])
        for network in self.client.api.networks(filters={"label": [f"mesh.state={self.state}"]}):
            if network["Id"] not in self.record.networks:
                self.record.network(network["Id"])
        for image in self.client.api.images(filters={"label": [f"mesh.mesh={self.name}"]}):
            self.record.image(image["Id"])

    def ps(self) -> dict[str, Any]:
        done = self.mesh("ps", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def log(self) -> str:
        path = self.folder / ".mesh" / self.name / "up.log"
        return path.read_text() if path.exists() else ""

    def running(self) -> list[dict[str, Any]]:
        """The pool's instances with both containers running, per `mesh ps --json`."""
        found = [i for i in self.ps()["instances"] if i["service"] == "pool" and i["state"] == "running"]
        for inst in found:
            for container in inst["containers"].values():
                if container.get("id") and container["id"] not in self.record.containers:
                    self.record.container(container["id"])
        return [i for i in found if {c.get("status") for c in i["containers"].values()} == {"running"}
                and set(i["containers"]) == {"sidecar", "app"}]


def registry(admin: str, token: AdminToken) -> list[str]:
    status, body = get(admin, token.headers())
    return sorted(json.loads(body)["services"].get("pool", [])) if status == 200 else []


def until(check: Any, timeout: float, pause: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
    return True


@pytest.mark.docker
@pytest.mark.slow
def test_a_docker_pool_scales_up_under_load_and_down_after(docker_engine: Any, base_image: str,  # noqa: F811
                                                           tmp_path: Path) -> None:
    record = Leftovers(docker_engine)
    pool = Pool(docker_engine, tmp_path, record)
    try:
        up = pool.mesh("up", "-d", "--runtime", "docker")
        assert up.returncode == 0, f"mesh up -d failed:\n{up.stdout}\n{up.stderr}"
        first = pool.running()
        assert [i["label"] for i in first] == ["pool.1"], first
        public = f"http://127.0.0.1:{pool.expose}"
        assert get(f"{public}/burn?ms=1") == (200, b"1")

        # Bounded load: 3 clients, ~300ms of CPU per request, until scaled up, 40s or 300 requests.
        stop = threading.Event()
        sent = [0]
        lock = threading.Lock()

        def client() -> None:
            deadline = time.monotonic() + 40
            while not stop.is_set() and time.monotonic() < deadline:
                with lock:
                    if sent[0] >= 300:
                        return
                    sent[0] += 1
                get(f"{public}/burn?ms=300")

        loaders = [threading.Thread(target=client, daemon=True) for _ in range(3)]
        for thread in loaders:
            thread.start()
        try:
            scaled_up = until(lambda: len(pool.running()) == 2, 45)
        finally:
            stop.set()
            for thread in loaders:
                thread.join(30)
        assert scaled_up, pool.log()
        log = pool.log()
        added = [line for line in log.splitlines() if "adding pool.2" in line]
        assert added and "pool: average CPU " in added[0] and " over 2s across 1 instance > 0.5" in added[0], log
        assert "pool.2: ready after" in log

        # `mesh ps --json`: two running pairs of containers, distinct, the second one serving.
        two = pool.running()
        assert [i["label"] for i in two] == ["pool.1", "pool.2"], two
        ids = {c["id"] for i in two for c in i["containers"].values()}
        assert len(ids) == 4
        for inst in two:
            found = docker_engine.api.inspect_container(inst["containers"]["app"]["id"])
            assert found["State"]["Running"] and found["Config"]["Labels"]["mesh.role"] == "app"
        second = two[1]["public"]
        assert second.startswith("http://127.0.0.1:") and second != public, second
        assert get(f"{second}/burn?ms=1") == (200, b"2")
        admin = f"http://{two[0]['addresses']['admin']}/registry"
        token = operator_token(Path(pool.state))
        assert token is not None
        assert until(lambda: registry(admin, token) == [f"pool-1.{pool.name}:15001", f"pool-2.{pool.name}:15001"],
                     10), registry(admin, token)  # pushed to the sidecars

        # No load: below 0.25 for the 2s cooldown: pool.2 is drained and removed.
        assert until(lambda: [i["label"] for i in pool.running()] == ["pool.1"]
                     and "pool.2: stopped (scaled down)" in pool.log(), 45), pool.log()
        log = pool.log()
        removed = [line for line in log.splitlines() if "removing pool.2" in line]
        assert removed and " < 0.25 for 2s: removing pool.2 (draining 0.5s first)" in removed[0], log
        gone = [c["id"] for c in two[1]["containers"].values()]
        assert not [c for c in docker_engine.api.containers(all=True, filters={"id": gone})]
        assert get(f"{public}/burn?ms=1") == (200, b"1")
        assert registry(admin, token) == [f"pool-1.{pool.name}:15001"]
        print(f"\nrequests sent: {sent[0]}; decisions:\n" + "\n".join(added + removed))

        down = pool.mesh("down")
        assert down.returncode == 0 and f"mesh '{pool.name}' stopped" in down.stdout, down.stdout + down.stderr
        assert docker_engine.api.containers(all=True, filters={"label": [f"mesh.state={pool.state}"]}) == []
    finally:
        try:
            pool.mesh("down", timeout=120)
        except Exception:  # noqa: BLE001 - what is left goes by id below
            pass
        failures = record.remove_all()
        assert not failures, f"could not remove what the test created: {failures}"
