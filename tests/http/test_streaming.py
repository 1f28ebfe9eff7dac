"""1 GiB each way through a real sidecar process, with its memory staying bounded."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from ..conftest import free_port

GIB = 1 << 30
CHUNK = 256 * 1024


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
async def app_port(aiohttp_server):
    async def upload(request):
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        return web.json_response({"received": total,
                                  "chunked": request.headers.get("Transfer-Encoding") == "chunked"})

    async def download(request):
        size = int(request.query["size"])
        headers = {} if "chunked" in request.query else {"Content-Length": str(size)}
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        block = b"m" * CHUNK
        for _ in range(size // CHUNK):
            await resp.write(block)
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=2 * GIB)
    app.router.add_post("/upload", upload)
    app.router.add_get("/download", download)
    server = await aiohttp_server(app)
    return server.port


@pytest.fixture
def sidecar(tmp_path, app_port):
    (tmp_path / "mesh.toml").write_text('[services.big]\ncommand = "unused"\n')
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", "sidecar", "--config", str(tmp_path), "--service", "big",
         "--app-port", str(app_port), "--public-port", str(port), "--mesh-port", str(free_port()),
         "--outbound-port", str(free_port()), "--admin-port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    yield proc, port
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def wait_listening(port: int) -> None:
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError("sidecar did not start")


async def body(size: int):
    block = b"u" * CHUNK
    for _ in range(size // CHUNK):
        yield block


@pytest.mark.slow
async def test_one_gib_each_way_with_bounded_memory(sidecar):
    proc, port = sidecar
    await wait_listening(port)
    base = f"http://127.0.0.1:{port}"
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        # Chunked upload, then one with Content-Length.
        async with session.post(base + "/upload", data=body(GIB)) as resp:
            assert await resp.json() == {"received": GIB, "chunked": True}
        async with session.post(base + "/upload", data=body(GIB),
                                headers={"Content-Length": str(GIB)}) as resp:
            assert await resp.json() == {"received": GIB, "chunked": False}
        for query in ("", "&chunked=1"):
            async with session.get(f"{base}/download?size={GIB}{query}") as resp:
                assert resp.status == 200
                if not query:
                    assert resp.headers["Content-Length"] == str(GIB)
                total = 0
                async for chunk in resp.content.iter_any():
                    total += len(chunk)
                assert total == GIB
    assert proc.poll() is None
    peak = peak_rss_mib(proc.pid)
    print(f"sidecar peak RSS {peak:.0f} MiB")
    assert peak < 120, f"sidecar peaked at {peak:.0f} MiB moving 4 GiB"


# through an in-process sidecar: the idle bound between chunks, and bodies that break off

QUIET = """
[mesh]
name = "quiet"
[services.web]
command = "app"
{web}
[services.api]
command = "app"
{api}
[[routes]]
from = "web"
to = "api"
{route}
"""


def gap_app(gap: float):
    """An app whose /sse sends an event, is quiet for ``gap`` seconds, then sends the last one."""

    async def sse(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.sleep(gap)
        await resp.write(b"data: last\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/sse", sse)
    return app


async def read_stream(url: str, **kwargs) -> tuple[bytes, BaseException | None]:
    got = b""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.get(url, **kwargs) as resp:
                assert resp.status == 200
                async for chunk in resp.content.iter_any():
                    got += chunk
    except aiohttp.ClientPayloadError as exc:
        return got, exc
    return got, None


@pytest.mark.parametrize("setting,cut", [('stream_idle_timeout = "3s"', False),
                                         ('stream_idle_timeout = "500ms"', True)])
async def test_the_services_stream_idle_timeout_is_the_bound_between_chunks(aiohttp_server, setting, cut):
    from mesh.testing import run_mesh

    app = await aiohttp_server(gap_app(1.0))
    toml = QUIET.format(web=setting, api="", route="")
    async with run_mesh(toml, {"web": app.port, "api": app.port}) as mesh:
        got, error = await read_stream(mesh.url("web") + "/sse")
    if cut:
        assert got == b"data: first\n\n" and error is not None
    else:
        assert got == b"data: first\n\ndata: last\n\n" and error is None


@pytest.mark.parametrize("route,cut", [('stream_idle_timeout = "500ms"', True), ("", False)])
async def test_a_routes_stream_idle_timeout_bounds_the_calling_side(aiohttp_server, route, cut):
    from mesh.testing import run_mesh

    app = await aiohttp_server(gap_app(1.0))
    # The target's own (3 s) bounds its sidecar's call to its app; the route's, when set, the caller's.
    toml = QUIET.format(web='stream_idle_timeout = "3s"', api='stream_idle_timeout = "3s"', route=route)
    async with run_mesh(toml, {"web": app.port, "api": app.port}) as mesh:
        got, error = await read_stream(mesh.url("web", "outbound") + "/sse", headers={"Host": "api"})
    if cut:
        assert got == b"data: first\n\n" and error is not None
    else:
        assert got == b"data: first\n\ndata: last\n\n" and error is None


def test_the_default_stream_idle_timeout_lets_a_minute_of_quiet_pass(tmp_path):
    from mesh import config as config_mod
    from mesh.http.client import Limits

    (tmp_path / "mesh.toml").write_text(QUIET.format(web="", api="", route=""))
    cfg = config_mod.load(tmp_path)
    assert cfg.services["web"].stream_idle_timeout >= 120
    assert Limits().stream_idle_timeout >= 120


def broken_app(framing: str, ending: str):
    """A raw app: a response of ``framing``, five bytes of body, then a FIN or a reset."""
    import socket
    import struct

    async def serve(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            if framing == "chunked":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            elif framing == "length":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello")
            await writer.drain()
            await asyncio.sleep(0.2)
            if ending == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
        except ConnectionError:
            writer.close()

    return serve


@pytest.mark.parametrize("framing,ending,complete", [
    ("chunked", "reset", False), ("chunked", "fin", False), ("close", "reset", False),
    ("length", "reset", False), ("length", "fin", False), ("close", "fin", True)])
@pytest.mark.parametrize("way", ["public", "outbound"])
async def test_a_body_that_breaks_off_reaches_the_client_aborted(framing, ending, complete, way):
    from mesh.testing import run_mesh

    from ..conftest import port_of, raw_http

    server = await asyncio.start_server(broken_app(framing, ending), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with run_mesh(QUIET.format(web="", api="", route=""), {"web": port, "api": port}) as mesh:
            host = b"web" if way == "public" else b"api"
            # Keep-alive asked for: only the sidecar closing the connection ends the read of a broken one.
            close = b"Connection: close\r\n" if complete else b""
            data = await raw_http(port_of(mesh.url("web", way)),
                                  b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n" + close + b"\r\n", timeout=10)
    finally:
        server.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    if complete:
        assert b"transfer-encoding: chunked" in head.lower()
        assert body == b"5\r\nhello\r\n0\r\n\r\n"
    else:
        # Cut short as it came: the client never sees the end of a body that did not end.
        assert not body.endswith(b"0\r\n\r\n")
        assert b"hello" in body
        if b"content-length: 100" in head.lower():
            assert len(body) < 100
