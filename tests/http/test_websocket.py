"""WebSockets as byte tunnels: through a listener alone, and through one or two real sidecars.

After the 101 the sidecar moves bytes and nothing else, so what one end
sends (fragments, pings, close codes with their reasons, extensions,
subprotocols) is what the other end gets. The listener-level tests hand
the handshake to `Pool.request` themselves; the sidecar-level ones use
aiohttp's WebSocket client and server at both ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from mesh.chain import error_response
from mesh.errors import UpstreamError
from mesh.http.client import Endpoint, Limits, Pool
from mesh.http.server import Listener
from mesh.http.websocket import accept, valid_key
from mesh.messages import Request, Response
from mesh.testing import run_mesh

from ..conftest import port_of, raw_http

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


@contextlib.asynccontextmanager
async def tunnelling(port: int, limits: Limits | None = None):
    """A listener whose handler sends every request to 127.0.0.1:``port`` through a `Pool`."""
    pool = Pool(limits)

    async def handler(request: Request, conn: Any) -> Response:
        try:
            return await pool.request(Endpoint("127.0.0.1", port), request.method, request.target,
                                      request.headers, request.body)
        except UpstreamError as exc:
            return error_response(exc, request)

    listener = Listener(handler, name="test")
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop()
        await pool.close()


def handshake(path: bytes = b"/ws", extra: bytes = b"") -> tuple[bytes, bytes]:
    key = base64.b64encode(os.urandom(16))
    return key, (b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n" + extra + b"\r\n")


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    size = len(payload)
    head = bytes(((0x80 if fin else 0) | opcode,))
    if size < 126:
        head += bytes((0x80 | size,))
    elif size < 65536:
        head += bytes((0x80 | 126,)) + size.to_bytes(2, "big")
    else:
        head += bytes((0x80 | 127,)) + size.to_bytes(8, "big")
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    async with asyncio.timeout(10):
        first, second = await reader.readexactly(2)
        assert not second & 0x80  # the app's frames are not masked
        size = second & 0x7F
        if size == 126:
            size = int.from_bytes(await reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await reader.readexactly(8), "big")
        return first & 0x0F, await reader.readexactly(size)


def echo_app(closes: list[tuple[Any, Any]] | None = None) -> web.Application:
    """Echoes text as ``echo:...`` and binary reversed; ``"bye please"`` gets close 4002 with a reason."""

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=["chat"], max_msg_size=0)
        await ws.prepare(request)
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.TEXT:
                if msg.data == "bye please":
                    await ws.close(code=4002, message=b"server says bye")
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
            else:
                if closes is not None and msg.type == WSMsgType.CLOSE:
                    closes.append((msg.data, msg.extra))
                break
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    return app


# through a listener alone


async def test_frames_fragments_pings_and_close_pass_as_sent(aiohttp_server):
    closes: list[tuple[Any, Any]] = []
    app = await aiohttp_server(echo_app(closes))
    async with tunnelling(app.port) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        key, request = handshake(extra=b"Sec-WebSocket-Protocol: other, chat\r\n")
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"Sec-WebSocket-Accept: " + accept(key.decode()).encode() + b"\r\n" in head
        assert b"Sec-WebSocket-Protocol: chat\r\n" in head
        # A text message in two fragments with a ping between them (the app answers it), then a large one.
        writer.write(client_frame(0x1, "hé".encode(), fin=False) + client_frame(0x9, b"ping!")
                     + client_frame(0x0, b"llo"))
        assert await read_frame(reader) == (0xA, b"ping!")
        assert await read_frame(reader) == (0x1, "echo:héllo".encode())
        big = os.urandom(200_000)
        writer.write(client_frame(0x2, big))
        assert await read_frame(reader) == (0x2, big[::-1])
        # The client's close, code and reason, reaches the app; the app's answer comes back.
        writer.write(client_frame(0x8, (4001).to_bytes(2, "big") + b"bye"))
        opcode, _ = await read_frame(reader)
        assert opcode == 0x8
        async with asyncio.timeout(10):
            assert await reader.read() == b""
        writer.close()
    assert closes == [(4001, "bye")]


async def test_a_refused_upgrade_is_an_ordinary_response_and_the_connection_ends():
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403, text="no sockets here")

    app = web.Application()
    app.router.add_get("/ws", refuse)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with tunnelling(port) as listener:
            _, request = handshake()
            data = await raw_http(listener.port, request + b"\x81\x85garbage")
    finally:
        await runner.cleanup()
    assert data.startswith(b"HTTP/1.1 403 Forbidden\r\n") and data.endswith(b"no sockets here")
    assert data.count(b"HTTP/1.1") == 1


async def raw_upstream(handler: Any) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_handshake(reader: asyncio.StreamReader) -> str:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"sec-websocket-key:"):
            return line.split(b":", 1)[1].strip().decode()
    raise AssertionError("no key")


def switched(key: str, accept_value: str | None = None) -> bytes:
    value = accept_value if accept_value is not None else accept(key)
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + value.encode() + b"\r\n\r\n")


async def test_a_101_that_does_not_answer_the_key_is_a_502():
    async def upstream(reader, writer):
        await read_handshake(reader)
        writer.write(switched("", accept_value=base64.b64encode(b"x" * 20).decode()) + b"\x81\x02hi")
        await reader.read()
        writer.close()

    server, port = await raw_upstream(upstream)
    try:
        async with tunnelling(port) as listener:
            _, request = handshake()
            data = await raw_http(listener.port, request)
    finally:
        server.close()
    assert data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"\x81\x02hi" not in data


async def test_half_closes_pass_both_ways():
    got = asyncio.get_running_loop().create_future()

    async def upstream(reader, writer):
        key = await read_handshake(reader)
        writer.write(switched(key) + b"hello from upstream")
        got.set_result(await reader.read())  # until the client's EOF arrives
        writer.write(b" and goodbye")
        writer.close()

    server, port = await raw_upstream(upstream)
    try:
        async with tunnelling(port) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            _, request = handshake()
            writer.write(request)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            writer.write(b"raw bytes, no frames")
            writer.write_eof()
            async with asyncio.timeout(10):
                assert await got == b"raw bytes, no frames"
                assert await reader.read() == b"hello from upstream and goodbye"
            writer.close()
    finally:
        server.close()


async def test_a_client_that_does_not_read_holds_the_upstream_back():
    total = 48 << 20
    written = 0
    finished = asyncio.Event()

    async def upstream(reader, writer):
        nonlocal written
        key = await read_handshake(reader)
        writer.write(switched(key))
        block = b"z" * (1 << 20)
        try:
            while written < total:
                writer.write(block)
                await writer.drain()
                written += len(block)
        finally:
            finished.set()
        await reader.read()
        writer.close()

    server, port = await raw_upstream(upstream)
    try:
        async with tunnelling(port) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port, limit=1 << 16)
            _, request = handshake()
            writer.write(request)
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            await asyncio.sleep(1.0)  # read nothing: kernel buffers fill, then the sidecar stops reading
            held = written
            received = 0
            async with asyncio.timeout(60):
                while received < total:
                    received += len(await reader.read(1 << 20))
            writer.close()
    finally:
        server.close()
    assert held < 32 << 20, f"{held >> 20} MiB went out to a client that read nothing"
    assert received == total and finished.is_set()


async def test_a_quiet_tunnel_is_closed_after_the_idle_timeout(aiohttp_server):
    app = await aiohttp_server(echo_app())
    async with tunnelling(app.port, Limits(stream_idle_timeout=0.5)) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        _, request = handshake()
        writer.write(request)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for _ in range(5):  # talking keeps it open well past the idle timeout
            writer.write(client_frame(0x1, b"still here"))
            assert await read_frame(reader) == (0x1, b"echo:still here")
            await asyncio.sleep(0.2)
        assert loop.time() - start > 0.8
        async with asyncio.timeout(10):
            assert await reader.read() == b""  # then, quiet: closed
        writer.close()


async def test_stopping_the_listener_closes_its_tunnels(aiohttp_server):
    app = await aiohttp_server(echo_app())
    pool = Pool()

    async def handler(request: Request, conn: Any) -> Response:
        return await pool.request(Endpoint("127.0.0.1", app.port), request.method, request.target,
                                  request.headers)

    listener = Listener(handler, name="test")
    await listener.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    _, request = handshake()
    writer.write(request)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 101")
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.wait_for(listener.stop(), 10)
    assert loop.time() - start < 3  # not the whole drain timeout
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    await pool.close()


def test_handshake_helpers():
    key = base64.b64encode(os.urandom(16)).decode()
    assert valid_key(key) and not valid_key("c2hvcnQ=") and not valid_key(None) and not valid_key("!!")
    assert accept(key) == base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


# through sidecars


TWO = """
[mesh]
name = "ws"
[services.a]
command = "app"
{a_extra}
[services.b]
command = "app"
[[routes]]
from = "a"
to = "b"
paths = ["/ws"]
"""


def ways(mesh: Any) -> list[tuple[str, dict[str, str]]]:
    """The public listener of a (one sidecar), and a's outbound to b (two sidecars, mutual TLS)."""
    return [(mesh.url("a") + "/ws", {}), (mesh.url("a", "outbound") + "/ws", {"Host": "b"})]


async def test_close_codes_and_reasons_pass_both_ways(aiohttp_server):
    closes: list[tuple[Any, Any]] = []
    app = await aiohttp_server(echo_app(closes))
    async with run_mesh(TWO.format(a_extra=""), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            for url, headers in ways(mesh):
                async with session.ws_connect(url, headers=headers) as ws:
                    await ws.send_str("bye please")
                    msg = await ws.receive(timeout=10)
                    assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4002, "server says bye")
                async with session.ws_connect(url, headers=headers) as ws:
                    await ws.send_str("hi")
                    assert (await ws.receive_str(timeout=10)) == "echo:hi"
                    await ws.close(code=4001, message=b"bye")
                    assert ws.close_code == 1000  # the app's own answer (aiohttp's), not an echo of ours
    for _ in range(50):  # the app's side of the second close may come a moment later
        if len(closes) == 2:
            break
        await asyncio.sleep(0.1)
    assert closes == [(4001, "bye"), (4001, "bye")]


async def test_one_mib_messages_and_subprotocols(aiohttp_server):
    app = await aiohttp_server(echo_app())
    big = os.urandom(1 << 20)
    text = "x" * (1 << 20)
    async with run_mesh(TWO.format(a_extra=""), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            for url, headers in ways(mesh):
                async with session.ws_connect(url, headers=headers, protocols=["other", "chat"],
                                              max_msg_size=0) as ws:
                    assert ws.protocol == "chat"
                    await ws.send_bytes(big)
                    assert (await ws.receive_bytes(timeout=30)) == big[::-1]
                    await ws.send_str(text)
                    assert (await ws.receive_str(timeout=30)) == "echo:" + text


async def test_the_app_sees_exactly_the_clients_handshake_plus_forwarding_headers():
    seen: list[list[tuple[str, str]]] = []

    async def upstream(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")[1:]
        pairs = [(n.strip(), v.strip()) for n, _, v in (line.partition(":") for line in lines if line)]
        seen.append(pairs)
        key = {n.lower(): v for n, v in pairs}["sec-websocket-key"]
        writer.write(switched(key))
        await reader.read()
        writer.close()

    server, port = await raw_upstream(upstream)
    client = [("Host", "a"), ("Connection", "Upgrade"), ("Upgrade", "websocket"),
              ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode()),
              ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Protocol", "chat"),
              ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits"),
              ("Origin", "http://a"), ("User-Agent", "test-client/1"), ("Cookie", "s=1")]
    try:
        async with run_mesh(TWO.format(a_extra=""), {"a": port, "b": port}) as mesh:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(mesh.url("a")))
            writer.write(b"GET /ws HTTP/1.1\r\n" + "".join(f"{n}: {v}\r\n" for n, v in client).encode()
                         + b"\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 101 ")
            writer.close()
    finally:
        server.close()
    added = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id", "traceparent",
             "tracestate"}
    got = [(n, v) for n, v in seen[0] if n.lower() not in added]
    assert sorted(got) == sorted(client)  # the same headers (Connection and Upgrade come last)


@pytest.mark.parametrize("setting,open_after_gap", [('stream_idle_timeout = "3s"', True),
                                                    ('stream_idle_timeout = "500ms"', False)])
async def test_the_services_stream_idle_timeout_bounds_a_quiet_websocket(aiohttp_server, setting, open_after_gap):
    app = await aiohttp_server(echo_app())
    async with run_mesh(TWO.format(a_extra=setting), {"a": app.port, "b": app.port}) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(mesh.url("a") + "/ws", autoping=False, heartbeat=None) as ws:
                await ws.send_str("one")
                assert (await ws.receive_str(timeout=10)) == "echo:one"
                await asyncio.sleep(1.0)
                if open_after_gap:
                    await ws.send_str("two")
                    assert (await ws.receive_str(timeout=10)) == "echo:two"
                else:
                    msg = await ws.receive(timeout=10)
                    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
