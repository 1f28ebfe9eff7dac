"""The examples: each one checks, and hello does what its README says when it runs."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mesh import config
from mesh.control.runtimes.procfs import group_alive, pid_alive, run_processes

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples").iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_has_a_readme_and_a_mesh_that_checks(example: Path) -> None:
    assert (example / "README.md").is_file()
    loaded = config.load(example)
    for service in loaded.services.values():
        if service.command:  # the files a command runs are there
            for word in service.command.split():
                if word.endswith(".py"):
                    assert (example / word).is_file(), word


def _shape(loaded: config.MeshConfig) -> dict[str, object]:
    return {
        "name": loaded.name,
        "services": {n: (s.expose, s.health, s.env, [p.use for p in s.plugin_specs],
                         (s.command or "").split()[-1].rpartition("/")[2])
                     for n, s in loaded.services.items()},
        "routes": [(r.source, r.to, r.paths, r.methods) for r in loaded.routes],
    }


def test_the_root_mesh_runs_hello() -> None:
    root, hello = config.load(REPO), config.load(REPO / "examples" / "hello")
    assert _shape(root) == _shape(hello)
    for service in root.services.values():
        script = service.command.split()[-1]
        assert (REPO / script).is_file()


def _get(url: str) -> tuple[int, dict[str, str], str]:
    try:
        with NO_PROXY.open(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def _tls_get(host: str, port: int, path: str, context: ssl.SSLContext) -> tuple[int, str]:
    connection = http.client.HTTPSConnection(host, port, context=context, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    """examples/hello copied, exposed on a free port instead of 8080."""
    folder = tmp_path / "hello"
    shutil.copytree(REPO / "examples" / "hello", folder, ignore=shutil.ignore_patterns(".mesh", "__pycache__"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    toml = folder / "mesh.toml"
    text, count = re.subn(r"(?m)^expose = 8080$", f"expose = {port}", toml.read_text())
    assert count == 1
    toml.write_text(text)
    return folder


@pytest.mark.slow
def test_hello_end_to_end(hello: Path) -> None:
    out = open(hello / "up.out", "wb")
    popen = subprocess.Popen([sys.executable, "-m", "mesh", "up", str(hello)], stdout=out,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    out.close()
    state_file = hello / ".mesh" / "hello" / "state.json"
    state: dict = {}
    try:
        deadline = time.monotonic() + 30
        while not (state_file.exists() and (state := json.loads(state_file.read_text()))["phase"] == "running"):
            assert popen.poll() is None, (hello / "up.out").read_text()
            assert time.monotonic() < deadline, (hello / "up.out").read_text()
            time.sleep(0.05)
        web = next(i for i in state["instances"] if i["service"] == "web")
        greeter = next(i for i in state["instances"] if i["service"] == "greeter")

        status, headers, body = _get(f"{web['public']}/?name=ann")
        assert status == 200
        assert headers["X-Served-By"] == "web"  # the user plugin, from plugin_path
        assert body == "web asked greeter, greeter said: Hello, ann! (called by web)\n"

        status, headers, body = _get(f"{web['public']}/forbidden")
        assert status == 403
        assert "no route allows 'web' to call GET /admin on 'greeter'" in body

        # greeter is not exposed; its mesh listener takes only mutual TLS with a mesh certificate.
        host, port = greeter["addresses"]["mesh"].split(":")
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            _get(f"http://{host}:{port}/hello")
        state_dir = hello / ".mesh" / "hello"
        anonymous = ssl.create_default_context(cafile=state_dir / "ca" / "ca.pem")
        anonymous.check_hostname = False
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _tls_get(host, int(port), "/hello", anonymous)
        as_web = ssl.create_default_context(cafile=state_dir / "ca" / "ca.pem")
        as_web.check_hostname = False
        as_web.load_cert_chain(state_dir / "certs" / "web" / "cert.pem", state_dir / "certs" / "web" / "key.pem")
        assert _tls_get(host, int(port), "/hello", as_web) == (200, "Hello, world! (called by web)\n")
        assert _tls_get(host, int(port), "/admin", as_web)[0] == 403

        popen.send_signal(signal.SIGTERM)
        assert popen.wait(timeout=30) == 0
        pids = [p for i in state["instances"] for p in i["pids"].values()]
        assert pids and not any(pid_alive(p) for p in pids)
        assert not any(group_alive(g) for i in state["instances"] for g in i["pgids"].values())
        assert run_processes(state["run"]) == []
        log = (hello / "up.out").read_text()
        assert "GET /?name=ann -> 200" in log and "denied: no route allows 'web'" in log
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
        for inst in state.get("instances", []):
            for pgid in inst.get("pgids", {}).values():
                if group_alive(pgid):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, signal.SIGKILL)
