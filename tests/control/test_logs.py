"""`mesh logs` and the access-log files it reads; the runtimes' flags for them; calm health checks.

Most tests write access-log files by hand in a mesh's state folder and run the real `mesh logs`
in a subprocess (`--follow` too: read with a bounded wait, then stopped by its pid). The end-to-end
ones run `mesh up` and read what its sidecars logged.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.config import HealthCheck
from mesh.control.instances import steady_interval
from mesh.control.logs import AccessLogs, format_entry, log_file
from mesh.options import Duration

from ..docker_support import base_image, docker_engine  # noqa: F401
from ..harness import DOCKER_APP, ECHO_APP, MeshMaker, docker_build, fetch, free_port, unique_name, wait_until


def _sidecar_logs() -> bool:
    """Whether `mesh sidecar` takes --access-log (the sidecar's side of access logs)."""
    try:
        from mesh.sidecar.sidecar import add_arguments
    except Exception:  # noqa: BLE001 - half-written: no
        return False
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return "--access-log" in parser._option_string_actions


SIDECAR_LOGS = _sidecar_logs()

MESH = """
[mesh]
name = "{name}"

[services.web]
command = "python app.py"

[services.api]
command = "python app.py"
replicas = 2
"""


def record(time: str, rid: str, service: str = "web", instance: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"time": f"2026-12-02T17:30:{time}Z", "request_id": rid, "trace_id": "t" * 32, "span_id": "s" * 16,
            "service": service, "instance": instance or service, "peer": fields.pop("peer", "web"),
            "direction": fields.pop("direction", "inbound"), "method": "GET", "path": f"/{rid}",
            "status": 200, "bytes_in": 0, "bytes_out": 2, "duration_ms": 1.25, "upstream_duration_ms": 1.0,
            "upstream": None, "retries": 0, "answered_by": None, **fields}


def lines(*records: dict[str, Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "mesh.toml").write_text(MESH.format(name="shop"))
    return tmp_path


def logs_dir(folder: Path) -> Path:
    return log_file(folder / ".mesh" / "shop", "x").parent  # .mesh/shop/logs, made


def write(folder: Path, name: str, text: str, mode: str = "w") -> None:
    with open(logs_dir(folder) / name, mode) as file:
        file.write(text)


def mesh_logs(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mesh", "logs", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60, stdin=subprocess.DEVNULL)


def ids(stdout: str) -> list[str]:
    return [json.loads(line)["request_id"] for line in stdout.splitlines()]


def test_the_logs_folder_is_private(tmp_path: Path) -> None:
    path = log_file(tmp_path / "state", "web.2")
    assert path == tmp_path / "state" / "logs" / "web.2.jsonl"
    assert (path.parent.stat().st_mode & 0o777) == 0o700


def test_every_instance_merged_in_time_order_rotated_files_first(folder: Path) -> None:
    write(folder, "web.jsonl.2", lines(record("01.000", "w1"), record("03.000", "w3")))
    write(folder, "web.jsonl.1", lines(record("05.000", "w5")))
    write(folder, "web.jsonl", lines(record("07.000", "w7"), record("09.500", "w9")))
    write(folder, "api.1.jsonl", lines(record("02.000", "a2", "api", "api.1"), record("08.000", "a8", "api", "api.1")))
    write(folder, "api.2.jsonl", lines(record("04.000", "b4", "api", "api.2"),
                                       record("09.500", "b9", "api", "api.2")))  # a tie keeps file order
    done = mesh_logs(str(folder), "--json", cwd=folder)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert ids(done.stdout) == ["w1", "a2", "w3", "b4", "w5", "w7", "a8", "b9", "w9"]
    # --json prints each line as the sidecar wrote it
    assert done.stdout.splitlines()[0] == json.dumps(record("01.000", "w1"))

    readable = mesh_logs(str(folder), cwd=folder).stdout.splitlines()
    assert readable[1] == ('2026-12-02T17:30:02.000Z api.1 inbound web "GET /a2" 200 1.2ms id=a2')
    assert len(readable) == 9


def test_a_service_alone_and_with_a_path(folder: Path) -> None:
    write(folder, "web.jsonl", lines(record("01.000", "w1"), record("03.000", "w3")))
    write(folder, "api.1.jsonl", lines(record("02.000", "a2", "api", "api.1")))
    write(folder, "api.2.jsonl", lines(record("04.000", "b4", "api", "api.2")))
    assert ids(mesh_logs(str(folder), "api", "--json", cwd=folder).stdout) == ["a2", "b4"]
    assert ids(mesh_logs("web", "--json", cwd=folder).stdout) == ["w1", "w3"]  # ./mesh.toml
    assert ids(mesh_logs("--json", cwd=folder).stdout) == ["w1", "a2", "w3", "b4"]
    unknown = mesh_logs("nope", cwd=folder)
    assert unknown.returncode == 2 and "no service 'nope'" in unknown.stderr and unknown.stdout == ""


def test_nothing_yet_says_so_and_exits_0(folder: Path) -> None:
    done = mesh_logs(str(folder), cwd=folder)
    assert (done.returncode, done.stdout) == (0, "")
    assert "no access log lines yet" in done.stderr
    write(folder, "web.jsonl", lines(record("01.000", "w1")))
    done = mesh_logs(str(folder), "api", cwd=folder)
    assert (done.returncode, done.stdout) == (0, "")
    assert "no access log lines of service 'api' yet" in done.stderr


def test_lines_that_are_not_json_objects_are_skipped_with_a_warning(folder: Path) -> None:
    write(folder, "web.jsonl", "not json\n" + lines(record("01.000", "w1")) + "[1, 2]\n\n"
          + lines(record("02.000", "w2")) + '{"time": "2026-12-02T17:3')  # cut short, last
    done = mesh_logs(str(folder), "--json", cwd=folder)
    assert done.returncode == 0
    assert ids(done.stdout) == ["w1", "w2"]
    warnings = done.stderr.splitlines()
    path = logs_dir(folder) / "web.jsonl"
    assert warnings == [f"mesh logs: {path}:1: not a JSON object, skipped",
                        f"mesh logs: {path}:3: not a JSON object, skipped",
                        f"mesh logs: {path}:6: not a JSON object, skipped"]


def test_readable_lines_say_what_is_missing_and_who_answered() -> None:
    line = format_entry({"time": "2026-12-02T17:30:01.123Z", "service": "web", "direction": "public",
                         "peer": None, "method": "POST", "path": "/login", "status": 401,
                         "duration_ms": 0.4, "request_id": "r1", "answered_by": "jwt"})
    assert line == '2026-12-02T17:30:01.123Z web public - "POST /login" 401 0.4ms id=r1 answered_by=jwt'
    assert format_entry({}) == '- - - - "- -" - - id=-'


def test_a_reader_follows_appends_new_files_and_rotation_in_process(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    warned: list[str] = []
    logs = AccessLogs(folder, warn=warned.append)
    try:
        assert logs.existing(final=False) == []
        (folder / "web.jsonl").write_text(lines(record("01.000", "w1")) + '{"time": "2026-12-02T17:30:02')
        assert [e.record["request_id"] for e in logs.new()] == ["w1"]  # the half line waits
        with open(folder / "web.jsonl", "a") as file:
            file.write('.000Z", "request_id": "w2", "service": "web"}\n')
        assert [e.record["request_id"] for e in logs.new()] == ["w2"]
        with open(folder / "web.jsonl", "a") as file:
            file.write(lines(record("03.000", "w3")))
        os.replace(folder / "web.jsonl", folder / "web.jsonl.1")
        assert [e.record["request_id"] for e in logs.new()] == ["w3"]  # renamed away, read to its end
        (folder / "web.jsonl").write_text(lines(record("04.000", "w4")))
        assert [e.record["request_id"] for e in logs.new()] == ["w4"]
        assert logs.new() == [] and warned == []
    finally:
        logs.close()


class Follower:
    """`mesh logs --follow` in a subprocess; its stdout lines read on a thread, waited for with a bound."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", "mesh", "logs", "--follow", *args], cwd=cwd,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      stdin=subprocess.DEVNULL)
        self.lines: queue.Queue[str] = queue.Queue()
        self.errors: list[str] = []
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_errors, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    def _read_errors(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.errors.append(line.rstrip("\n"))

    def take(self, count: int, timeout: float = 15.0) -> list[str]:
        deadline = time.monotonic() + timeout
        found: list[str] = []
        while len(found) < count:
            try:
                found.append(self.lines.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"{len(found)} of {count} lines after {timeout}s: {found}; exit "
                            f"{self.popen.poll()}; stderr {self.errors}")
        return found

    def stop(self) -> str:
        """Terminate it (by its pid) and return its stderr."""
        if self.popen.poll() is None:
            self.popen.terminate()
        self.popen.wait(10)
        for reader in self._readers:
            reader.join(10)
        return "\n".join(self.errors)


@pytest.fixture
def follower() -> Iterator[list[Follower]]:
    started: list[Follower] = []
    yield started
    for each in started:
        each.stop()


def test_follow_prints_appended_lines_new_files_and_across_rotation(folder: Path,
                                                                     follower: list[Follower]) -> None:
    write(folder, "web.jsonl.1", lines(record("01.000", "w1")))
    write(folder, "web.jsonl", lines(record("02.000", "w2")))
    follow = Follower(str(folder), "--json", cwd=folder)
    follower.append(follow)
    assert [json.loads(line)["request_id"] for line in follow.take(2)] == ["w1", "w2"]

    write(folder, "web.jsonl", lines(record("03.000", "w3")), "a")
    assert json.loads(follow.take(1)[0])["request_id"] == "w3"
    write(folder, "api.1.jsonl", lines(record("04.000", "a4", "api", "api.1")))  # an instance that starts later
    assert json.loads(follow.take(1)[0])["request_id"] == "a4"
    # rotation as the sidecar does it: .1 -> .2, the log -> .1, a new log
    write(folder, "web.jsonl", lines(record("05.000", "w5")), "a")
    os.replace(logs_dir(folder) / "web.jsonl.1", logs_dir(folder) / "web.jsonl.2")
    os.replace(logs_dir(folder) / "web.jsonl", logs_dir(folder) / "web.jsonl.1")
    write(folder, "web.jsonl", lines(record("06.000", "w6")) + "not json\n" + lines(record("07.000", "w7")))
    assert [json.loads(line)["request_id"] for line in follow.take(3)] == ["w5", "w6", "w7"]
    assert follow.popen.poll() is None  # still following
    stderr = follow.stop()
    assert "web.jsonl:2: not a JSON object, skipped" in stderr


def test_follow_with_a_service_and_nothing_yet(folder: Path, follower: list[Follower]) -> None:
    follow = Follower("api", cwd=folder)
    follower.append(follow)
    wait_until(lambda: any("no access log lines of service 'api' yet" in e for e in follow.errors),
               timeout=15, what="mesh logs --follow saying there is nothing yet")
    write(folder, "web.jsonl", lines(record("01.000", "w1")))
    write(folder, "api.2.jsonl", lines(record("02.000", "b2", "api", "api.2")))
    assert follow.take(1) == ['2026-12-02T17:30:02.000Z api.2 inbound web "GET /b2" 200 1.2ms id=b2']
    assert follow.popen.poll() is None


# --- the health checks' cadence ---------------------------------------------------------------------

def test_a_steadily_healthy_instance_is_checked_every_10_intervals_at_most_10s_apart() -> None:
    assert steady_interval(HealthCheck()) == 10.0
    assert steady_interval(HealthCheck(interval=Duration(0.2))) == pytest.approx(2.0)
    assert steady_interval(HealthCheck(interval=Duration(5))) == 10.0
    assert steady_interval(HealthCheck(interval=Duration(30))) == 30.0


COUNTING_APP = '''
import os, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

checks = 0
lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        global checks
        if self.path == "/healthz":
            with lock:
                checks += 1
            body = b"ok"
        else:
            body = str(checks).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


@pytest.mark.slow
def test_health_checks_calm_down_once_an_instance_is_healthy(make_mesh: MeshMaker) -> None:
    public = free_port()
    mesh = make_mesh("calm", f'[services.web]\ncommand = "python app.py"\nexpose = {public}\nhealth = "/healthz"\n',
                     COUNTING_APP)
    mesh.up()
    mesh.wait_phase("running")

    def checks() -> int:
        return int(fetch(f"http://127.0.0.1:{public}/count").text)

    # Every second (the default interval) until healthy_threshold (2) good checks...
    wait_until(lambda: checks() >= 3, timeout=10, what="the first checks at the interval")
    time.sleep(1.5)
    calm = checks()
    # ...then every 10 s: none or one in the next 5 s, where there were five before.
    time.sleep(5)
    assert checks() - calm <= 1


# --- end to end: what running sidecars log --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not SIDECAR_LOGS, reason="`mesh sidecar` has no --access-log flag yet")
def test_a_running_mesh_logs_each_request_and_mesh_logs_shows_it(make_mesh: MeshMaker) -> None:
    public = free_port()
    mesh = make_mesh("seen", f"""
[services.web]
command = "python app.py web"
expose = {public}

[services.api]
command = "python app.py api"

[[routes]]
from = "web"
to = "api"
""", ECHO_APP)
    mesh.up()
    mesh.wait_phase("running")
    assert fetch(f"http://127.0.0.1:{public}/call/api/hello").status == 200
    assert fetch(f"http://127.0.0.1:{public}/direct").status == 200

    def logged() -> list[dict[str, Any]]:
        done = mesh.run("logs", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    wait_until(lambda: len(logged()) >= 4, timeout=15, what="four access log lines")
    found = logged()
    seen = {(r["service"], r["direction"], r["path"]) for r in found}
    assert seen == {("web", "public", "/call/api/hello"), ("web", "outbound", "/hello"),
                    ("api", "inbound", "/hello"), ("web", "public", "/direct")}, found
    for r in found:
        assert {"time", "request_id", "trace_id", "span_id", "service", "instance", "peer", "direction",
                "method", "path", "status", "bytes_in", "bytes_out", "duration_ms", "upstream_duration_ms",
                "upstream", "retries", "answered_by"} <= set(r), r
        assert r["status"] == 200 and r["method"] == "GET"
    call = [r for r in found if r["path"] in ("/call/api/hello", "/hello")]
    assert len({r["trace_id"] for r in call}) == 1  # one trace across both sidecars
    assert sorted(r["time"] for r in found) == [r["time"] for r in found]
    assert {p.name for p in (mesh.state_dir / "logs").iterdir()} == {"web.jsonl", "api.jsonl"}
    api_only = mesh_logs("api", cwd=mesh.folder)  # SERVICE alone: ./mesh.toml's; readable
    assert api_only.returncode == 0
    assert [line.split()[1:3] for line in api_only.stdout.splitlines()] == [["api", "inbound"]]


@pytest.mark.docker
@pytest.mark.skipif(not SIDECAR_LOGS, reason="`mesh sidecar` has no --access-log flag yet")
def test_on_docker_only_the_sidecar_holds_the_logs_folder(make_mesh: MeshMaker, docker_engine: Any,
                                                          base_image: str) -> None:
    public = free_port()
    mesh = make_mesh(unique_name(), f'[services.front]\nbuild = "app"\nport = 8000\nexpose = {public}\n'
                     f'health = "/healthz"\n', None, files=docker_build(DOCKER_APP), engine=docker_engine)
    done = mesh.run("up", "-d", "--runtime", "docker")
    assert done.returncode == 0, done.stdout + done.stderr
    assert fetch(f"http://127.0.0.1:{public}/seen").status == 200
    front = mesh.ps()["instances"][0]["containers"]
    sidecar = docker_engine.api.inspect_container(front["sidecar"]["id"])
    mounts = {m["Destination"]: m for m in sidecar["Mounts"]}
    assert mounts["/mesh/logs"]["RW"] is True
    assert Path(mounts["/mesh/logs"]["Source"]) == (mesh.state_dir / "logs").resolve()
    app = docker_engine.api.inspect_container(front["app"]["id"])
    assert not [m for m in app["Mounts"] if m["Type"] == "bind"]
    code, output = docker_engine.containers.get(front["app"]["id"]).exec_run(["ls", "/mesh/logs"])
    assert code != 0, output  # not there for the app
    wait_until(lambda: "/seen" in mesh.run("logs", "--json").stdout, timeout=15, what="the request logged")
    line = json.loads(next(x for x in mesh.run("logs", "--json").stdout.splitlines() if "/seen" in x))
    assert (line["service"], line["instance"], line["direction"], line["status"]) == ("front", "front", "public", 200)
    assert mesh.run("down").returncode == 0
