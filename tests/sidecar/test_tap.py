"""The sidecar's live tap (``GET /tap`` on the admin listener), and replaying what it recorded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mesh.observe.tap import Filter, Tap, read_records
from mesh.testing import replay, run_mesh, started

from .test_observing import GATE
from .test_observing import TOML as OBSERVED

TOML = OBSERVED + """
[[routes]]
from = "orders"
to = "web"
"""


class Stream:
    """The JSON lines of one ``GET /tap``, read as they come."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, timeout: float = 30) -> dict[str, Any]:
        while True:
            line = await asyncio.wait_for(self.response.content.readline(), timeout)
            assert line, "the tap stream ended"
            if line.strip():
                record: dict[str, Any] = json.loads(line)
                return record


async def apps(aiohttp_server: Any) -> dict[str, int]:
    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(text=f"{request.path} got {len(body)}", headers={"Set-Cookie": "s=1"})

    ports = {}
    for name in ("web", "orders"):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        ports[name] = (await aiohttp_server(app)).port
    return ports


async def test_tap_streams_requests_sent_after_it_started(aiohttp_server, tmp_path: Path):
    (tmp_path / "gate.py").write_text(GATE)
    async with run_mesh(TOML, await apps(aiohttp_server), tmp_path, tls=False) as mesh, \
            aiohttp.ClientSession() as client:
        admin = mesh.url("web", "admin")
        async with client.get(admin + "/tap", headers=mesh.admin_headers()) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "application/x-ndjson"
            stream = Stream(response)
            assert (await stream.next())["tap"] == "started"
            async with client.get(mesh.url("web", "mesh") + "/deny", headers={"x-mesh-peer": "orders"}) as r:
                assert r.status == 401
            async with client.post(mesh.url("web", "mesh") + "/ok?x=1", data=b"hi",
                                   headers={"x-mesh-peer": "orders", "Authorization": "Bearer secret"}) as r:
                assert r.status == 200
            denied, passed = await stream.next(), await stream.next()
        assert denied["status"] == 401 and denied["answered_by"] == "gate.py:Gate"
        assert denied["plugins"] == [{"name": "gate.py:Gate", "own_ms": denied["plugins"][0]["own_ms"],
                                      "answered": 401, "failed": False}]
        assert passed["method"] == "POST" and passed["path"] == "/ok" and passed["query"] == "x=1"
        assert passed["status"] == 200 and passed["answered_by"] is None and passed["direction"] == "inbound"
        assert passed["service"] == "web" and len(passed["trace_id"]) == 32 and passed["duration_ms"] > 0
        headers = dict(passed["request_headers"])
        assert headers["authorization"] == "<redacted>"  # credentials only with secrets=1
        assert dict(passed["response_headers"])["set-cookie"] == "<redacted>"
        assert "request_body" not in passed  # bodies only when asked


async def test_tap_filters_and_bodies_are_asked_for(aiohttp_server, tmp_path: Path):
    (tmp_path / "gate.py").write_text(GATE)
    async with run_mesh(TOML, await apps(aiohttp_server), tmp_path, tls=False) as mesh, \
            aiohttp.ClientSession() as client:
        url = mesh.url("web", "mesh")
        query = {"path": "/api/*", "status": "2xx", "bodies": "4", "secrets": "1"}
        async with client.get(mesh.url("web", "admin") + "/tap", params=query,
                              headers=mesh.admin_headers()) as response:
            stream = Stream(response)
            await stream.next()
            for path in ("/other", "/deny", "/api/one"):
                async with client.post(url + path, data=b"hello world",
                                       headers={"x-mesh-peer": "orders", "Authorization": "Bearer s"}) as r:
                    await r.read()
            record = await stream.next()
        assert record["path"] == "/api/one"  # /other: another path; /deny: a 401
        assert record["request_body"] == "hell" and record["request_body_truncated"] is True
        assert record["response_body"] == "/api" and record["response_body_truncated"] is True
        assert dict(record["request_headers"])["authorization"] == "Bearer s"


async def test_tap_needs_the_admin_token_and_checks_its_parameters(aiohttp_server, tmp_path: Path):
    (tmp_path / "gate.py").write_text(GATE)
    async with run_mesh(TOML, await apps(aiohttp_server), tmp_path, tls=False) as mesh, \
            aiohttp.ClientSession() as client:
        admin = mesh.url("web", "admin") + "/tap"
        async with client.get(admin) as response:
            assert response.status == 401
        async with client.get(admin, headers={"Authorization": "Bearer wrong"}) as response:
            assert response.status == 401
        for query in ({"status": "abc"}, {"bodies": "-1"}, {"bodies": "999999"}, {"direction": "sideways"},
                      {"colour": "red"}):
            async with client.get(admin, params=query, headers=mesh.admin_headers()) as response:
                assert response.status == 400, query
        assert mesh.sidecars["web"].tap.subscribers == []


async def test_a_sidecar_that_stops_ends_its_taps(aiohttp_server, tmp_path: Path):
    (tmp_path / "gate.py").write_text(GATE)
    async with aiohttp.ClientSession() as client:
        async with run_mesh(TOML, await apps(aiohttp_server), tmp_path, tls=False) as mesh:
            response = await client.get(mesh.url("web", "admin") + "/tap", headers=mesh.admin_headers())
            await Stream(response).next()
            stopping = asyncio.ensure_future(mesh.sidecars["web"].stop())
        await asyncio.wait_for(stopping, 30)
        assert await asyncio.wait_for(response.content.read(), 30) == b""
        response.release()


def test_a_slow_listener_loses_records_not_the_sidecar():
    tap = Tap()
    subscriber = tap.subscribe(Filter())
    record = {"direction": "inbound", "peer": None, "status": 200, "path": "/", "request_headers": [],
              "response_headers": []}
    for _ in range(subscriber.queue.maxsize + 5):
        tap.publish(record)
    assert subscriber.dropped == 5
    tap.unsubscribe(subscriber)
    assert not tap.active


def test_filters_match_status_classes_paths_and_peers():
    record = {"direction": "outbound", "peer": "web", "status": 503, "path": "/api/v1/x"}
    assert Filter.parse({"status": "5xx", "path": "/api/*", "peer": "web"}).matches(record)
    assert Filter.parse({"status": "503", "direction": "outbound"}).matches(record)
    assert not Filter.parse({"status": "4xx"}).matches(record)
    assert not Filter.parse({"status": "500"}).matches(record)
    assert not Filter.parse({"path": "/other*"}).matches(record)
    assert not Filter.parse({"peer": "api"}).matches(record)
    assert not Filter.parse({"direction": "inbound"}).matches(record)
    with pytest.raises(ValueError, match="unknown parameter"):
        Filter.parse({"colour": "red"})


class Gate:
    """The plugin of test_observing's mesh, imported from the file the test writes."""

    @staticmethod
    def load(folder: Path) -> Any:
        namespace: dict[str, Any] = {}
        exec(compile(GATE, str(folder / "gate.py"), "exec"), namespace)
        return namespace["Gate"]


async def test_recorded_traffic_replays_through_the_plugin(aiohttp_server, tmp_path: Path):
    (tmp_path / "gate.py").write_text(GATE)
    saved = tmp_path / "traffic.jsonl"
    async with run_mesh(TOML, await apps(aiohttp_server), tmp_path, tls=False) as mesh, \
            aiohttp.ClientSession() as client:
        async with client.get(mesh.url("web", "admin") + "/tap", headers=mesh.admin_headers(),
                              params={"secrets": "1", "bodies": "1024"}) as response:
            stream = Stream(response)
            await stream.next()
            for path in ("/deny", "/a", "/b"):
                async with client.get(mesh.url("web", "mesh") + path, headers={"x-mesh-peer": "orders"}) as r:
                    await r.read()
            recorded = [await stream.next() for _ in range(3)]
    saved.write_text("".join(json.dumps(record) + "\n" for record in recorded))
    assert [r["path"] for r in read_records(saved)] == ["/deny", "/a", "/b"]

    plugin = Gate.load(tmp_path)()
    async with started(plugin):
        report = await replay(saved, plugin)
    assert report.ok, report.explain()
    assert len(report.results) == 3

    class Lenient(Gate.load(tmp_path)):  # type: ignore[misc]
        async def handle(self, request, call_next):  # a change that lets /deny through
            return await call_next(request)

    changed = Lenient()
    async with started(changed):
        report = await replay(saved, changed, name="gate.py:Gate")
    assert not report.ok
    [mismatch] = report.mismatches
    assert mismatch.record["path"] == "/deny" and mismatch.status == 200
    assert "then answered 401 by gate.py:Gate; now passed on, 200" in report.explain()
