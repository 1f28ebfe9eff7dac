"""The sidecar as a proxy, against real local servers: what reaches the app, what comes back."""

from __future__ import annotations

import asyncio
import logging
import re
import socket

import aiohttp
import pytest
from aiohttp import web

from mesh import Plugin, Response
from mesh.http.client import Limits
from mesh.http.server import ServerLimits
from mesh.testing import run_mesh

from ..conftest import port_of, raw_http

TWO = """
[mesh]
name = "t"
[services.a]
command = "app"
{a_extra}
[services.b]
command = "app"
{b_extra}
[[routes]]
from = "a"
to = "b"
paths = ["/public", "/public/*", "/ws"]
"""


def status_of(data: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", data)
    assert match, data[:80]
    return int(match.group(1))


def mesh_toml(a_extra: str = "", b_extra: str = "") -> str:
    return TWO.format(a_extra=a_extra, b_extra=b_extra)


async def start_app(aiohttp_server, handler, **kwargs):
    app = web.Application(**kwargs)
    app.router.add_route("*", "/{tail:.*}", handler)
    return await aiohttp_server(app)


async def seen(request: web.Request) -> web.Response:
    """Answer with what the app received."""
    body = await request.read()
    return web.json_response({
        "method": request.method, "path": request.raw_path, "len": len(body),
        "headers": {k.lower(): v for k, v in request.headers.items()},
    })


@pytest.fixture
async def app(aiohttp_server):
    return await start_app(aiohttp_server, seen)


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_forwards_and_sets_forwarding_headers(app):
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.post(mesh.url("a") + "/x?q=1", data=b"hello",
                                    headers={"traceparent": TRACEPARENT,
                                             "X-Forwarded-For": "10.0.0.9"}) as resp:
                assert resp.status == 200
                got = await resp.json()
    assert got["method"] == "POST" and got["path"] == "/x?q=1" and got["len"] == 5
    h = got["headers"]
    assert h["x-forwarded-for"] == "10.0.0.9, 127.0.0.1"
    assert h["x-forwarded-proto"] == "http"
    assert h["x-forwarded-host"] == h["host"]
    assert re.fullmatch(r"[0-9a-f]{32}", h["x-request-id"])
    # The app's parent is the sidecar's own span, in the caller's trace (W3C trace context).
    version, trace, span, flags = h["traceparent"].split("-")
    assert (version, trace, flags) == ("00", "4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert re.fullmatch(r"[0-9a-f]{16}", span) and span != "00f067aa0ba902b7"


async def test_request_id_is_kept_when_given(app):
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.get(mesh.url("a") + "/", headers={"x-request-id": "abc-123"}) as resp:
                got = await resp.json()
    assert got["headers"]["x-request-id"] == "abc-123"


async def test_hop_by_hop_headers_are_removed_both_ways(aiohttp_server):
    async def handler(request):
        return web.json_response(
            {k.lower(): v for k, v in request.headers.items()},
            headers={"Connection": "X-Internal", "X-Internal": "secret", "X-Kept": "1",
                     "Keep-Alive": "timeout=5"})

    app = await start_app(aiohttp_server, handler)
    request = (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Drop\r\nX-Drop: 1\r\n"
               b"Keep-Alive: 300\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n"
               b"Proxy-Connection: keep-alive\r\nX-Kept: 1\r\n\r\n")
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        data = await raw_http(port_of(mesh.url("a")), request)
    head, _, body = data.partition(b"\r\n\r\n")
    seen_headers = __import__("json").loads(body)
    for name in ("x-drop", "keep-alive", "te", "proxy-authorization", "proxy-connection"):
        assert name not in seen_headers
    assert seen_headers["x-kept"] == "1"
    lower = head.lower()
    assert b"x-internal" not in lower and b"keep-alive" not in lower
    assert b"x-kept: 1" in lower


async def test_status_headers_and_body_pass_unchanged(aiohttp_server):
    async def handler(request):
        resp = web.Response(status=418, reason="Short And Stout", body=b"\x00\x01binary",
                            content_type="application/x-tea")
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        resp.headers["X-Custom"] = "v"
        return resp

    app = await start_app(aiohttp_server, handler)
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.get(mesh.url("a") + "/") as resp:
                assert resp.status == 418 and resp.reason == "Short And Stout"
                assert resp.headers.getall("Set-Cookie") == ["a=1", "b=2"]
                assert resp.headers["X-Custom"] == "v"
                assert resp.headers["Content-Type"] == "application/x-tea"
                assert await resp.read() == b"\x00\x01binary"


async def test_head_204_and_304_have_no_body(aiohttp_server):
    async def handler(request):
        if request.path == "/204":
            return web.Response(status=204)
        if request.path == "/304":
            return web.Response(status=304, headers={"ETag": '"x"'})
        return web.Response(body=b"x" * 1234)

    app = await start_app(aiohttp_server, handler)
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        port = port_of(mesh.url("a"))
        head = await raw_http(port, b"HEAD /h HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
        assert b"content-length: 1234" in head.lower()
        for path in (b"/204", b"/304"):
            data = await raw_http(port, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert data.endswith(b"\r\n\r\n") and b"transfer-encoding" not in data.lower()
        # The connection to the app stays usable after a HEAD.
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(mesh.url("a") + "/") as resp:
                    assert len(await resp.read()) == 1234


async def test_keep_alive_pools_connections_to_the_app(aiohttp_server):
    peers = set()

    async def handler(request):
        peers.add(request.transport.get_extra_info("peername"))
        return web.Response(text="ok")

    app = await start_app(aiohttp_server, handler)
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            for _ in range(20):
                async with session.get(mesh.url("a") + "/") as resp:
                    assert await resp.text() == "ok"
    assert len(peers) == 1


async def test_calls_by_name_and_route_policy(app):
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            outbound = mesh.url("a", "outbound")
            # Host-form and absolute-form (HTTP_PROXY) both reach b, which sees the caller.
            async with session.get(outbound + "/public/x", headers={"Host": "b"}) as resp:
                assert resp.status == 200
                assert (await resp.json())["headers"]["x-mesh-peer"] == "a"
            async with session.get("http://b/public/y", proxy=outbound) as resp:
                assert resp.status == 200
            # A path no route allows, and a service that doesn't exist.
            async with session.get(outbound + "/private", headers={"Host": "b"}) as resp:
                assert resp.status == 403
                text = await resp.text()
                assert "'a'" in text and "'b'" in text and "/private" in text
            async with session.get(outbound + "/", headers={"Host": "nosuch"}) as resp:
                assert resp.status == 403 and "nosuch" in await resp.text()  # a host outside: no egress entry
            # No route from b to a at all.
            async with session.get(mesh.url("b", "outbound") + "/public", headers={"Host": "a"}) as resp:
                assert resp.status == 403


async def test_policy_sees_the_normalized_path(app):
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        port = port_of(mesh.url("a", "outbound"))
        for target in (b"/public/../private", b"/public/%2e%2e/private", b"//private"):
            data = await raw_http(port, b"GET " + target + b" HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 403"), target
        data = await raw_http(port, b"GET /public/./x/../y HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200") and b'"path": "/public/y"' in data


@pytest.mark.parametrize("target", [b"/a%2Fb", b"/a%2fb", b"/a%5Cb", b"/a%00b", b"/a\\b", b"/../x"])
async def test_ambiguous_paths_are_refused(app, target):
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        data = await raw_http(port_of(mesh.url("a")), b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(data) == 400
    assert target not in data  # our own body: no echo of the request


async def test_receiving_side_enforces_policy_on_its_own(app):
    # Plain mode (no TLS): the mesh listener trusts x-mesh-peer, but still applies policy.
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}, tls=False) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.get(mesh.url("a", "mesh") + "/public", headers={"x-mesh-peer": "b"}) as resp:
                assert resp.status == 403
            async with session.get(mesh.url("b", "mesh") + "/private", headers={"x-mesh-peer": "a"}) as resp:
                assert resp.status == 403


async def test_spoofed_peer_header_from_outside_never_reaches_the_app(app):
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.get(mesh.url("b") + "/", headers={"x-mesh-peer": "a"}) as resp:
                assert "x-mesh-peer" not in (await resp.json())["headers"]
            async with session.get(mesh.url("a", "outbound") + "/public",
                                   headers={"Host": "b", "x-mesh-peer": "admin"}) as resp:
                assert (await resp.json())["headers"]["x-mesh-peer"] == "a"


async def test_app_down_gives_503_retry_after_with_a_short_body():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    async with run_mesh(mesh_toml(), {"a": closed_port, "b": closed_port}) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.get(mesh.url("a") + "/") as resp:
                # Nothing listens on the app's port: it is not up (yet), so come back soon.
                assert resp.status == 503 and resp.headers["Retry-After"] == "1"
                body = await resp.text()
                assert body.startswith("503 Service Unavailable: the app is not up yet") and len(body) < 300
                assert "aiohttp" not in body.lower() and resp.headers["Server"] == "mesh"


async def test_request_timeout_gives_504(aiohttp_server):
    async def slow(request):
        await asyncio.sleep(5)
        return web.Response(text="late")

    app = await start_app(aiohttp_server, slow)
    async with run_mesh(mesh_toml(a_extra='timeout = "300ms"'), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.get(mesh.url("a") + "/") as resp:
                assert resp.status == 504
                assert "0.3s" in await resp.text()


async def test_connect_timeout_gives_504():
    # A listener whose accept queue is full drops further SYNs: connects hang.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(4):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(listener.getsockname())
            fillers.append(f)
        port = listener.getsockname()[1]
        async with run_mesh(mesh_toml(), {"a": port, "b": port},
                            upstream_limits=Limits(connect_timeout=0.3)) as mesh:
            async with aiohttp.ClientSession() as session:
                async with session.get(mesh.url("a") + "/") as resp:
                    assert resp.status == 504
                    assert "timed out connecting" in await resp.text()
    finally:
        for f in fillers:
            f.close()
        listener.close()


async def test_app_dying_mid_response_cuts_that_client_only(aiohttp_server):
    async def handler(request):
        if request.path == "/die":
            resp = web.StreamResponse(headers={"Content-Length": "1000000"})
            await resp.prepare(request)
            await resp.write(b"x" * 1000)
            request.transport.abort()
            return resp
        return web.Response(text="fine")

    app = await start_app(aiohttp_server, handler)
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with session.get(mesh.url("a") + "/die") as resp:
                    await resp.read()
            async with session.get(mesh.url("a") + "/ok") as resp:
                assert await resp.text() == "fine"


class Boom(Plugin):
    async def handle(self, request, call_next):
        if request.path == "/boom":
            raise RuntimeError("kaboom")
        return await call_next(request)


async def test_raising_plugin_gives_500_with_request_id_and_keeps_serving(app, caplog):
    toml = mesh_toml(a_extra='plugins = [{ use = "tests_boom:Boom" }]')
    import sys
    import types

    module = types.ModuleType("tests_boom")
    module.Boom = Boom
    sys.modules["tests_boom"] = module
    try:
        async with run_mesh(toml, {"a": app.port, "b": app.port}) as mesh:
            async with aiohttp.ClientSession() as session:
                with caplog.at_level(logging.ERROR):
                    async with session.get(mesh.url("a") + "/boom") as resp:
                        assert resp.status == 500
                        rid = resp.headers["x-request-id"]
                        body = await resp.text()
                assert rid in body and "kaboom" not in body
                assert any(rid in r.getMessage() and r.exc_info for r in caplog.records)
                assert "kaboom" in caplog.text
                async with session.get(mesh.url("a") + "/fine") as resp:
                    assert resp.status == 200
    finally:
        del sys.modules["tests_boom"]


async def test_websocket_is_proxied_both_ways(aiohttp_server):
    async def handler(request):
        ws = web.WebSocketResponse(protocols=["chat"])
        await ws.prepare(request)
        await ws.send_str("hello from app")
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app = await start_app(aiohttp_server, handler)
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            for url, headers in ((mesh.url("a") + "/ws", {}),
                                 (mesh.url("a", "outbound") + "/ws", {"Host": "b"})):
                async with session.ws_connect(url, protocols=["chat"], headers=headers) as ws:
                    assert ws.protocol == "chat"
                    assert (await ws.receive_str(timeout=5)) == "hello from app"
                    await ws.send_str("hi")
                    assert (await ws.receive_str(timeout=5)) == "echo:hi"
                    await ws.send_bytes(b"abc")
                    assert (await ws.receive_bytes(timeout=5)) == b"cba"


async def test_oversized_headers_get_431(app):
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        port = port_of(mesh.url("a"))
        many = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(40))
        data = await raw_http(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + many + b"\r\n")
        assert status_of(data) == 431
        one = b"X-Big: " + b"v" * 40000 + b"\r\n"
        data = await raw_http(port, b"GET / HTTP/1.1\r\nHost: a\r\n" + one + b"\r\n")
        assert status_of(data) == 431
        assert b"vvvv" not in data


async def test_malformed_request_gets_our_short_400(app):
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}) as mesh:
        port = port_of(mesh.url("a"))
        for bad in (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
                    b"GET /<script> HTTP/1.1\r\nBad Header\r\n\r\n"):
            data = await raw_http(port, bad)
            assert status_of(data) == 400, data[:60]
            assert b"aiohttp" not in data.lower() and b"<script>" not in data and b"<html" not in data


async def test_slow_clients_are_cut_off(app):
    limits = ServerLimits(header_timeout=0.3, idle_timeout=0.5, body_timeout=0.3)
    async with run_mesh(mesh_toml(), {"a": app.port, "b": app.port}, limits=limits) as mesh:
        port = port_of(mesh.url("a"))
        loop = asyncio.get_running_loop()
        # Headers dribbled forever: closed after the header timeout.
        start = loop.time()
        data = await raw_http(port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ", timeout=5)
        assert data == b"" and loop.time() - start < 3
        # A connection that never sends a byte.
        start = loop.time()
        assert await raw_http(port, b"", timeout=5) == b""
        assert loop.time() - start < 3
        # A body that stops halfway: 408, and the connection closes.
        start = loop.time()
        data = await raw_http(port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc", timeout=5)
        assert data.startswith(b"HTTP/1.1 408") and loop.time() - start < 3
        # An idle keep-alive connection is closed after the idle timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        start = loop.time()
        async with asyncio.timeout(5):
            rest = await reader.read(-1)
        writer.close()
        assert rest.startswith(b"HTTP/1.1 200") and loop.time() - start < 3


async def test_unknown_routes_to_plugin_state_upstream(app):
    # A plugin in the inbound chain may send the request on to another service by name.
    class ToB(Plugin):
        async def handle(self, request, call_next):
            request.state["upstream"] = "b"
            return await call_next(request)

    import sys
    import types

    module = types.ModuleType("tests_tob")
    module.ToB = ToB
    sys.modules["tests_tob"] = module
    try:
        toml = mesh_toml(a_extra='plugins = [{ use = "tests_tob:ToB" }]')
        async with run_mesh(toml, {"a": app.port, "b": app.port}) as mesh:
            async with aiohttp.ClientSession() as session:
                async with session.get(mesh.url("a") + "/public/z") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["headers"]["x-mesh-peer"] == "a"
                async with session.get(mesh.url("a") + "/secret") as resp:
                    assert resp.status == 403
    finally:
        del sys.modules["tests_tob"]


def test_sidecar_refuses_the_pure_python_parser(tmp_path):
    import subprocess
    import sys

    check = "from mesh.http.server import check_parser; check_parser()"
    env = dict(__import__("os").environ, AIOHTTP_NO_EXTENSIONS="1")
    # A plugin brought aiohttp in, on its pure-Python parser: refused.
    result = subprocess.run([sys.executable, "-c", "import aiohttp.http_parser; " + check], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "pure-Python parser" in result.stderr
    # The sidecar alone never imports aiohttp.
    alone = "import sys, mesh.sidecar.sidecar; " + check + "; assert 'aiohttp' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", alone], env=env, capture_output=True).returncode == 0


async def test_plain_response_short_circuit_is_sent(app):
    class Deny(Plugin):
        async def handle(self, request, call_next):
            return Response(401, "no\n", {"WWW-Authenticate": "Bearer"})

    import sys
    import types

    module = types.ModuleType("tests_deny")
    module.Deny = Deny
    sys.modules["tests_deny"] = module
    try:
        async with run_mesh(mesh_toml(a_extra='plugins = [{ use = "tests_deny:Deny" }]'),
                            {"a": app.port, "b": app.port}) as mesh:
            async with aiohttp.ClientSession() as session:
                async with session.get(mesh.url("a") + "/") as resp:
                    assert resp.status == 401 and resp.headers["WWW-Authenticate"] == "Bearer"
    finally:
        del sys.modules["tests_deny"]
