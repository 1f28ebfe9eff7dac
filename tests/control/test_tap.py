"""`mesh tap` on a running mesh, and what a two-service mesh with a user plugin shows of its traffic.

The last test is the whole of it, run as a user would: `mesh up`, requests through the public
listener, then `/metrics` (parsed with prometheus-client), the access logs, one trace across both
sidecars, `mesh tap --save`, and the saved file replayed through the plugin.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.control.tap import format_record
from mesh.testing import replay, started

from ..harness import ECHO_APP, MeshMaker, fetch, free_port, wait_until

MESH = """
plugin_path = ["."]

[services.web]
command = "python app.py web"
expose = {public}

[services.api]
command = "python app.py api"
plugins = [ {{ use = "guard.py:Guard" }} ]

[[routes]]
from = "web"
to = "api"
"""

GUARD = '''
from mesh import LOG_FIELDS, Plugin, Response

class Guard(Plugin):
    """Turns away /secret; tags what it lets through."""

    async def handle(self, request, call_next):
        if request.path.startswith("/secret"):
            return Response(403, "not here\\n")
        request.state.setdefault(LOG_FIELDS, {})["guard"] = "passed"
        response = await call_next(request)
        response.headers["x-guard"] = "passed"
        return response
'''


class Tapping:
    """`mesh tap` in a subprocess: its stdout lines as they come, and a wait for its 'tapping' line."""

    def __init__(self, folder: Path, *args: str) -> None:
        self.popen = subprocess.Popen([sys.executable, "-m", "mesh", "tap", str(folder), *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      stdin=subprocess.DEVNULL, cwd=folder)
        self.lines: list[str] = []
        self.notes: list[str] = []
        threading.Thread(target=self._read, args=(self.popen.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._read, args=(self.popen.stderr, self.notes), daemon=True).start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def wait_started(self, count: int = 1) -> None:
        wait_until(lambda: sum(n.startswith("tapping ") for n in self.notes) >= count or self.popen.poll() is not None,
                   timeout=60, what="mesh tap to say it is tapping")
        assert self.popen.poll() is None, "\n".join(self.notes)

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.popen.wait(timeout)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()


def test_mesh_tap_refuses_what_it_cannot_tap(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("untapped", MESH.format(public=free_port()), ECHO_APP, files={"guard.py": GUARD})
    done = mesh.run("tap")  # nothing runs
    assert done.returncode == 1 and "not running" in done.stderr
    done = subprocess.run([sys.executable, "-m", "mesh", "tap", str(mesh.folder), "nosuch"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "no service 'nosuch'" in done.stderr


def test_format_record_is_one_readable_line() -> None:
    line = format_record({"time": "2026-12-02T17:30:01.123Z", "instance": "api-0", "direction": "inbound",
                          "route": "web->api", "method": "GET", "path": "/x", "query": "a=1", "status": 403,
                          "duration_ms": 1.25, "answered_by": "guard.py:Guard",
                          "plugins": [{"name": "guard.py:Guard", "own_ms": 0.1, "answered": 403, "failed": False}]})
    assert line == ("17:30:01.123 api-0 inbound web->api GET /x?a=1 403 1.2ms [guard.py:Guard=403] "
                    "answered by guard.py:Guard")


def metric_samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def total(found: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, have, v in found if n == name and all(have.get(k) == want for k, want in labels.items()))


@pytest.mark.slow
async def test_a_two_service_mesh_shows_its_traffic(make_mesh: MeshMaker, tmp_path: Path) -> None:
    public = free_port()
    mesh = make_mesh("seen", MESH.format(public=public), ECHO_APP, files={"guard.py": GUARD})
    mesh.up()
    state = mesh.wait_phase("running")
    admin = {i["service"]: i["addresses"]["admin"] for i in state["instances"]}
    saved = tmp_path / "traffic.jsonl"
    tap = Tapping(mesh.folder, "api", "--json", "--count", "3", "--save", str(saved), "--secrets")
    tap.wait_started()

    # Sent after the tap started: two through the plugin, one it turns away.
    assert fetch(f"http://127.0.0.1:{public}/call/api/hello").status == 200
    assert fetch(f"http://127.0.0.1:{public}/call/api/again").status == 200
    assert fetch(f"http://127.0.0.1:{public}/call/api/secret").status == 403
    assert tap.finish() == 0, "\n".join(tap.notes)
    tapped = [json.loads(line) for line in tap.lines]
    assert [(r["path"], r["status"], r["answered_by"]) for r in tapped] == [
        ("/hello", 200, None), ("/again", 200, None), ("/secret", 403, "guard.py:Guard")]
    for record in tapped:
        assert {"method", "path", "status", "duration_ms", "plugins"} <= set(record)
        assert [p["name"] for p in record["plugins"]] == ["guard.py:Guard"]
        assert record["direction"] == "inbound" and record["peer"] == "web" and record["route"] == "web->api"
    assert [json.loads(line) for line in saved.read_text().splitlines()] == tapped

    # The saved traffic replays through the plugin, as a test of it would.
    namespace: dict[str, Any] = {}
    exec(compile(GUARD, "guard.py", "exec"), namespace)
    guard = namespace["Guard"]()
    async with started(guard):
        report = await replay(saved, guard, headers=["x-guard"])
    assert report.ok and len(report.results) == 3, report.explain()

    # /metrics: counts by route, status and plugin, as sent.
    found = metric_samples(f"http://{admin['api']}/metrics")
    assert total(found, "mesh_requests_total", service="api", direction="inbound", route="web->api",
                 status_class="2xx") == 2
    assert total(found, "mesh_requests_total", service="api", direction="inbound", route="web->api",
                 status_class="4xx") == 1
    assert total(found, "mesh_plugin_calls_total", plugin="guard.py:Guard") == 3
    assert total(found, "mesh_plugin_answers_total", plugin="guard.py:Guard", status="403") == 1
    web = metric_samples(f"http://{admin['web']}/metrics")
    assert total(web, "mesh_requests_total", service="web", direction="public") == 3
    assert total(web, "mesh_requests_total", service="web", direction="outbound", route="web->api") == 3

    # The access logs: one line per request per sidecar, with the fields, the plugin's too.
    def logged() -> list[dict[str, Any]]:
        done = mesh.run("logs", "--json", timeout=60)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    wait_until(lambda: len(logged()) >= 9, timeout=30, what="nine access log lines")
    lines = logged()
    assert len(lines) == 9
    api_lines = [r for r in lines if r["service"] == "api"]
    assert sorted(r["path"] for r in api_lines) == ["/again", "/hello", "/secret"]
    assert [r.get("guard") for r in api_lines if r["path"] != "/secret"] == ["passed", "passed"]
    assert [r["answered_by"] for r in api_lines if r["path"] == "/secret"] == ["guard.py:Guard"]

    # One trace per call, across the caller's and the callee's sidecars, each with a span of its own.
    for path in ("/hello", "/again", "/secret"):
        call = [r for r in lines if r["path"] in (path, f"/call/api{path}")]
        assert len(call) == 3, call  # web public, web outbound, api inbound
        assert len({r["trace_id"] for r in call}) == 1
        assert len({r["span_id"] for r in call}) == 3
