"""`mesh up`, `mesh ps` and `mesh down` on the process runtime, end to end.

Each test runs the real command in a subprocess against a small mesh in a
temporary folder (tests/harness.py's ``make_mesh``), which records every
process the mesh starts (the controller, the pids and process groups in
state.json, the run id every app and sidecar inherits) and kills it at
teardown if it is still there.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mesh.control.runtimes.procfs import pid_alive
from mesh.sidecar.identity import describe

from ..harness import Answer, MeshMaker, assert_all_gone, by_label, eventually, fetch, free_port, recorded, wait_until

pytestmark = pytest.mark.slow


def test_up_serves_then_sigterm_stops_everything(make_mesh: MeshMaker) -> None:
    public = free_port()
    mesh = make_mesh("two", f"""
[services.api]
# The shell leaves a background child in the app's process group: stopping must reach it too.
command = "sleep 300 & python app.py"
replicas = 2
expose = {public}
health = "/healthz"
env = {{ COLOUR = "blue" }}
""")
    popen = mesh.up()
    state = mesh.wait_phase("running")

    assert [(i["label"], i["state"]) for i in state["instances"]] == [("api.1", "running"), ("api.2", "running")]
    first, second = state["instances"]
    assert first["public"] == second["public"] == f"http://127.0.0.1:{public}"  # one socket, both serve it
    wait_until(lambda: fetch(f"http://127.0.0.1:{public}/env").json()["env"]["MESH_INSTANCE"] == "2",
               timeout=30, what="the second instance answering on the public port")
    status, headers, body = fetch(f"http://127.0.0.1:{public}/env")
    assert status == 200
    seen = json.loads(body)
    me = first if seen["env"]["MESH_INSTANCE"] == "1" else second
    outbound = me["addresses"]["outbound"]
    assert seen["env"] == {
        "PORT": me["addresses"]["app"].rpartition(":")[2], "COLOUR": "blue",
        "HTTP_PROXY": f"http://{outbound}", "http_proxy": f"http://{outbound}",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
        "MESH_SERVICE": "api", "MESH_INSTANCE": str(me["instance"]),
    }
    python = subprocess.run([seen["python"], "-c", "import sys; print(sys.executable)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert python == sys.executable  # `python` in a command is the Python running mesh
    assert Path(seen["cwd"]) == mesh.folder
    assert seen["peer"] is None  # outside callers never name a peer

    listed = mesh.ps()
    assert {k: listed["controller"][k] for k in ("pid", "running")} == {"pid": popen.pid, "running": True}
    assert [i["state"] for i in listed["instances"]] == ["running", "running"]
    assert all(pid_alive(p) for p in recorded(listed))
    table = mesh.run("ps").stdout
    assert "api" in table and "running" in table and f"http://127.0.0.1:{public}" in table

    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=30) == 0
    assert_all_gone(listed)
    assert mesh.state()["phase"] == "stopped"

    out = mesh.output()
    assert "app api 1 serving" in out and "app api 2 serving" in out
    assert any(line.startswith("api.1 ") and "| app api 1 serving" in line for line in out.splitlines())
    assert any(line.startswith("api.2.sidecar |") for line in out.splitlines())
    assert f"http://127.0.0.1:{public}" in out  # the table
    assert "mesh 'two' stopped" in out


def test_a_service_that_exits_fails_the_start_with_its_last_lines(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("bad", """
[services.good]
command = "python app.py"

[services.broken]
command = "python broken.py"
""", files={"broken.py": "import sys\nfor i in range(1, 31):\n    print(f'line {i}')\n"
                         "print('boom: DATABASE_URL is not set', file=sys.stderr)\nsys.exit(3)\n"})
    popen = mesh.up()
    assert popen.wait(timeout=30) == 1
    out = mesh.output()
    assert "mesh up: broken failed to start: the app exited with code 3 before it was ready" in out
    report = out[out.index("last output of broken:"):]
    assert "broken | boom: DATABASE_URL is not set" in report
    assert "broken | line 30" in report and "broken | line 12" in report
    assert "line 11\n" not in report  # only the last 20 lines
    state = mesh.state()
    assert state["phase"] == "failed" and "boom" in state["error"]
    assert all(i["state"] == "stopped" for i in state["instances"])
    assert_all_gone(state)


# A service whose app never answers its health check.
NEVER_READY = """
[services.sleepy]
command = "{command}"
health = "/ready"
"""


def test_a_service_not_ready_in_time(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("slow", NEVER_READY.format(command="echo warming up; exec sleep 300"))
    popen = mesh.up("--timeout", "1")
    assert popen.wait(timeout=30) == 1
    out = mesh.output()
    assert "sleepy failed to start: not ready after 1s: waited for GET /ready answering 200" in out
    assert "sleepy | warming up" in out
    assert_all_gone(mesh.state())


def test_a_crash_after_start_is_reported(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("crash", """
[services.flaky]
command = "python app.py"
env = { EXIT_AFTER = "1.5" }
""")
    popen = mesh.up()
    mesh.wait_phase("running")
    wait_until(lambda: "exited with code 4" in mesh.output(), what=mesh.output)
    out = mesh.output()
    assert "flaky: the app exited with code 4" in out
    assert "flaky | app flaky 1 serving" in out
    # A crash is restarted (mesh.lifecycle): with backoff, counted in `mesh ps --json`.
    wait_until(lambda: "flaky: restarted (restart 1)" in mesh.output(), what=mesh.output)
    listed = mesh.ps()
    (instance,) = listed["instances"]
    assert instance["restarts"] >= 1
    assert popen.poll() is None  # the rest of the mesh keeps running
    popen.send_signal(signal.SIGINT)  # Ctrl-C
    assert popen.wait(timeout=30) == 0
    assert_all_gone(listed)


def test_stopping_while_starting(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("early", NEVER_READY.format(command="exec sleep 300"))
    popen = mesh.up()
    wait_until(lambda: (s := mesh.state()) is not None and len(recorded(s)) == 2, what="both started")
    state = mesh.state()
    assert state["phase"] == "starting" and state["instances"][0]["state"] == "starting"
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=30) == 0
    assert mesh.state()["phase"] == "stopped"
    assert_all_gone(state)


def test_an_exposed_port_in_use(make_mesh: MeshMaker) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        mesh = make_mesh("busy", f"""
[services.web]
command = "python app.py"
expose = {port}
""")
        popen = mesh.up()
        assert popen.wait(timeout=30) == 1
    assert f"cannot expose it on 127.0.0.1:{port}: the port is in use (services.web.expose)" in mesh.output()
    assert mesh.state()["instances"] == []


def test_detach_ps_down(make_mesh: MeshMaker) -> None:
    public = free_port()
    mesh = make_mesh("bg", f"""
[services.front]
command = "python app.py"
expose = {public}

[services.back]
command = "python app.py"
""")
    up = mesh.run("up", "-d")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "mesh 'bg' is up in the background" in up.stdout
    assert f"http://127.0.0.1:{public}" in up.stdout

    listed = mesh.ps()
    assert listed["phase"] == "running" and listed["controller"]["running"]
    controller = listed["controller"]["pid"]
    assert pid_alive(controller)
    assert [(i["service"], i["state"]) for i in listed["instances"]] == [("front", "running"), ("back", "running")]
    assert all(pid_alive(p) for p in recorded(listed))
    assert fetch(f"http://127.0.0.1:{public}/").status == 200

    again = mesh.run("up", "-d")
    assert again.returncode == 1 and "already up" in again.stderr

    down = mesh.run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "mesh 'bg' stopped" in down.stdout
    assert not pid_alive(controller)
    assert_all_gone(listed)
    after = mesh.ps()
    assert after["controller"]["running"] is False
    assert [i["state"] for i in after["instances"]] == ["stopped", "stopped"]
    assert "app front 1 serving" in mesh.log()
    assert "is not running" in mesh.run("down").stdout


def test_detach_reports_a_failed_start(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("bgfail", """
[services.broken]
command = "echo cannot bind; exit 5"
""")
    up = mesh.run("up", "-d")
    assert up.returncode == 1
    assert "broken failed to start: the app exited with code 5" in up.stderr
    assert "broken | cannot bind" in up.stderr
    state = mesh.state()
    assert not pid_alive(state["controller"]["pid"])
    assert_all_gone(state)


def test_down_stops_what_a_killed_controller_left(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("orphans", """
[services.one]
command = "python app.py"
""")
    assert mesh.run("up", "-d").returncode == 0
    state = mesh.state()
    os.kill(state["controller"]["pid"], signal.SIGKILL)
    wait_until(lambda: not pid_alive(state["controller"]["pid"]), what="the controller is gone")
    assert all(pid_alive(p) for p in recorded(state))  # nobody stopped them

    down = mesh.run("down")
    assert down.returncode == 0
    assert "its controller is gone; stopping" in down.stdout and "left behind" in down.stdout
    wait_until(lambda: not any(pid_alive(p) for p in recorded(state)), what="its instances are gone")
    assert_all_gone(state)


async def test_certificates_are_renewed_while_running(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("renew", """
[services.one]
command = "python app.py"
""")
    cert = mesh.state_dir / "certs" / "one" / "cert.pem"
    await mesh.start(cert_lifetime=3)
    first = describe(cert).not_after
    await eventually(lambda: "certificates reloaded" in mesh.out.getvalue(), what=mesh.out.getvalue)
    assert "one.sidecar | " in mesh.out.getvalue()
    assert describe(cert).not_after > first
    state = mesh.state()
    await mesh.stop()
    assert_all_gone(state)


def test_admin_listeners_answer_only_the_controller_and_the_operator(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("guarded", """
[services.web]
command = "python app.py"

[services.api]
command = "python app.py"
replicas = 2

[[routes]]
from = "web"
to = "api"
""")
    popen = mesh.up()
    state = mesh.wait_phase("running")
    files = mesh.files
    token_file = files.path / "admin.token"
    assert os.stat(token_file).st_mode & 0o777 == 0o600 and os.stat(files.path).st_mode & 0o777 == 0o700
    token = token_file.read_text().strip()
    api = sorted(i["addresses"]["mesh"] for i in state["instances"] if i["service"] == "api")

    def admin(inst: dict[str, Any], method: str, path: str, body: bytes | None = None,
              auth: str | None = None) -> Answer:
        return fetch(f"http://{inst['addresses']['admin']}{path}", method=method, data=body,
                     headers={"Authorization": f"Bearer {auth}"} if auth else None)

    for inst in state["instances"]:
        # What an app of this mesh (any local process without the token) gets.
        assert admin(inst, "GET", "/healthz").status == 200 and admin(inst, "GET", "/readyz").status == 200
        assert admin(inst, "GET", "/config").status == 401
        assert admin(inst, "GET", "/registry").status == 401
        assert admin(inst, "PUT", "/registry", b'{"services": {"api": ["127.0.0.1:9"]}}').status == 401
        assert admin(inst, "PUT", "/registry", b'{"services": {"api": []}}', auth="guess").status == 401
        assert admin(inst, "POST", "/certs/reload").status == 401
        # The operator, with the run's token: the controller's pushes are there.
        answer = admin(inst, "GET", "/config", auth=token)
        assert answer.status == 200 and answer.json()["service"] == inst["service"]
        wait_until(lambda inst=inst: sorted(admin(inst, "GET", "/registry", auth=token).json()["services"]["api"])
                   == api, what=f"{inst['label']} lists every api instance")
    # Calls still go where the controller says.
    web = next(i for i in state["instances"] if i["service"] == "web")
    assert fetch(f"http://{web['addresses']['outbound']}/x", headers={"Host": "api"}).status == 200
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


def test_rotate_ca_on_a_running_mesh_then_the_old_ca_is_refused(make_mesh: MeshMaker, tmp_path: Path) -> None:
    from mesh.control.ca import CA

    mesh = make_mesh("rot", """
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
    popen = mesh.up()
    state = mesh.wait_phase("running")
    web, api = by_label(state)["web"], by_label(state)["api"]
    front = next(i for i in state["instances"] if i.get("role") == "front")
    ca_folder = mesh.state_dir / "ca"

    def call(service: str) -> int:
        return fetch(f"http://{web['addresses']['outbound']}/x", headers={"Host": service, "X-Session": "s1"}).status

    assert call("api") == 200 and call("box") == 200  # box: its instance for key s1 starts
    # A certificate for "web" from the first CA, kept aside: trusted now.
    old = CA.load_or_create(ca_folder, "rot")
    old.write_instance(tmp_path / "old-web", "web", lifetime=3600)
    assert _tls_status(api["addresses"]["mesh"], tmp_path / "old-web") == 200
    assert _tls_status(front["addresses"]["mesh"], tmp_path / "old-web") == 200

    def sidecars() -> dict[str, int]:
        now = mesh.state() or {}
        return {i["label"]: i["pids"]["sidecar"] for i in now["instances"] if "sidecar" in i.get("pids", {})}

    before = sidecars()
    assert len(before) == 3, before  # web, api, box's instance for s1

    rotate = mesh.run("certs", "--rotate-ca", timeout=120)  # returns once it is done
    assert rotate.returncode == 0, rotate.stdout + rotate.stderr + mesh.output()
    assert "the old CA is trusted no more" in rotate.stdout
    assert "mesh CA rotated" in mesh.output()
    assert (mesh.state() or {})["ca_rotation"] == {"done": 1, "rotating": False, "error": None}

    new = (ca_folder / "ca.pem").read_bytes()
    assert new != old.cert_pem and not (ca_folder / "trust.pem").exists()
    certs = sorted((mesh.state_dir / "certs").iterdir())
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
