"""One path and one set of headers for every check: what plugins, policy and the app see agree.

Each case is a bypass seen against an earlier mesh: an encoded letter that
slipped past a plugin's prefix check, an underscore spelling of a header the
mesh vouches for, a slow upload holding a single-worker app.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web

from mesh.testing import run_mesh

from ..conftest import port_of, raw_http

DENY = '''
from mesh import Plugin, Response

class DenyInternal(Plugin):
    """What a user writes: refuse /api/internal and everything under it."""

    async def handle(self, request, call_next):
        if request.path.startswith("/api/internal"):
            return Response(403, "internal")
        return await call_next(request)
'''

TOML = """
[mesh]
name = "t"
plugin_path = ["plugins"]
[services.a]
command = "app"
{a_extra}
[services.b]
command = "app"
[[routes]]
from = "a"
to = "b"
"""


async def seen(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"method": request.method, "path": request.raw_path, "len": len(body),
                              "headers": {k.lower(): v for k, v in request.headers.items()}})


@pytest.fixture
async def app(aiohttp_server):
    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", seen)
    return await aiohttp_server(application)


def mesh_folder(tmp_path, a_extra: str = ""):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "deny.py").write_text(DENY)
    (tmp_path / "mesh.toml").write_text(TOML.format(a_extra=a_extra))
    return tmp_path


@pytest.mark.parametrize("path", ["/api/%69nternal/x", "/%61pi/internal", "/api/%69%6E%74ernal",
                                  "/api/./internal", "/x/../api/internal", "//api//internal"])
async def test_a_user_plugin_and_the_app_see_one_path(app, tmp_path, path):
    folder = mesh_folder(tmp_path, 'plugins = [{ use = "deny.py:DenyInternal" }]')
    async with run_mesh((folder / "mesh.toml").read_text(), {"a": app.port, "b": app.port}, folder) as mesh:
        data = await raw_http(port_of(mesh.url("a")), f"GET {path} HTTP/1.1\r\nHost: a\r\n"
                                                       f"Connection: close\r\n\r\n".encode())
        assert data.startswith(b"HTTP/1.1 403 "), data
        data = await raw_http(port_of(mesh.url("a")), b"GET /%61pi/%7epublic%3a HTTP/1.1\r\nHost: a\r\n"
                                                       b"Connection: close\r\n\r\n")
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["path"] == "/api/~public%3A"


async def test_ratelimit_keyed_by_path_is_not_evaded_by_encoding(app, tmp_path):
    folder = mesh_folder(tmp_path, 'plugins = [{ use = "ratelimit", limit = "2/hour", key = "path" }]')
    async with run_mesh((folder / "mesh.toml").read_text(), {"a": app.port, "b": app.port}, folder) as mesh:
        statuses = []
        for path in ("/api/x", "/%61pi/x", "/api/%78", "/%61%70%69/x"):
            data = await raw_http(port_of(mesh.url("a")), f"GET {path} HTTP/1.1\r\nHost: a\r\n"
                                                           f"Connection: close\r\n\r\n".encode())
            statuses.append(int(data[9:12]))
    assert statuses == [200, 200, 429, 429]


async def test_identity_headers_cannot_be_forged_in_any_spelling(app, tmp_path):
    folder = mesh_folder(tmp_path)
    async with run_mesh((folder / "mesh.toml").read_text(), {"a": app.port, "b": app.port}, folder) as mesh:
        head = ("GET / HTTP/1.1\r\nHost: {host}\r\nX_Mesh_Peer: admin\r\nx-MESH-peer: admin\r\n"
                "X_User: alice\r\nConnection: close\r\n\r\n")
        data = await raw_http(port_of(mesh.url("b")), head.format(host="b").encode())
        headers = json.loads(data.split(b"\r\n\r\n", 1)[1])["headers"]
        assert not {"x-mesh-peer", "x_mesh_peer", "x_user"} & set(headers), headers
        # Through the mesh, the peer is what the certificate says, whatever the app sent.
        data = await raw_http(port_of(mesh.url("a", "outbound")), head.format(host="b").encode())
        headers = json.loads(data.split(b"\r\n\r\n", 1)[1])["headers"]
        assert headers["x-mesh-peer"] == "a" and "x_mesh_peer" not in headers and "x_user" not in headers


async def test_underscore_headers_pass_when_the_service_allows_them(app, tmp_path):
    folder = mesh_folder(tmp_path, "underscores_in_headers = true")
    async with run_mesh((folder / "mesh.toml").read_text(), {"a": app.port, "b": app.port}, folder) as mesh:
        data = await raw_http(port_of(mesh.url("a")), b"GET / HTTP/1.1\r\nHost: a\r\nX_Custom: 1\r\n"
                                                       b"X_Mesh_Peer: admin\r\nConnection: close\r\n\r\n")
        headers = json.loads(data.split(b"\r\n\r\n", 1)[1])["headers"]
        assert headers["x_custom"] == "1" and "x_mesh_peer" not in headers


async def test_asterisk_form_options_reaches_the_app(tmp_path):
    lines = []

    async def raw_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines.append(head.split(b"\r\n", 1)[0])
        writer.write(b"HTTP/1.1 200 OK\r\nAllow: GET, OPTIONS\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(raw_app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    folder = mesh_folder(tmp_path)
    try:
        async with run_mesh((folder / "mesh.toml").read_text(), {"a": port, "b": port}, folder) as mesh:
            data = await raw_http(port_of(mesh.url("a")), b"OPTIONS * HTTP/1.1\r\nHost: a\r\n"
                                                           b"Connection: close\r\n\r\n")
    finally:
        server.close()
    assert data.startswith(b"HTTP/1.1 200 ") and b"Allow: GET, OPTIONS" in data
    assert lines == [b"OPTIONS * HTTP/1.1"]


async def test_absolute_form_through_the_outbound_listener_as_http_proxy(app, tmp_path):
    folder = mesh_folder(tmp_path)
    async with run_mesh((folder / "mesh.toml").read_text(), {"a": app.port, "b": app.port}, folder) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.get("http://b/%61bc", proxy=mesh.url("a", "outbound")) as resp:
                got = await resp.json()
        assert got["path"] == "/abc" and got["headers"]["x-mesh-peer"] == "a"


async def test_a_slow_upload_does_not_hold_a_single_worker_app(tmp_path):
    """The app serves one request at a time; a client trickling a small body must not block it."""
    lock = asyncio.Lock()
    served = []

    async def one_at_a_time(request: web.Request) -> web.Response:
        async with lock:
            body = await request.read()
            served.append((request.path, len(body)))
            return web.Response(text="ok")

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", one_at_a_time)
    runner = web.AppRunner(application)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    folder = mesh_folder(tmp_path)
    try:
        async with run_mesh((folder / "mesh.toml").read_text(), {"a": port, "b": port}, folder) as mesh:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(mesh.url("a")))
            writer.write(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nfirst bytes")
            await writer.drain()
            for i in range(3):  # the app keeps serving others meanwhile
                data = await raw_http(port_of(mesh.url("a")), f"GET /other{i} HTTP/1.1\r\nHost: a\r\n"
                                                               f"Connection: close\r\n\r\n".encode(), timeout=20)
                assert data.startswith(b"HTTP/1.1 200 ")
            assert [path for path, _ in served] == ["/other0", "/other1", "/other2"]
            writer.write(b"x" * (1000 - len(b"first bytes")))
            async with asyncio.timeout(20):
                head = await reader.readuntil(b"\r\n\r\n")
            writer.close()
            assert head.startswith(b"HTTP/1.1 200 ") and served[-1] == ("/upload", 1000)
    finally:
        await runner.cleanup()


async def test_websocket_through_the_outbound_listener_as_http_proxy(tmp_path, aiohttp_server):
    """aiohttp's client, given HTTP_PROXY, sends the handshake in absolute-form."""

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str("echo " + message.data)
        return ws

    application = web.Application()
    application.router.add_get("/ws", echo)
    server = await aiohttp_server(application)
    folder = mesh_folder(tmp_path)
    async with run_mesh((folder / "mesh.toml").read_text(), {"a": server.port, "b": server.port}, folder) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect("ws://b/ws", proxy=mesh.url("a", "outbound")) as ws:
                await ws.send_str("hi")
                assert (await ws.receive(timeout=10)).data == "echo hi"
