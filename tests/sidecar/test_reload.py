"""A sidecar's reload steps (``POST /reload/...`` on its admin listener): all of a version or none of it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from mesh import config
from mesh.config.version import version
from mesh.testing import run_mesh

TOML = """
[mesh]
name = "reloaded"
plugin_path = ["."]
[services.web]
command = "x"
port = 1
plugins = [ {{ use = "tag.py:Tag" }} ]
{extra}
"""

TAG = '''
from mesh import Plugin

STARTS = []

class Tag(Plugin):
    async def start(self, ctx):
        {start}
        STARTS.append("{value}")
        self.stopped = False

    async def stop(self):
        self.stopped = True

    async def handle(self, request, call_next):
        response = await call_next(request)
        response.headers["x-tag"] = "{value}"
        return response
'''


def write(folder: Path, value: str, start: str = "pass", extra: str = "") -> str:
    (folder / "tag.py").write_text(TAG.format(value=value, start=start))
    (folder / "mesh.toml").write_text(TOML.format(extra=extra))
    return version(config.load(folder))


async def app_port(aiohttp_server: Any, slow: asyncio.Event | None = None) -> int:
    async def handler(request: web.Request) -> web.Response:
        if slow is not None and request.path == "/slow":
            await slow.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    return (await aiohttp_server(app)).port


async def step(client: aiohttp.ClientSession, mesh: Any, name: str, wanted: str | None = None) -> tuple[int, str]:
    async with client.post(mesh.url("web", "admin") + f"/reload/{name}", json={"version": wanted},
                           headers=mesh.admin_headers()) as response:
        return response.status, await response.text()


async def tag(client: aiohttp.ClientSession, mesh: Any, path: str = "/") -> str | None:
    async with client.get(mesh.url("web") + path) as response:
        assert response.status == 200
        return response.headers.get("x-tag")


async def test_an_edited_plugin_serves_after_commit_and_the_old_one_stops_after_finish(aiohttp_server, tmp_path):
    first = write(tmp_path, "one")
    async with run_mesh(TOML.format(extra=""), {"web": await app_port(aiohttp_server)}, tmp_path,
                        tls=False) as mesh, aiohttp.ClientSession() as client:
        sidecar = mesh.sidecars["web"]
        assert sidecar.version == first
        old_plugin = sidecar.inbound.plugins[-1][1]
        assert await tag(client, mesh) == "one"
        second = write(tmp_path, "two")
        assert second != first

        assert await step(client, mesh, "prepare", second) == (200, f'{{"version": "{second}"}}')
        assert await tag(client, mesh) == "one"  # prepared, not serving
        assert (await step(client, mesh, "commit", second))[0] == 204
        assert await tag(client, mesh) == "two"
        assert not old_plugin.stopped
        assert (await step(client, mesh, "finish", second))[0] == 204
        assert old_plugin.stopped
        async with client.get(mesh.url("web", "admin") + "/config", headers=mesh.admin_headers()) as response:
            assert (await response.json())["version"] == second


async def test_requests_in_flight_finish_on_the_old_chain(aiohttp_server, tmp_path):
    write(tmp_path, "one")
    slow = asyncio.Event()
    async with run_mesh(TOML.format(extra=""), {"web": await app_port(aiohttp_server, slow)}, tmp_path,
                        tls=False) as mesh, aiohttp.ClientSession() as client:
        in_flight = asyncio.ensure_future(tag(client, mesh, "/slow"))
        sidecar = mesh.sidecars["web"]
        for _ in range(500):
            if sidecar.inbound.inflight:
                break
            await asyncio.sleep(0.01)
        second = write(tmp_path, "two")
        assert (await step(client, mesh, "prepare", second))[0] == 200
        assert (await step(client, mesh, "commit", second))[0] == 204
        finishing = asyncio.ensure_future(step(client, mesh, "finish", second))
        assert await tag(client, mesh) == "two"
        await asyncio.sleep(0.2)
        assert not finishing.done()  # the old chain still has a request
        slow.set()
        assert await in_flight == "one"
        assert (await finishing)[0] == 204


async def test_a_plugin_that_fails_changes_nothing(aiohttp_server, tmp_path):
    first = write(tmp_path, "one")
    async with run_mesh(TOML.format(extra=""), {"web": await app_port(aiohttp_server)}, tmp_path,
                        tls=False) as mesh, aiohttp.ClientSession() as client:
        broken = write(tmp_path, "two", start="raise RuntimeError('no database')")
        status, text = await step(client, mesh, "prepare", broken)
        assert status == 409 and "no database" in text
        assert (await step(client, mesh, "commit", broken))[0] == 409  # nothing prepared
        assert await tag(client, mesh) == "one" and mesh.sidecars["web"].version == first

        (tmp_path / "tag.py").write_text("this is not python(\n")
        status, text = await step(client, mesh, "prepare")
        assert status == 409 and "SyntaxError" in text
        (tmp_path / "mesh.toml").write_text(TOML.format(extra="colour = 'red'"))
        status, text = await step(client, mesh, "prepare")
        assert status == 409 and "colour" in text
        assert await tag(client, mesh) == "one"


async def test_a_version_other_than_the_one_checked_is_refused(aiohttp_server, tmp_path):
    write(tmp_path, "one")
    async with run_mesh(TOML.format(extra=""), {"web": await app_port(aiohttp_server)}, tmp_path,
                        tls=False) as mesh, aiohttp.ClientSession() as client:
        checked = write(tmp_path, "two")
        write(tmp_path, "three")  # edited again after the controller checked it
        status, text = await step(client, mesh, "prepare", checked)
        assert status == 409 and "changed since it was checked" in text
        assert await tag(client, mesh) == "one"


async def test_rollback_after_commit_serves_the_old_version_again(aiohttp_server, tmp_path):
    first = write(tmp_path, "one")
    async with run_mesh(TOML.format(extra=""), {"web": await app_port(aiohttp_server)}, tmp_path,
                        tls=False) as mesh, aiohttp.ClientSession() as client:
        second = write(tmp_path, "two")
        assert (await step(client, mesh, "prepare", second))[0] == 200
        assert (await step(client, mesh, "commit", second))[0] == 204
        assert await tag(client, mesh) == "two"
        assert (await step(client, mesh, "rollback", second))[0] == 204
        assert await tag(client, mesh) == "one" and mesh.sidecars["web"].version == first


async def test_reload_steps_need_the_admin_token(aiohttp_server, tmp_path):
    write(tmp_path, "one")
    async with run_mesh(TOML.format(extra=""), {"web": await app_port(aiohttp_server)}, tmp_path,
                        tls=False) as mesh, aiohttp.ClientSession() as client:
        for name in ("prepare", "commit", "finish", "rollback", "abort"):
            async with client.post(mesh.url("web", "admin") + f"/reload/{name}", json={}) as response:
                assert response.status == 401
