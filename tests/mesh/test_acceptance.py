"""The whole contract at once, the way a user meets it: `mesh up` on two echo services.

A user plugin from a folder outside the project, a declared and an undeclared
route, 8 MiB up and 32 MiB down through the sidecars, a plugin that raises,
and SIGTERM stopping everything.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mesh.control.runtimes.base import group_alive, pid_alive

from ..control.test_up import Runs, free_port, runs, state_of, wait_phase  # noqa: F401

ECHO = '''
import hashlib, os, sys, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1]

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, body, content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/healthz":
            return self.reply(200, b"ok")
        if self.path.startswith("/big"):
            return self.reply(200, b"d" * (32 << 20), "application/octet-stream")
        if self.path.startswith("/call/"):
            # Through HTTP_PROXY, by name: urllib honours the environment.
            target = self.path[len("/call/"):]
            try:
                with urllib.request.urlopen(f"http://{target}", timeout=20) as r:
                    return self.reply(r.status, r.read())
            except urllib.error.HTTPError as e:
                return self.reply(e.code, e.read())
        self.reply(200, f"{NAME} {self.path} peer={self.headers.get('x-mesh-peer')}".encode())

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path.startswith("/relay/"):
            request = urllib.request.Request(f"http://{self.path[len('/relay/'):]}", data=body, method="POST")
            with urllib.request.urlopen(request, timeout=20) as r:
                return self.reply(r.status, r.read())
        self.reply(200, f"{NAME} got {len(body)} {hashlib.sha256(body).hexdigest()}".encode())

    def log_message(self, *args):
        pass

import urllib.error
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''

PLUGINS = '''
from mesh import Plugin, Response

class Tag(Plugin):
    def __init__(self, value: str):
        self.value = value

    async def handle(self, request, call_next):
        if request.path == "/explode":
            raise RuntimeError("the plugin broke")
        response = await call_next(request)
        response.headers["X-Tag"] = self.value
        return response
'''

TOML = '''
[mesh]
name = "accept"
plugin_path = ["{plugins}"]

[services.front]
command = "python echo.py front"
expose = {port}
health = "/healthz"
plugins = [ {{ use = "tag.py:Tag", value = "from-user-plugin" }} ]

[services.back]
command = "python echo.py back"
health = "/healthz"

[[routes]]
from = "front"
to = "back"
paths = ["/ok", "/ok/*", "/big", "/upload"]
'''

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url: str, data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with NO_PROXY.open(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.slow
def test_two_echo_services_end_to_end(tmp_path: Path, tmp_path_factory, runs: Runs) -> None:
    plugins = tmp_path_factory.mktemp("user-plugins")
    (plugins / "tag.py").write_text(PLUGINS)
    port = free_port()
    folder = runs.folder(tmp_path, TOML.format(plugins=plugins, port=port), app=ECHO)
    (folder / "echo.py").write_text(ECHO)
    popen = runs.up(folder)
    state = wait_phase(folder, popen, "running")
    base = f"http://127.0.0.1:{port}"

    status, headers, body = call(base + "/hello")
    assert status == 200 and body.startswith(b"front /hello") and headers["X-Tag"] == "from-user-plugin"

    # Declared route, by name through HTTP_PROXY; the receiving app learns the caller.
    status, _, body = call(base + "/call/back/ok/1")
    assert status == 200 and body == b"back /ok/1 peer=front"
    # Undeclared path: refused with a reason naming caller, target and path.
    status, _, body = call(base + "/call/back/secret")
    assert status == 403 and b"'front'" in body and b"'back'" in body and b"/secret" in body

    # 8 MiB up, through front's sidecar and on to back through both sidecars.
    upload = os.urandom(8 << 20)
    digest = hashlib.sha256(upload).hexdigest().encode()
    status, _, body = call(base + "/upload", upload)
    assert status == 200 and body == b"front got %d %s" % (len(upload), digest)
    status, _, body = call(base + "/relay/back/upload", upload)
    assert status == 200 and body == b"back got %d %s" % (len(upload), digest)

    # 32 MiB down, from back through both sidecars.
    status, _, body = call(base + "/call/back/big")
    assert status == 200 and len(body) == 32 << 20 and body.strip(b"d") == b""

    # A plugin that raises: 500 with the request id; the traceback is in the log; serving goes on.
    status, headers, body = call(base + "/explode")
    assert status == 500 and headers["x-request-id"].encode() in body and b"the plugin broke" not in body
    deadline = time.monotonic() + 5
    while b"the plugin broke" not in (folder / "up.out").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    log = (folder / "up.out").read_text()
    assert "the plugin broke" in log and headers["x-request-id"] in log
    assert call(base + "/hello")[0] == 200

    state = state_of(folder)
    pids = [p for inst in state["instances"] for p in inst["pids"].values()]
    pgids = [g for inst in state["instances"] for g in inst.get("pgids", {}).values()]
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(30) == 0
    assert not any(pid_alive(p) for p in pids)
    assert not any(group_alive(g) for g in pgids)
