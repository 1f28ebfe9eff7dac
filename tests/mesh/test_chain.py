"""The onion: order, short-circuit, errors that fail closed, lifecycle."""

from __future__ import annotations

import contextvars

import pytest

from mesh import Context, Plugin, PluginError, Response
from mesh.chain import Chain, build_chain
from mesh.testing import make_request, ok, run_chain, run_plugin, started, stream

trace: list[str] = []


class Mark(Plugin):
    def __init__(self, name: str):
        self.name = name

    async def handle(self, request, call_next):
        trace.append(f"{self.name} before")
        response = await call_next(request)
        trace.append(f"{self.name} after")
        return response


async def test_first_listed_is_outermost():
    trace.clear()

    async def terminal(request):
        trace.append("terminal")
        return Response(200)

    handler = build_chain([("a", Mark("a")), ("b", Mark("b"))], terminal)
    await handler(make_request())
    assert trace == ["a before", "b before", "terminal", "b after", "a after"]


async def test_short_circuit_skips_the_rest():
    called = []

    class Deny(Plugin):
        async def handle(self, request, call_next):
            return Response(401, "no")

    async def terminal(request):
        called.append(1)
        return Response(200)

    response = await run_chain([Deny(), Mark("x")], upstream=terminal)
    assert response.status == 401 and called == []


async def test_a_raising_plugin_fails_closed_with_a_500():
    reached = []

    class Broken(Plugin):
        async def handle(self, request, call_next):
            raise KeyError("oops")

    async def terminal(request):
        reached.append(request)
        return Response(200)

    request = make_request()
    response = await run_chain([Broken()], request, upstream=terminal)
    assert response.status == 500 and reached == []
    assert request.id in (await response.read()).decode()
    assert response.headers["x-request-id"] == request.id


async def test_an_error_after_call_next_is_still_a_500():
    class Late(Plugin):
        async def handle(self, request, call_next):
            await call_next(request)
            raise ValueError("after")

    assert (await run_chain([Late()])).status == 500


async def test_context_variables_flow_both_ways():
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    class Reader(Plugin):
        async def handle(self, request, call_next):
            response = await call_next(request)
            response.headers["seen"] = var.get()
            return response

    async def terminal(request):
        var.set("set downstream")
        return Response(200)

    response = await run_chain([Reader()], upstream=terminal)
    assert response.headers["seen"] == "set downstream"


async def test_streaming_bodies_are_not_buffered():
    pulled = []

    async def body():
        for i in range(3):
            pulled.append(i)
            yield b"x"

    async def terminal(request):
        return Response(200, body())

    response = await run_chain([Mark("a"), Mark("b")], upstream=terminal)
    assert pulled == []  # nothing read until the writer streams it
    assert await response.read() == b"xxx" and pulled == [0, 1, 2]


async def test_read_buffers_once_and_caches():
    request = make_request("POST", body=stream([b"ab", b"cd"]))
    assert await request.read() == b"abcd"
    assert await request.read() == b"abcd"
    with pytest.raises(Exception, match="larger than 2"):
        await make_request("POST", body=stream([b"abc"])).read(limit=2)


async def test_start_failure_stops_only_the_started_ones():
    events = []

    class Res(Plugin):
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        async def start(self, ctx):
            if self.fail:
                raise OSError("no redis")
            events.append(f"start {self.name}")

        async def stop(self):
            events.append(f"stop {self.name}")

    chain = Chain([("a", Res("a")), ("b", Res("b")), ("c", Res("c", fail=True)), ("d", Res("d"))], ok)
    with pytest.raises(PluginError, match="plugin c failed to start: no redis"):
        await chain.start(Context())
    assert events == ["start a", "start b", "stop b", "stop a"]


async def test_testing_helpers_run_start_and_stop():
    class Counter(Plugin):
        started = stopped = False

        async def start(self, ctx):
            self.started = True

        async def stop(self):
            self.stopped = True

    plugin = Counter()
    async with started(plugin):
        assert plugin.started
        assert (await run_plugin(plugin)).status == 200
    assert plugin.stopped
