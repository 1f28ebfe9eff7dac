"""Traces: W3C trace context in and out of a sidecar, and spans exported to a real OTLP/HTTP receiver."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus

from mesh import ConfigError, config
from mesh.config.model import Tracing
from mesh.observe.tracing import CLOSE_TIMEOUT, Tracer, format_traceparent, parse_traceparent
from mesh.testing import run_mesh

from ..harness import free_port

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"
HEX = "0123456789abcdef"


# --- traceparent, as the W3C Trace Context spec (level 1) reads it ---

@pytest.mark.parametrize("value, expected", [
    (VALID, (TRACE, PARENT, True)),
    (f"00-{TRACE}-{PARENT}-00", (TRACE, PARENT, False)),
    (f"00-{TRACE}-{PARENT}-09", (TRACE, PARENT, True)),           # unknown flags: the sampled bit counts
    (f"00-{TRACE}-{PARENT}-fe", (TRACE, PARENT, False)),
    (f" \t{VALID} ", (TRACE, PARENT, True)),                        # optional white space around the value
    (f"cc-{TRACE}-{PARENT}-01", (TRACE, PARENT, True)),            # a later version, read as far as 00 goes
    (f"cc-{TRACE}-{PARENT}-01-what-the-future-will-be-like", (TRACE, PARENT, True)),
    (f"01-{TRACE}-{PARENT}-03-", (TRACE, PARENT, True)),
])
def test_valid_traceparent(value, expected):
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize("value", [
    "",
    "00",
    f"ff-{TRACE}-{PARENT}-01",                                     # version ff is never valid
    f"00-{TRACE}-{PARENT}-01-what-the-future-will-be-like",        # version 00 is exactly 55 characters
    f"00-{TRACE}-{PARENT}-01-",
    f"cc-{TRACE}-{PARENT}-01.what-the-future-will-be-like",        # after the flags: the end or '-'
    f"0-{TRACE}-{PARENT}-01",
    f"000-{TRACE}-{PARENT}-01",
    f"0g-{TRACE}-{PARENT}-01",
    f"00-{'0' * 32}-{PARENT}-01",                                  # all-zero ids
    f"00-{TRACE}-{'0' * 16}-01",
    f"00-{TRACE.upper()}-{PARENT}-01",                             # lower-case hex only
    f"00-{TRACE}-{PARENT.upper()}-01",
    f"00-{TRACE}-{PARENT}-0A",
    f"00-{TRACE[:-1]}-{PARENT}-01",                                # wrong lengths
    f"00-{TRACE}0-{PARENT}-01",
    f"00-{TRACE}-{PARENT[:-1]}-01",
    f"00-{TRACE}-{PARENT}0-01",
    f"00-{TRACE}-{PARENT}-1",
    f"00-{TRACE}-{PARENT}-011",
    f"00-{TRACE[:-1]}x-{PARENT}-01",                               # not hex
    f"00-{TRACE}-{PARENT[:-1]}.-01",
    f"00-{TRACE}-{PARENT}-.1",
    f"00_{TRACE}_{PARENT}_01",                                     # wrong separators
    f"00-{TRACE}-{PARENT}-01\n",
    f"00-{TRACE}-{PARENT}",
])
def test_invalid_traceparent(value):
    assert parse_traceparent(value) is None


ids = st.text(alphabet=HEX, min_size=32, max_size=32).filter(lambda s: s != "0" * 32)
span_ids = st.text(alphabet=HEX, min_size=16, max_size=16).filter(lambda s: s != "0" * 16)


@given(ids, span_ids, st.booleans())
def test_what_is_written_reads_back(trace_id, span_id, sampled):
    value = format_traceparent(trace_id, span_id, sampled)
    assert len(value) == 55
    assert parse_traceparent(value) == (trace_id, span_id, sampled)


@given(st.text(max_size=80) | st.builds(lambda a, b: a + b, st.sampled_from([VALID, VALID[:54]]), st.text()))
def test_any_text_parses_or_is_refused(value):
    parsed = parse_traceparent(value)
    if parsed is not None:
        trace_id, parent_id, _ = parsed
        assert len(trace_id) == 32 and set(trace_id) <= set(HEX) and trace_id != "0" * 32
        assert len(parent_id) == 16 and set(parent_id) <= set(HEX) and parent_id != "0" * 16


@given(st.sampled_from(["00", "cc", "fe", "ff"]), st.text(alphabet="-." + HEX, max_size=12))
def test_versions_and_what_follows(version, rest):
    parsed = parse_traceparent(f"{version}-{TRACE}-{PARENT}-01{rest}")
    valid = version != "ff" and (rest == "" or (version != "00" and rest.startswith("-")))
    assert (parsed is not None) == valid


# --- what a request carries on after the sidecar ---

def test_a_valid_traceparent_makes_our_span_its_child():
    tracer = Tracer("orders", None)
    headers = CIMultiDict({"TraceParent": VALID, "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"})
    span = tracer.begin(headers)
    assert (span.trace_id, span.parent_id, span.sampled) == (TRACE, PARENT, True)
    assert len(span.span_id) == 16 and span.span_id != PARENT and int(span.span_id, 16) != 0
    # The app sees our span as its parent, and the vendors' state as it came.
    assert headers.getall("traceparent") == [f"00-{TRACE}-{span.span_id}-01"]
    assert headers.getall("tracestate") == ["congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"]
    assert abs(span.start_ns - time.time_ns()) < 5e9


def test_the_callers_sampling_decision_is_kept():
    tracer = Tracer("orders", Tracing(sample=1.0))
    headers = CIMultiDict(traceparent=f"00-{TRACE}-{PARENT}-00")
    span = tracer.begin(headers)
    assert not span.sampled and headers["traceparent"].endswith("-00")
    sampled = Tracer("orders", Tracing(sample=0.0)).begin(CIMultiDict(traceparent=VALID))
    assert sampled.sampled


def test_a_later_version_is_answered_with_ours():
    headers = CIMultiDict(traceparent=f"cc-{TRACE}-{PARENT}-01-extra", tracestate="a=b")
    span = Tracer("orders", None).begin(headers)
    assert (span.trace_id, span.parent_id) == (TRACE, PARENT)
    assert headers["traceparent"] == f"00-{TRACE}-{span.span_id}-01" and headers["tracestate"] == "a=b"


@pytest.mark.parametrize("given_headers", [
    {},
    {"tracestate": "congo=t61rcWkgMzE"},
    {"traceparent": f"ff-{TRACE}-{PARENT}-01", "tracestate": "congo=t61rcWkgMzE"},
    {"traceparent": f"00-{'0' * 32}-{PARENT}-01", "tracestate": "congo=t61rcWkgMzE"},
])
def test_without_a_valid_traceparent_a_new_trace_starts(given_headers):
    headers = CIMultiDict(given_headers)
    span = Tracer("orders", None).begin(headers)
    assert span.parent_id is None and span.trace_id != TRACE and span.sampled  # sample defaults to 1.0
    assert len(span.trace_id) == 32 and int(span.trace_id, 16) != 0
    assert headers.getall("traceparent") == [f"00-{span.trace_id}-{span.span_id}-01"]
    assert "tracestate" not in headers  # it belonged to the trace the caller had


def test_two_traceparent_headers_are_invalid():
    headers = CIMultiDict([("traceparent", VALID), ("traceparent", f"00-{'1' * 32}-{PARENT}-01")])
    span = Tracer("orders", None).begin(headers)
    assert span.parent_id is None and span.trace_id not in (TRACE, "1" * 32)
    assert len(headers.getall("traceparent")) == 1


def test_every_span_and_new_trace_has_ids_of_its_own():
    tracer = Tracer("orders", None)
    spans = [tracer.begin(CIMultiDict()) for _ in range(1000)]
    assert len({s.trace_id for s in spans}) == 1000
    assert len({s.span_id for s in spans}) == 1000


def test_new_traces_are_sampled_by_the_configured_share():
    assert not any(Tracer("x", Tracing(sample=0.0)).begin(CIMultiDict()).sampled for _ in range(500))
    assert all(Tracer("x", Tracing(sample=1.0)).begin(CIMultiDict()).sampled for _ in range(500))
    tracer = Tracer("x", Tracing(sample=0.25))
    sampled = sum(tracer.begin(CIMultiDict()).sampled for _ in range(4000))
    assert 800 < sampled < 1200  # 1000 expected, sigma ~27


# --- export over OTLP/HTTP, to a receiver of the test's own ---

@pytest.fixture
async def collector(aiohttp_server):
    """An OTLP/HTTP traces receiver: decodes each request and keeps (resource attributes, span) pairs."""
    received: list[tuple[dict[str, str], ProtoSpan]] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                received.extend((resource, span) for span in scope_spans.spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    server = await aiohttp_server(app, host="127.0.0.1")
    server.received = received
    server.endpoint = str(server.make_url("/v1/traces"))
    return server


def attributes_of(span: ProtoSpan) -> dict[str, object]:
    values = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


async def test_a_sampled_span_reaches_the_collector_with_our_ids(collector):
    tracer = Tracer("orders", Tracing(otlp=collector.endpoint))
    headers = CIMultiDict(traceparent=VALID)
    span = tracer.begin(headers)
    attributes = {"http.request.method": "GET", "http.route": "/orders/{id}", "http.response.status_code": 503,
                  "mesh.peer": "web", "mesh.duration_ms": 1.5}
    tracer.end(span, name="GET /orders/{id}", status=503, attributes=attributes)
    fresh = tracer.begin(CIMultiDict())
    tracer.end(fresh, name="GET /healthz", status=200, attributes={})
    await tracer.close()  # sends what is queued: nothing else waits for the batch's schedule

    assert len(collector.received) == 2
    by_name = {s.name: (resource, s) for resource, s in collector.received}
    resource, exported = by_name["GET /orders/{id}"]
    assert resource["service.name"] == "orders"
    assert exported.trace_id.hex() == TRACE
    assert exported.span_id.hex() == span.span_id
    assert exported.parent_span_id.hex() == PARENT
    assert exported.kind == ProtoSpan.SPAN_KIND_SERVER
    assert exported.status.code == ProtoStatus.STATUS_CODE_ERROR
    assert exported.start_time_unix_nano == span.start_ns
    assert exported.start_time_unix_nano <= exported.end_time_unix_nano <= time.time_ns()
    assert attributes_of(exported) == attributes

    _, root = by_name["GET /healthz"]
    assert root.trace_id.hex() == fresh.trace_id and root.span_id.hex() == fresh.span_id
    assert root.parent_span_id == b"" and root.status.code == ProtoStatus.STATUS_CODE_UNSET


async def test_what_is_not_sampled_is_not_exported(collector):
    tracer = Tracer("orders", Tracing(otlp=collector.endpoint, sample=0.0))
    for headers in (CIMultiDict(), CIMultiDict(traceparent=f"00-{TRACE}-{PARENT}-00")):
        span = tracer.begin(headers)
        assert not span.sampled
        tracer.end(span, name="GET /", status=200, attributes={})
    await tracer.close()
    assert collector.received == []


async def test_without_an_endpoint_nothing_is_exported(collector):
    tracer = Tracer("orders", Tracing(sample=1.0))
    span = tracer.begin(CIMultiDict())
    tracer.end(span, name="GET /", status=200, attributes={})
    await tracer.close()
    await tracer.close()
    assert collector.received == []


@pytest.mark.slow
@pytest.mark.parametrize("answers", [False, True])
async def test_close_is_bounded_when_the_collector_is_gone_or_silent(aiohttp_server, answers):
    """Nobody listens (the exporter retries), or a collector takes the request and never answers."""
    if answers:
        async def silent(request: web.Request) -> web.Response:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        app = web.Application()
        app.router.add_post("/v1/traces", silent)
        endpoint = str((await aiohttp_server(app, host="127.0.0.1")).make_url("/v1/traces"))
    else:
        endpoint = f"http://127.0.0.1:{free_port()}/v1/traces"
    tracer = Tracer("orders", Tracing(otlp=endpoint))
    tracer.end(tracer.begin(CIMultiDict()), name="GET /", status=200, attributes={})
    started = time.monotonic()
    await tracer.close()
    assert time.monotonic() - started < CLOSE_TIMEOUT + 1.5


# --- [mesh.tracing] in mesh.toml ---

SERVICE = '[services.web]\ncommand = "x"\n'


def load(tmp_path, text: str):
    (tmp_path / "mesh.toml").write_text(text + SERVICE)
    return config.load(tmp_path)


def problems_of(tmp_path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value.problems


def test_tracing_is_optional(tmp_path):
    assert load(tmp_path, "").tracing is None


def test_tracing_table_loads(tmp_path):
    cfg = load(tmp_path, '[mesh.tracing]\notlp = "http://127.0.0.1:4318/v1/traces"\nsample = 0.1\n')
    assert cfg.tracing == Tracing(otlp="http://127.0.0.1:4318/v1/traces", sample=0.1)
    assert load(tmp_path, "[mesh]\ntracing = { sample = 1 }\n").tracing == Tracing(otlp=None, sample=1.0)


@pytest.mark.parametrize("table, expected", [
    ("sample = 1.5", "mesh.tracing: sample: expected a share of new traces between 0 and 1 (0.1: 10%), found 1.5"),
    ("sample = -0.1", "found -0.1"),
    ("sample = nan", "found nan"),
    ('sample = "10%"', "mesh.tracing.sample: expected a number, found '10%' (string)"),
    ("otlp = 4318", "mesh.tracing.otlp: expected a string, found 4318 (integer)"),
    ('otlp = "127.0.0.1:4318/v1/traces"', "mesh.tracing: otlp: expected the URL of a collector's OTLP/HTTP "
                                          "traces endpoint, like 'http://127.0.0.1:4318/v1/traces', "
                                          "found '127.0.0.1:4318/v1/traces'"),
    ('otlp = "grpc://collector:4317/v1/traces"', "otlp: expected the URL of a collector's"),
    ('otlp = "http://collector:99999/v1/traces"', "otlp: expected the URL of a collector's"),
    ('otlp = "http:///v1/traces"', "otlp: expected the URL of a collector's"),
    ('otlp = "http://collector:4318"', "mesh.tracing: otlp: expected a URL with the traces path, like "
                                       "'http://127.0.0.1:4318/v1/traces', found 'http://collector:4318' "
                                       "(add '/v1/traces')"),
    ('endpoint = "http://collector:4318/v1/traces"', "mesh.tracing: unknown option 'endpoint' (known: otlp, "
                                                     "sample)"),
    ("smaple = 0.5", "mesh.tracing: unknown option 'smaple', did you mean 'sample'?"),
])
def test_tracing_problems(tmp_path, table, expected):
    problems = problems_of(tmp_path, f"[mesh.tracing]\n{table}\n")
    assert len(problems) == 1 and expected in problems[0], problems


PLUGGED = """
[mesh]
name = "traced"
plugin_path = ["."]
[mesh.tracing]
otlp = "{endpoint}"
[services.web]
command = "x"
port = 1
expose = 1
plugins = [ {{ use = "gate.py:Gate" }} ]
"""

GATE = '''
from mesh import Plugin, Response

class Gate(Plugin):
    async def handle(self, request, call_next):
        if request.path == "/deny":
            return Response(401, "no")
        return await call_next(request)
'''


async def test_each_plugin_call_is_a_span_inside_the_sidecars(collector, aiohttp_server, tmp_path):
    (tmp_path / "gate.py").write_text(GATE)
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    port = (await aiohttp_server(app)).port
    async with run_mesh(PLUGGED.format(endpoint=collector.endpoint), {"web": port}, tmp_path, tls=False) as mesh:
        async with aiohttp.ClientSession() as client:
            for path in ("/ok", "/deny"):
                async with client.get(mesh.url("web") + path) as response:
                    await response.read()
    # run_mesh's end closed the tracer, which sent what was queued.
    spans = [span for _, span in collector.received]
    sidecar = {s.span_id: s for s in spans if s.kind == ProtoSpan.SPAN_KIND_SERVER}
    plugin = [s for s in spans if s.name == "plugin gate.py:Gate"]
    assert len(sidecar) == 2 and len(plugin) == 2
    for span in plugin:
        parent = sidecar[span.parent_span_id]
        assert span.kind == ProtoSpan.SPAN_KIND_INTERNAL and span.trace_id == parent.trace_id
        assert parent.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
        assert span.end_time_unix_nano <= parent.end_time_unix_nano
    answered = [attributes_of(s).get("mesh.plugin.answered") for s in plugin]
    assert sorted(answered, key=str) == [401, None]
