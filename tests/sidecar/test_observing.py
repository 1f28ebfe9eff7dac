"""What a sidecar shows of its traffic: /metrics (parsed by prometheus-client) and the access log."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
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


async def test_every_access_log_line_is_one_json_object_whatever_the_request(tmp_path: Path) -> None:
    """Odd values (a client's path and request id, a plugin's fields, statuses and sizes) never break a line."""
    import math

    from mesh import LOG_FIELDS, Request, Response
    from mesh.observe.accesslog import AccessLog
    from mesh.observe.tracing import Span
    from mesh.sidecar.observing import ROUTE, SPAN, UPSTREAM_STARTED, Observer

    log = AccessLog(tmp_path / "access.jsonl")
    log.start()
    observer = Observer("web", frozenset({"web", "orders"}), "web.1", log)
    cases = [
        ({"path": '/a"b\\c\n\x00é☃', "id": 'id"\\\n', "peer": "orders"}, 200, 0, 12, None),
        ({"path": "/x", "id": "r1", "peer": "intruder"}, 1234, 10**12, 0, Span("a" * 32, "b" * 16, None, True, 0)),
        ({"path": "/y", "peer": None}, 99, 1023, 1024, Span("c" * 32, "d" * 16, None, False, 0)),
    ]
    for index, (fields, status, received, sent, span) in enumerate(cases):
        request = Request("GET" if index else "BREW", fields["path"], id=fields.get("id"), peer=fields["peer"])
        request.state.update({ROUTE: "web->orders", SPAN: span})
        if index == 1:
            request.state[UPSTREAM_STARTED] = 5.0
        request.state[LOG_FIELDS] = {"status": "forged", "tenant": "t\"1", "ratio": math.nan, "n": 3,
                                     "ok": True, "obj": object.__name__, 7: "seven"}
        observer.done("inbound", request, Response(status), 4.0, 5.5, received, sent)
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "access.jsonl").read_text().splitlines()]
    assert [line["path"] for line in lines] == [case[0]["path"] for case in cases]
    assert [line["status"] for line in lines] == [200, 1234, 99]
    assert [line["bytes_in"] for line in lines] == [0, 10**12, 1023]
    assert [line["peer"] for line in lines] == ["orders", "intruder", None]  # the real value, not the label
    assert lines[0]["request_id"] == 'id"\\\n' and lines[0]["trace_id"] is None and lines[0]["span_id"] is None
    assert lines[0]["method"] == "BREW" and lines[1]["method"] == "GET"
    assert lines[1]["trace_id"] == "a" * 32 and lines[1]["upstream_duration_ms"] == 500.0
    assert lines[2]["upstream_duration_ms"] is None
    for line in lines:
        assert line["status"] != "forged"  # a plugin's field never rewrites mesh's own
        assert line["tenant"] == 't"1' and line["ratio"] is None and line["n"] == 3 and line["7"] == "seven"
        assert line["time"].endswith("Z") and len(line["time"]) == len("2026-12-02T17:30:01.123Z")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100), st.one_of(st.none(), st.floats(0, 100)), st.integers(0, 10**9),
                          st.integers(0, 10**9)), max_size=600),
       st.lists(st.integers(1, 600), max_size=4))
def test_folded_requests_count_as_one_at_a_time(requests: list[tuple[float, float | None, int, int]],
                                                 folds: list[int]) -> None:
    """Requests added to their row in bulk give the buckets, sums and counts of adding each one."""
    from bisect import bisect_left

    from mesh.sidecar.observing import _BYTES_IN, _BYTES_OUT, _SUM, _UPSTREAM, _UPSTREAM_SUM, NO_UPSTREAM, Requests

    counters = Requests("web")
    key = ("inbound", "web->orders", "web", "GET", "2xx")
    pending = counters.begin(key)
    expected = [0.0] * len(counters.rows[key])
    for index, (elapsed, upstream, received, sent) in enumerate(requests):
        pending.append((elapsed, NO_UPSTREAM if upstream is None else upstream, received, sent))
        if index + 1 in folds:
            counters.fold(key)
        expected[bisect_left(counters.bounds, elapsed)] += 1
        expected[_SUM] += elapsed
        expected[_BYTES_IN] += received
        expected[_BYTES_OUT] += sent
        if upstream is not None:
            expected[_UPSTREAM + bisect_left(counters.bounds, upstream)] += 1
            expected[_UPSTREAM_SUM] += upstream
    counters.fold(key)
    assert counters.rows[key] == pytest.approx(expected, rel=1e-9, abs=1e-9)


async def test_requests_are_counted_and_logged_in_batches_and_none_is_lost(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every request is counted as it ends (a scrape sees it), and logged once, in order, past a batch or
    at the log's flush; one whose line cannot be made is left out, and the others of its batch are not."""
    from prometheus_client.parser import text_string_to_metric_families

    from mesh import LOG_FIELDS, Request, Response
    from mesh.observe.accesslog import FLUSH_ROWS, AccessLog
    from mesh.sidecar.observing import Observer

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    log = AccessLog(tmp_path / "access.jsonl")
    log.start()
    observer = Observer("web", frozenset({"web"}), "web.1", log)
    sent = 2 * FLUSH_ROWS + 3
    for index in range(sent):
        request = Request("GET", f"/{index}", id=f"r{index}")
        if index == 7:
            request.state[LOG_FIELDS] = {"odd": Unprintable()}
        observer.done("public", request, Response(200 if index % 3 else 503), 1.0, 1.5, 0, index)
    assert len(observer._lines) == 3  # two batches written on the way
    assert len((tmp_path / "access.jsonl").read_text().splitlines()) == 2 * FLUSH_ROWS - 1  # all but r7
    samples = {(sample.labels["status_class"], sample.name): sample.value
               for family in text_string_to_metric_families(observer.metrics.exposition().decode())
               for sample in family.samples if sample.name == "mesh_requests_total"}
    assert samples == {("2xx", "mesh_requests_total"): sum(1 for i in range(sent) if i % 3),
                       ("5xx", "mesh_requests_total"): sum(1 for i in range(sent) if not i % 3)}
    assert len(observer._lines) == 3  # counted as they ended; their lines wait for the log's flush
    observer.done("public", Request("GET", "/last", id="last"), Response(200), 1.0, 1.5, 0, 0)
    log.close()  # hands over what is queued, then writes
    lines = [json.loads(line) for line in (tmp_path / "access.jsonl").read_text().splitlines()]
    assert [line["request_id"] for line in lines] == [f"r{i}" for i in range(sent) if i != 7] + ["last"]
    assert [line["bytes_out"] for line in lines[:3]] == [0, 1, 2]
    assert "request r7: its plugins' log fields cannot be written" in caplog.text


@pytest.mark.parametrize(("key", "odd"), [("mesh.upstream_started", "soon"), ("mesh.avoid", 5), ("mesh.span", "x")],
                         ids=["upstream started", "tried", "span"])
async def test_a_request_that_cannot_be_counted_costs_no_other_its_count_or_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str, odd: object) -> None:
    """A plugin may leave an odd value under one of mesh's own state keys; that request is neither
    counted nor logged, and the other requests of its batch are both."""
    from prometheus_client.parser import text_string_to_metric_families

    from mesh import Request, Response
    from mesh.keys import AVOID
    from mesh.observe.accesslog import FLUSH_ROWS, AccessLog
    from mesh.sidecar.observing import SPAN, UPSTREAM_STARTED, Observer

    assert {UPSTREAM_STARTED, AVOID, SPAN} >= {key}

    log = AccessLog(tmp_path / "access.jsonl")
    log.start()
    observer = Observer("web", frozenset({"web"}), "web.1", log)
    for index in range(FLUSH_ROWS + 5):
        request = Request("GET", f"/{index}", id=f"r{index}")
        if index == 7:
            request.state[key] = odd
        observer.done("public", request, Response(200), 1.0, 1.5, 0, index)
    total = sum(sample.value for family in text_string_to_metric_families(observer.metrics.exposition().decode())
                for sample in family.samples if sample.name == "mesh_requests_total")
    log.close()
    assert total == FLUSH_ROWS + 4
    lines = [json.loads(line) for line in (tmp_path / "access.jsonl").read_text().splitlines()]
    assert [line["request_id"] for line in lines] == [f"r{i}" for i in range(FLUSH_ROWS + 5) if i != 7]
    assert "request r7: cannot count it; its line is left out" in caplog.text


def test_what_requests_share_is_remembered_for_a_bounded_number_of_combinations() -> None:
    """Methods and development-mode peers a client makes up each count as "other", and the observer
    remembers at most _SLOTS combinations of them, however many it meets."""
    from mesh import Request, Response
    from mesh.sidecar.observing import _SLOTS, Observer

    observer = Observer("web", frozenset({"web", "orders"}), "web.1")
    sent = _SLOTS + 500
    for index in range(sent):
        request = Request(f"M{index}", "/", peer=f"p{index}" if index % 2 else "orders")
        observer.done("inbound", request, Response(200), 1.0, 1.5, 0, 0)
    assert len(observer._slots) == _SLOTS
    requests = observer.requests
    for key in list(requests.pending):
        requests.fold(key)
    counts = {key[2:4]: sum(row[:len(requests.bounds) + 1]) for key, row in requests.rows.items()}  # buckets, +Inf
    assert counts == {("other", "other"): sent // 2, ("orders", "other"): sent - sent // 2}
