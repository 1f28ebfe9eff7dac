"""1 GiB each way through a real sidecar process, with its memory staying bounded."""

from __future__ import annotations

import asyncio
import os
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
