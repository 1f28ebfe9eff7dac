"""Start order and readiness both ways, through `mesh up` on the process runtime: an app starts once
its sidecar's outbound listener is up, a service once those in its ``depends_on`` answer healthy,
a public listener answers 503 with ``Retry-After`` while its app (re)starts, and a sidecar's ports
can be pinned. Every process a mesh starts is recorded and killed at teardown (tests/harness.py)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from mesh import config
from mesh.errors import ConfigError

from ..harness import Answer, MeshMaker, app, by_label, fetch, free_port, wait_until

pytestmark = pytest.mark.slow

# Serves "<service> ok" on $PORT, once SLOW seconds have passed (an app slow to start).
SLOW_APP = app('''
    time.sleep(float(os.environ.get("SLOW", "0")))

    class Handler(Base):
        def do_GET(self):
            self.reply(200, f"{os.environ['MESH_SERVICE']} ok".encode())

    print(os.environ["MESH_SERVICE"], "serving", flush=True)
''')

# Before anything else, calls http://$CALL/first through its sidecar (HTTP_PROXY) and writes what it
# got to first-<service>.txt; then serves.
CALLER_APP = app('''
    try:
        with urllib.request.urlopen(f"http://{os.environ['CALL']}/first", timeout=30) as response:
            first = f"{response.status} {response.read().decode()}"
    except urllib.error.HTTPError as error:
        first = f"{error.code} {error.read().decode()[:200]}"
    except OSError as error:
        first = f"no answer: {error!r}"
    with open(f"first-{os.environ['MESH_SERVICE']}.txt", "w") as f:
        f.write(first)
    print("first call:", first, flush=True)

    class Handler(Base):
        def do_GET(self):
            self.reply(200, b"ok")
''')


def first_call(folder: Path, service: str) -> str:
    return (folder / f"first-{service}.txt").read_text()


def test_a_service_starts_once_its_dependency_is_healthy_and_its_sidecar_is_up(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("order", """
[services.web]
command = "python caller.py"
env = { CALL = "db" }
depends_on = ["db"]

[services.solo]
command = "python caller.py"
env = { CALL = "db" }

[services.db]
command = "python app.py"
env = { SLOW = "2" }
health = "/healthz"

[[routes]]
from = "web"
to = "db"
""", SLOW_APP, files={"caller.py": CALLER_APP})
    popen = mesh.up()
    state = mesh.wait_phase("running", timeout=120)
    out = mesh.output()
    assert "web: waiting for db" in out
    # db answered healthy before web's app started: web's very first call, through its sidecar, got it.
    assert first_call(mesh.folder, "web") == "200 db ok", out
    # solo waits for nothing, yet its app starts only once its sidecar listens: its first call gets
    # the sidecar's own answer (no route from solo to db), never a refused connection.
    assert first_call(mesh.folder, "solo").startswith("403 "), out
    assert out.index("db serving") < out.index("first call: 200 db ok")
    assert [i["state"] for i in state["instances"]] == ["running"] * 3
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=60) == 0
    mesh.assert_all_gone()


def test_a_dependency_that_fails_to_start_fails_its_dependants(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("chain", """
[services.api]
command = "python app.py"
depends_on = ["web"]

[services.web]
command = "python app.py"
depends_on = ["db"]

[services.db]
command = "python broken.py"
""", SLOW_APP, files={"broken.py": "import sys\nprint('boom: no disk')\nsys.exit(3)\n"})
    popen = mesh.up()
    assert popen.wait(timeout=120) == 1
    out = mesh.output()
    assert "mesh up: db failed to start: the app exited with code 3 before it was ready" in out
    assert "db | boom: no disk" in out
    assert "mesh up: web failed to start: it depends on db, which failed to start" in out
    assert "mesh up: api failed to start: it depends on web, which depends on db, which failed to start" in out
    assert "api: waiting for web" in out and "web: waiting for db" in out
    assert "serving" not in out  # neither web's nor api's app ever ran
    state = mesh.state()
    assert state["phase"] == "failed" and "it depends on db" in state["error"]
    assert by_label(state)["web"]["pids"] == {}  # nothing of it was started
    mesh.assert_all_gone()


def _problems(tmp_path: Path, services: str) -> list[str]:
    (tmp_path / "mesh.toml").write_text(f'[mesh]\nname = "m"\n{services}')
    with pytest.raises(ConfigError) as failure:
        config.load(tmp_path)
    return failure.value.problems


def test_check_refuses_unknown_self_and_circular_dependencies(make_mesh: MeshMaker, tmp_path: Path) -> None:
    problems = _problems(tmp_path, """
[services.a]
command = "x"
depends_on = ["b", "a", "dbb"]

[services.b]
command = "x"
depends_on = ["c"]

[services.c]
command = "x"
depends_on = ["a"]

[services.db]
command = "x"
""")
    assert problems == [
        "services.a.depends_on: a service cannot depend on itself",
        "services.a.depends_on[2]: unknown service 'dbb', did you mean 'db'?",
        "services.a.depends_on: the services wait for each other, none would start: a -> b -> c -> a",
    ]
    mesh = make_mesh("loop", '[services.a]\ncommand = "x"\ndepends_on = ["b"]\n\n'
                             '[services.b]\ncommand = "x"\ndepends_on = ["a"]\n', folder=tmp_path / "loop")
    done = mesh.run("check")
    assert done.returncode == 1
    assert "services.a.depends_on: the services wait for each other, none would start: a -> b -> a" in done.stderr


def _statuses(url: str, until: int, seconds: float = 120) -> list[Answer]:
    """Every answer of ``url`` (one request after another) until one has status ``until``."""
    answers: list[Answer] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answers.append(fetch(url, timeout=30))
        if answers[-1].status == until:
            return answers
        time.sleep(0.02)
    raise AssertionError(f"no {until} from {url} within {seconds}s: {[a.status for a in answers][-20:]}")


def test_the_public_listener_answers_503_retry_after_while_the_app_starts_and_restarts(
        make_mesh: MeshMaker) -> None:
    public = free_port()
    mesh = make_mesh("warm", f"""
[services.slow]
command = "python app.py"
env = {{ SLOW = "3" }}
expose = {public}
""", SLOW_APP)
    popen = mesh.up()
    url = f"http://127.0.0.1:{public}/"
    wait_until(lambda: fetch(url, timeout=30).status != 0, timeout=60, what="the sidecar's public listener")
    starting = _statuses(url, 200)
    waiting = [a for a in starting if a.status != 200]
    assert waiting, "the app was up before its sidecar answered"
    assert {a.status for a in waiting} == {503}, [a.body for a in waiting]
    assert all(a.headers.get("Retry-After") == "1" for a in waiting)
    assert b"the app is not up yet" in waiting[0].body
    assert starting[-1].body == b"slow ok"

    before = mesh.wait_phase("running")
    os.kill(by_label(before)["slow"]["pids"]["app"], signal.SIGKILL)  # a crash: restarted with backoff
    wait_until(lambda: fetch(url, timeout=30).status == 503, timeout=60, what="503 once the app died")
    restarting = _statuses(url, 200)
    assert {a.status for a in restarting[:-1]} <= {503}, [a.body for a in restarting]
    assert all(a.headers.get("Retry-After") == "1" for a in restarting[:-1])
    wait_until(lambda: by_label(mesh.state() or {"instances": []})["slow"]["restarts"] == 1)
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=60) == 0
    mesh.assert_all_gone()


def test_pinned_sidecar_ports(make_mesh: MeshMaker, tmp_path: Path) -> None:
    admin, mesh_port, outbound = free_port(), free_port(), free_port()
    assert len({admin, mesh_port, outbound}) == 3
    mesh = make_mesh("pinned", f"""
[services.api]
command = "python app.py"
sidecar = {{ admin_port = {admin}, mesh_port = {mesh_port}, outbound_port = {outbound} }}

[services.web]
command = "python app.py"
""", folder=tmp_path / "pinned")
    popen = mesh.up()
    mesh.wait_phase("running")
    listed = by_label(mesh.ps())
    assert {k: listed["api"]["addresses"][k] for k in ("admin", "mesh", "outbound")} == {
        "admin": f"127.0.0.1:{admin}", "mesh": f"127.0.0.1:{mesh_port}", "outbound": f"127.0.0.1:{outbound}"}
    assert fetch(f"http://127.0.0.1:{admin}/readyz").status == 200
    seen = fetch(f"http://{listed['api']['addresses']['app']}/").json()
    assert seen["env"]["HTTP_PROXY"] == f"http://127.0.0.1:{outbound}"
    assert {listed["web"]["addresses"][k] for k in ("admin", "mesh", "outbound")}.isdisjoint(
        {f"127.0.0.1:{p}" for p in (admin, mesh_port, outbound)})  # unpinned: free ports of their own
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=60) == 0
    mesh.assert_all_gone()

    # A pinned port in use: `mesh up` refuses before anything starts, as for `expose`.
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the sidecar's closed connections linger
        taken.bind(("127.0.0.1", admin))
        taken.listen()
        popen = mesh.up()
        assert popen.wait(timeout=60) == 1
    assert (f"cannot pin its sidecar's admin listener on 127.0.0.1:{admin}: the port is in use "
            f"(services.api.sidecar.admin_port)") in mesh.output()


def test_check_refuses_pinned_ports_that_cannot_hold(tmp_path: Path) -> None:
    problems = _problems(tmp_path, """
[services.api]
command = "x"
replicas = 2
sidecar = { admin_port = 15000 }

[services.pool]
command = "x"
scale = { min = 1, max = 3 }
sidecar = { mesh_port = 15100 }

[services.web]
command = "x"
expose = 8080
sidecar = { admin_port = 8080, mesh_port = 15000, outbound_port = 15000 }

[services.db]
command = "x"
sidecar = { admin_port = 15000, outbound_port = 0 }
""")
    assert problems == [
        "services.api.sidecar: pinned ports need a service with one instance, and replicas = 2 starts "
        "several (one port takes one listener)",
        "services.pool.sidecar: pinned ports need a service with one instance, and a pool (scale) starts "
        "several (one port takes one listener)",
        "services.web.sidecar: expected a different port for each listener, found admin_port = 8080, "
        "mesh_port = 15000, outbound_port = 15000",
        "services.db.sidecar: outbound_port: expected a port between 1 and 65535, found 0",
    ]
    problems = _problems(tmp_path, """
[services.web]
command = "x"
expose = 8080

[services.api]
command = "x"
sidecar = { admin_port = 8080, mesh_port = 15000 }

[services.db]
command = "x"
sidecar = { outbound_port = 15000 }
""")
    assert problems == [
        "services.api.sidecar.admin_port: port 8080 is already taken by services.web.expose",
        "services.db.sidecar.outbound_port: port 15000 is already taken by services.api.sidecar.mesh_port",
    ]


def test_reload_starts_added_services_after_their_dependencies(make_mesh: MeshMaker, tmp_path: Path) -> None:
    base = '[services.web]\ncommand = "python app.py"\n'
    mesh = make_mesh("grow", base, SLOW_APP, files={"caller.py": CALLER_APP}, folder=tmp_path / "grow")
    popen = mesh.up()
    mesh.wait_phase("running")
    # api comes first in the file, and must still start after db, which it calls at once.
    (mesh.folder / "mesh.toml").write_text(f"""[mesh]
name = "grow"
{base}
[services.api]
command = "python caller.py"
env = {{ CALL = "db" }}
depends_on = ["db"]

[services.db]
command = "python app.py"
env = {{ SLOW = "1" }}
health = "/healthz"

[[routes]]
from = "api"
to = "db"
""")
    done = mesh.run("reload", timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert first_call(mesh.folder, "api") == "200 db ok", mesh.output()
    assert {i["label"]: i["state"] for i in mesh.ps()["instances"]} == {
        "web": "running", "api": "running", "db": "running"}
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=60) == 0
    mesh.assert_all_gone()
