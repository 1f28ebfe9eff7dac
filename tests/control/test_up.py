"""`mesh up`, `mesh ps` and `mesh down` on the process runtime, end to end.

Each test runs the real command in a subprocess against a small mesh in a
temporary folder. Every process a test starts is recorded (the controller's
Popen, the pids and process groups in state.json, the run id every app and
sidecar inherits) and killed at teardown if it is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
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

from mesh import config
from mesh.control.controller import Console, Controller, StateDir
from mesh.control.runtimes.base import group_alive, pid_alive, run_processes
from mesh.sidecar.identity import describe

pytestmark = pytest.mark.slow

APP = '''
import json, os, shutil, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KEYS = ["PORT", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "MESH_SERVICE",
        "MESH_INSTANCE", "COLOUR"]

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"env": {k: os.environ.get(k) for k in KEYS},
                           "python": shutil.which("python"), "cwd": os.getcwd(),
                           "peer": self.headers.get("x-mesh-peer")}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

if os.environ.get("EXIT_AFTER"):
    threading.Timer(float(os.environ["EXIT_AFTER"]), lambda: os._exit(4)).start()
print("app", os.environ["MESH_SERVICE"], os.environ["MESH_INSTANCE"], "serving", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with NO_PROXY.open(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def mesh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


class Runs:
    """Starts `mesh up` and remembers everything it started, to clean it up whatever happens."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[bytes]] = []
        self.folders: list[Path] = []

    def folder(self, tmp_path: Path, toml: str, app: str = APP) -> Path:
        (tmp_path / "app.py").write_text(app)
        (tmp_path / "mesh.toml").write_text(toml)
        self.folders.append(tmp_path)
        return tmp_path

    def up(self, folder: Path, *args: str) -> subprocess.Popen[bytes]:
        out = open(folder / "up.out", "wb")
        popen = subprocess.Popen([sys.executable, "-m", "mesh", "up", str(folder), *args],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
        out.close()
        self.popens.append(popen)
        return popen

    def cleanup(self) -> None:
        for popen in self.popens:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        for folder in self.folders:
            for state in folder.glob(".mesh/*/state.json"):
                data = json.loads(state.read_text())
                controller = data["controller"]["pid"]
                # Only a controller still holding its lock, and never this process (a test may run one here).
                if StateDir(state.parent).running() and controller != os.getpid():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(controller, signal.SIGKILL)
                for pgid in recorded(data, "pgids"):
                    if group_alive(pgid):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(pgid, signal.SIGKILL)
                for pid in run_processes(data.get("run", "")):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def runs() -> Iterator[Runs]:
    keeper = Runs()
    try:
        yield keeper
    finally:
        keeper.cleanup()


def recorded(state: dict[str, Any], key: str = "pids") -> list[int]:
    return [p for inst in state["instances"] for p in inst.get(key, {}).values()]


def state_of(folder: Path) -> dict[str, Any] | None:
    files = list(folder.glob(".mesh/*/state.json"))
    if not files:
        return None
    try:
        return json.loads(files[0].read_text())
    except ValueError:  # pragma: no cover - the controller renames whole files in
        return None


def wait_phase(folder: Path, popen: subprocess.Popen[bytes], phase: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = state_of(folder)
        if state and state["controller"]["pid"] == popen.pid and state["phase"] == phase:
            return state
        if popen.poll() is not None:
            pytest.fail(f"mesh up exited with {popen.returncode}:\n{output(folder)}")
        time.sleep(0.05)
    pytest.fail(f"mesh up not {phase} after {timeout}s:\n{output(folder)}")


def output(folder: Path) -> str:
    return (folder / "up.out").read_text(errors="replace")


def wait_until(check: Any, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_all_gone(state: dict[str, Any]) -> None:
    assert not [p for p in recorded(state) if pid_alive(p)]
    assert not [g for g in recorded(state, "pgids") if group_alive(g)]
    assert run_processes(state["run"]) == []


def test_up_serves_then_sigterm_stops_everything(tmp_path: Path, runs: Runs) -> None:
    public = free_port()
    folder = runs.folder(tmp_path, f"""
[mesh]
name = "two"

[services.api]
# The shell leaves a background child in the app's process group: stopping must reach it too.
command = "sleep 300 & python app.py"
replicas = 2
expose = {public}
health = "/healthz"
env = {{ COLOUR = "blue" }}
""")
    popen = runs.up(folder)
    state = wait_phase(folder, popen, "running")

    assert [(i["label"], i["state"]) for i in state["instances"]] == [("api.1", "running"), ("api.2", "running")]
    first, second = state["instances"]
    assert first["public"] == f"http://127.0.0.1:{public}"
    assert second["public"] not in (None, first["public"])  # a port of its own: one port, one listener
    assert json.loads(get(f"{second['public']}/env")[2])["env"]["MESH_INSTANCE"] == "2"
    status, headers, body = get(f"http://127.0.0.1:{public}/env")
    assert status == 200
    seen = json.loads(body)
    outbound = first["addresses"]["outbound"]
    assert seen["env"] == {
        "PORT": first["addresses"]["app"].rpartition(":")[2], "COLOUR": "blue",
        "HTTP_PROXY": f"http://{outbound}", "http_proxy": f"http://{outbound}",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "MESH_SERVICE": "api", "MESH_INSTANCE": "1",
    }
    python = subprocess.run([seen["python"], "-c", "import sys; print(sys.executable)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert python == sys.executable  # `python` in a command is the Python running mesh
    assert Path(seen["cwd"]) == folder
    assert seen["peer"] is None  # outside callers never name a peer

    ps = mesh("ps", "--json", str(folder))
    assert ps.returncode == 0
    listed = json.loads(ps.stdout)
    assert listed["controller"] == {"pid": popen.pid, "running": True}
    assert [i["state"] for i in listed["instances"]] == ["running", "running"]
    assert all(pid_alive(p) for p in recorded(listed))
    table = mesh("ps", str(folder)).stdout
    assert "api" in table and "running" in table and f"http://127.0.0.1:{public}" in table

    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=30) == 0
    assert_all_gone(listed)
    assert state_of(folder)["phase"] == "stopped"

    out = output(folder)
    assert "app api 1 serving" in out and "app api 2 serving" in out
    assert any(line.startswith("api.1 ") and "| app api 1 serving" in line for line in out.splitlines())
    assert any(line.startswith("api.2.sidecar |") for line in out.splitlines())
    assert f"http://127.0.0.1:{public}" in out  # the table
    assert "mesh 'two' stopped" in out


def test_a_service_that_exits_fails_the_start_with_its_last_lines(tmp_path: Path, runs: Runs) -> None:
    (tmp_path / "broken.py").write_text(
        "import sys\nfor i in range(1, 31):\n    print(f'line {i}')\n"
        "print('boom: DATABASE_URL is not set', file=sys.stderr)\nsys.exit(3)\n")
    folder = runs.folder(tmp_path, """
[mesh]
name = "bad"

[services.good]
command = "python app.py"

[services.broken]
command = "python broken.py"
""")
    popen = runs.up(folder)
    assert popen.wait(timeout=30) == 1
    out = output(folder)
    assert "mesh up: broken failed to start: the app exited with code 3 before it was ready" in out
    report = out[out.index("last output of broken:"):]
    assert "broken | boom: DATABASE_URL is not set" in report
    assert "broken | line 30" in report and "broken | line 12" in report
    assert "line 11\n" not in report  # only the last 20 lines
    state = state_of(folder)
    assert state["phase"] == "failed" and "boom" in state["error"]
    assert all(i["state"] == "stopped" for i in state["instances"])
    assert_all_gone(state)


def test_a_service_not_ready_in_time(tmp_path: Path, runs: Runs) -> None:
    folder = runs.folder(tmp_path, """
[mesh]
name = "slow"

[services.sleepy]
command = "echo warming up; exec sleep 300"
health = "/ready"
""")
    popen = runs.up(folder, "--timeout", "1")
    assert popen.wait(timeout=30) == 1
    out = output(folder)
    assert "sleepy failed to start: not ready after 1s: waited for GET /ready answering 200" in out
    assert "sleepy | warming up" in out
    assert_all_gone(state_of(folder))


def test_a_crash_after_start_is_reported(tmp_path: Path, runs: Runs) -> None:
    folder = runs.folder(tmp_path, """
[mesh]
name = "crash"

[services.flaky]
command = "python app.py"
env = { EXIT_AFTER = "1.5" }
""")
    popen = runs.up(folder)
    wait_phase(folder, popen, "running")
    assert wait_until(lambda: "exited with code 4" in output(folder))
    out = output(folder)
    assert "flaky: the app exited with code 4" in out
    assert "flaky | app flaky 1 serving" in out
    # A crash is restarted (mesh.lifecycle): with backoff, counted in `mesh ps --json`.
    assert wait_until(lambda: "flaky: restarted (restart 1)" in output(folder))
    listed = json.loads(mesh("ps", "--json", str(folder)).stdout)
    (instance,) = listed["instances"]
    assert instance["restarts"] >= 1
    assert popen.poll() is None  # the rest of the mesh keeps running
    popen.send_signal(signal.SIGINT)  # Ctrl-C
    assert popen.wait(timeout=30) == 0
    assert_all_gone(listed)


def test_stopping_while_starting(tmp_path: Path, runs: Runs) -> None:
    folder = runs.folder(tmp_path, """
[mesh]
name = "early"

[services.sleepy]
command = "exec sleep 300"
health = "/ready"
""")
    popen = runs.up(folder)
    assert wait_until(lambda: (s := state_of(folder)) is not None and len(recorded(s)) == 2)
    state = state_of(folder)
    assert state["phase"] == "starting" and state["instances"][0]["state"] == "starting"
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=30) == 0
    assert state_of(folder)["phase"] == "stopped"
    assert_all_gone(state)


def test_an_exposed_port_in_use(tmp_path: Path, runs: Runs) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        folder = runs.folder(tmp_path, f"""
[mesh]
name = "busy"

[services.web]
command = "python app.py"
expose = {port}
""")
        popen = runs.up(folder)
        assert popen.wait(timeout=30) == 1
    assert f"cannot expose it on 127.0.0.1:{port}: the port is in use (services.web.expose)" in output(folder)
    assert state_of(folder)["instances"] == []


def test_detach_ps_down(tmp_path: Path, runs: Runs) -> None:
    public = free_port()
    folder = runs.folder(tmp_path, f"""
[mesh]
name = "bg"

[services.front]
command = "python app.py"
expose = {public}

[services.back]
command = "python app.py"
""")
    up = mesh("up", "-d", str(folder))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "mesh 'bg' is up in the background" in up.stdout
    assert f"http://127.0.0.1:{public}" in up.stdout

    listed = json.loads(mesh("ps", "--json", str(folder)).stdout)
    assert listed["phase"] == "running" and listed["controller"]["running"]
    controller = listed["controller"]["pid"]
    assert pid_alive(controller)
    assert [(i["service"], i["state"]) for i in listed["instances"]] == [("front", "running"), ("back", "running")]
    assert all(pid_alive(p) for p in recorded(listed))
    assert get(f"http://127.0.0.1:{public}/")[0] == 200

    again = mesh("up", "-d", str(folder))
    assert again.returncode == 1 and "already up" in again.stderr

    down = mesh("down", str(folder))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "mesh 'bg' stopped" in down.stdout
    assert not pid_alive(controller)
    assert_all_gone(listed)
    after = json.loads(mesh("ps", "--json", str(folder)).stdout)
    assert after["controller"]["running"] is False
    assert [i["state"] for i in after["instances"]] == ["stopped", "stopped"]
    assert "app front 1 serving" in (folder / ".mesh" / "bg" / "up.log").read_text()
    assert "is not running" in mesh("down", str(folder)).stdout


def test_detach_reports_a_failed_start(tmp_path: Path, runs: Runs) -> None:
    folder = runs.folder(tmp_path, """
[mesh]
name = "bgfail"

[services.broken]
command = "echo cannot bind; exit 5"
""")
    up = mesh("up", "-d", str(folder))
    assert up.returncode == 1
    assert "broken failed to start: the app exited with code 5" in up.stderr
    assert "broken | cannot bind" in up.stderr
    state = state_of(folder)
    assert not pid_alive(state["controller"]["pid"])
    assert_all_gone(state)


def test_down_stops_what_a_killed_controller_left(tmp_path: Path, runs: Runs) -> None:
    folder = runs.folder(tmp_path, """
[mesh]
name = "orphans"

[services.one]
command = "python app.py"
""")
    assert mesh("up", "-d", str(folder)).returncode == 0
    state = state_of(folder)
    os.kill(state["controller"]["pid"], signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(state["controller"]["pid"]))
    assert all(pid_alive(p) for p in recorded(state))  # nobody stopped them

    down = mesh("down", str(folder))
    assert down.returncode == 0
    assert "its controller is gone; stopping" in down.stdout and "left behind" in down.stdout
    assert wait_until(lambda: not any(pid_alive(p) for p in recorded(state)))
    assert_all_gone(state)


async def test_certificates_are_renewed_while_running(tmp_path: Path, runs: Runs) -> None:
    folder = runs.folder(tmp_path, """
[mesh]
name = "renew"

[services.one]
command = "python app.py"
""")
    loaded = config.load(folder)
    out = io.StringIO()
    controller = Controller(loaded, timeout=20, console=Console(out), cert_lifetime=3)
    task = asyncio.ensure_future(controller.run())
    cert = loaded.state_dir / "certs" / "one" / "cert.pem"
    try:
        for _ in range(400):
            if controller.phase != "starting" or task.done():
                break
            await asyncio.sleep(0.05)
        assert controller.phase == "running", out.getvalue()
        first = describe(cert).not_after
        for _ in range(200):
            if "certificates reloaded" in out.getvalue():
                break
            await asyncio.sleep(0.05)
        assert "one.sidecar | " in out.getvalue()
        assert "certificates reloaded" in out.getvalue()
        assert describe(cert).not_after > first
        state = controller.state()
    finally:
        controller.stop()
        assert await asyncio.wait_for(task, 30) == 0
    assert_all_gone(state)


def test_admin_listeners_answer_only_the_controller_and_the_operator(tmp_path: Path, runs: Runs) -> None:
    folder = runs.folder(tmp_path, """
[mesh]
name = "guarded"

[services.web]
command = "python app.py"

[services.api]
command = "python app.py"
replicas = 2

[[routes]]
from = "web"
to = "api"
""")
    popen = runs.up(folder)
    state = wait_phase(folder, popen, "running")
    files = StateDir(folder / ".mesh" / "guarded")
    token_file = files.path / "admin.token"
    assert os.stat(token_file).st_mode & 0o777 == 0o600 and os.stat(files.path).st_mode & 0o777 == 0o700
    token = token_file.read_text().strip()
    api = sorted(i["addresses"]["mesh"] for i in state["instances"] if i["service"] == "api")

    def admin(inst: dict[str, Any], method: str, path: str, body: bytes | None = None,
              auth: str | None = None) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://{inst['addresses']['admin']}{path}", method=method, data=body)
        if auth:
            request.add_header("Authorization", f"Bearer {auth}")
        try:
            with NO_PROXY.open(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    for inst in state["instances"]:
        # What an app of this mesh (any local process without the token) gets.
        assert admin(inst, "GET", "/healthz")[0] == 200 and admin(inst, "GET", "/readyz")[0] == 200
        assert admin(inst, "GET", "/config")[0] == 401
        assert admin(inst, "GET", "/registry")[0] == 401
        assert admin(inst, "PUT", "/registry", b'{"services": {"api": ["127.0.0.1:9"]}}')[0] == 401
        assert admin(inst, "PUT", "/registry", b'{"services": {"api": []}}', auth="guess")[0] == 401
        assert admin(inst, "POST", "/certs/reload")[0] == 401
        # The operator, with the run's token: the controller's pushes are there.
        status, body = admin(inst, "GET", "/config", auth=token)
        assert status == 200 and json.loads(body)["service"] == inst["service"]
        assert wait_until(lambda inst=inst: sorted(json.loads(admin(inst, "GET", "/registry", auth=token)[1])
                                                   ["services"]["api"]) == api, 30)
    # Calls still go where the controller says.
    web = next(i for i in state["instances"] if i["service"] == "web")
    request = urllib.request.Request(f"http://{web['addresses']['outbound']}/x", headers={"Host": "api"})
    with NO_PROXY.open(request, timeout=10) as response:
        assert response.status == 200
    # The token is in no process's command line or environment, the apps' included.
    for pid in recorded(state):
        for what in ("cmdline", "environ"):
            assert token.encode() not in Path(f"/proc/{pid}/{what}").read_bytes(), (pid, what)
    assert f"--admin-token-file {token_file}" in " ".join(
        Path(f"/proc/{state['instances'][0]['pids']['sidecar']}/cmdline").read_bytes().decode().split("\0"))

    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=30) == 0


def _tls_status(address: str, folder: Path) -> int | str:
    """GET / on a mesh listener with the certificate in ``folder``: the status, or the error's name."""
    import http.client
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the caller's certificate is what is tested here
    ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        connection.request("GET", "/", headers={"X-Session": "s1"})
        return connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        connection.close()


def test_rotate_ca_on_a_running_mesh_then_the_old_ca_is_refused(tmp_path: Path, runs: Runs) -> None:
    from mesh.sidecar.identity import CA

    folder = runs.folder(tmp_path, """
[mesh]
name = "rot"

[services.web]
command = "python app.py"

[services.api]
command = "python app.py"

[services.box]
command = "python app.py"
instances = { key = "header:X-Session", sleep_after = "5m", start_timeout = "30s" }

[[routes]]
from = "web"
to = "api"

[[routes]]
from = "web"
to = "box"
""")
    popen = runs.up(folder)
    state = wait_phase(folder, popen, "running")
    by_label = {i["label"]: i for i in state["instances"]}
    web, api = by_label["web"], by_label["api"]
    front = next(i for i in state["instances"] if i.get("role") == "front")
    ca_folder = folder / ".mesh" / "rot" / "ca"

    def call(service: str) -> int:
        request = urllib.request.Request(f"http://{web['addresses']['outbound']}/x",
                                         headers={"Host": service, "X-Session": "s1"})
        try:
            with NO_PROXY.open(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert call("api") == 200 and call("box") == 200  # box: its instance for key s1 starts
    # A certificate for "web" from the first CA, kept aside: trusted now.
    old = CA.load_or_create(ca_folder, "rot")
    old.write_instance(tmp_path / "old-web", "web", lifetime=3600)
    assert _tls_status(api["addresses"]["mesh"], tmp_path / "old-web") == 200
    assert _tls_status(front["addresses"]["mesh"], tmp_path / "old-web") == 200

    def sidecars() -> dict[str, int]:
        now = state_of(folder) or {}
        return {i["label"]: i["pids"]["sidecar"] for i in now["instances"] if "sidecar" in i.get("pids", {})}

    before = sidecars()
    assert len(before) == 3, before  # web, api, box's instance for s1

    rotate = mesh("certs", str(folder), "--rotate-ca", timeout=120)  # returns once it is done
    assert rotate.returncode == 0, rotate.stdout + rotate.stderr + output(folder)
    assert "the old CA is trusted no more" in rotate.stdout
    assert "mesh CA rotated" in output(folder)
    assert (state_of(folder) or {})["ca_rotation"] == {"done": 1, "rotating": False, "error": None}

    new = (ca_folder / "ca.pem").read_bytes()
    assert new != old.cert_pem and not (ca_folder / "trust.pem").exists()
    certs = sorted((folder / ".mesh" / "rot" / "certs").iterdir())
    assert len(certs) == 4  # web, api, the box front, box's instance for s1
    assert all((c / "ca.pem").read_bytes() == new for c in certs)
    # Without a restart, the old CA's certificate is refused by sidecars and fronts alike...
    assert _tls_status(api["addresses"]["mesh"], tmp_path / "old-web") != 200
    assert _tls_status(front["addresses"]["mesh"], tmp_path / "old-web") != 200
    # ...and the mesh goes on, on the new CA, with the same processes.
    assert call("api") == 200 and call("box") == 200
    assert sidecars() == before and all(pid_alive(pid) for pid in before.values())

    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=30) == 0
