"""What a sidecar shows of its traffic: /metrics (parsed by prometheus-client) and the access log."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from mesh.testing import run_mesh

TOML = """
[mesh]
name = "obs"
plugin_path = ["."]
[services.web]
command = "x"
port = 1
plugins = [ { use = "gate.py:Gate" } ]
[services.orders]
command = "x"
port = 1
[[routes]]
from = "web"
to = "orders"
"""

GATE = '''
from mesh import LOG_FIELDS, Plugin, Response

class Gate(Plugin):
    async def start(self, ctx):
        self.denied = ctx.metrics.counter("denied", "requests the gate turned away", ["why"])

    async def handle(self, request, call_next):
        request.state.setdefault(LOG_FIELDS, {})["gate"] = "seen"
        if request.path == "/deny":
            self.denied.inc(why="path")
            return Response(401, "no")
        return await call_next(request)
'''


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(found: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(value for sample, have, value in found
               if sample == name and all(have.get(k) == v for k, v in labels.items()))


async def test_metrics_and_access_logs_count_what_was_sent(aiohttp_server, tmp_path: Path):
    (tmp_path / "gate.py").write_text(GATE)
    sidecars: dict[str, str] = {}

    seen_parents: list[str] = []

    async def web_app(request: web.Request) -> web.Response:
        # The app calls orders by name through its sidecar's outbound listener, passing the trace on.
        parent = request.headers["traceparent"]
        seen_parents.append(parent)
        async with aiohttp.ClientSession() as session:
            async with session.get(sidecars["web"] + "/item",
                                   headers={"Host": "orders", "traceparent": parent}) as answer:
                return web.Response(text=f"web got {answer.status}")

    async def orders_app(request: web.Request) -> web.Response:
        return web.Response(text="order")

    apps = {}
    for name, handler in (("web", web_app), ("orders", orders_app)):
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        apps[name] = (await aiohttp_server(app)).port
    logs = tmp_path / "logs"
    async with run_mesh(TOML, apps, tmp_path, access_logs=logs) as mesh:
        sidecars["web"] = mesh.url("web", "outbound")
        async with aiohttp.ClientSession() as session:
            for path in ("/a", "/b", "/c", "/deny", "/deny"):
                async with session.get(mesh.url("web") + path) as response:
                    await response.read()
                    assert response.status == (401 if path == "/deny" else 200)
            scraped = {}
            for name in ("web", "orders"):
                async with session.get(mesh.url(name, "admin") + "/metrics") as response:  # no token needed
                    assert response.status == 200
                    assert response.headers["Content-Type"].startswith("text/plain")
                    scraped[name] = samples(await response.text())
    web_metrics, orders = scraped["web"], scraped["orders"]
    assert total(web_metrics, "mesh_requests_total", direction="public", status_class="2xx", service="web") == 3
    assert total(web_metrics, "mesh_requests_total", direction="public", status_class="4xx") == 2
    assert total(web_metrics, "mesh_requests_total", direction="outbound", route="web->orders") == 3
    assert total(orders, "mesh_requests_total", direction="inbound", route="web->orders", peer="web",
                 service="orders") == 3
    assert total(web_metrics, "mesh_request_duration_seconds_count", direction="public") == 5
    assert total(web_metrics, "mesh_upstream_duration_seconds_count", direction="public") == 3
    assert total(web_metrics, "mesh_plugin_calls_total", plugin="gate.py:Gate") == 5
    assert total(web_metrics, "mesh_plugin_answers_total", plugin="gate.py:Gate", status="401") == 2
    assert total(web_metrics, "mesh_plugin_duration_seconds_count", plugin="gate.py:Gate") == 5
    assert total(web_metrics, "mesh_gate_denied_total", plugin="gate.py:Gate", why="path") == 2
    assert total(web_metrics, "mesh_response_bytes_total", direction="public") > 0

    lines = [json.loads(line) for line in (logs / "web.jsonl").read_text().splitlines()]
    public = [line for line in lines if line["direction"] == "public"]
    outbound = [line for line in lines if line["direction"] == "outbound"]
    assert [line["path"] for line in public] == ["/a", "/b", "/c", "/deny", "/deny"]
    assert len(outbound) == 3 and all(line["route"] == "web->orders" for line in outbound)
    for line in lines:
        for field in ("time", "request_id", "trace_id", "span_id", "service", "peer", "direction", "method", "path",
                      "status", "bytes_in", "bytes_out", "duration_ms", "upstream_duration_ms", "upstream",
                      "retries", "answered_by"):
            assert field in line, (field, line)
        assert line["time"].endswith("Z") and line["service"] == "web"
    assert [line["answered_by"] for line in public] == [None, None, None, "gate.py:Gate", "gate.py:Gate"]
    assert all(line["gate"] == "seen" for line in public)
    assert all(line["upstream"] for line in outbound)
    inbound = [json.loads(line) for line in (logs / "orders.jsonl").read_text().splitlines()]
    assert [(line["direction"], line["peer"], line["status"]) for line in inbound] == [("inbound", "web", 200)] * 3

    # One trace across the two sidecars: the app sees the public span as its parent, the outbound span is the
    # app's child, and orders' span is the outbound one's child; every span id differs.
    outbound_by_trace = {line["trace_id"]: line for line in outbound}
    inbound_by_trace = {line["trace_id"]: line for line in inbound}
    for line, parent in zip(public[:3], seen_parents, strict=True):
        assert parent.split("-")[1:3] == [line["trace_id"], line["span_id"]]
        spans = {line["span_id"], outbound_by_trace[line["trace_id"]]["span_id"],
                 inbound_by_trace[line["trace_id"]]["span_id"]}
        assert len(spans) == 3
    assert len({line["trace_id"] for line in public}) == 5  # each request from outside starts a trace
