"""Keyed instances through a real front and real sidecars: one start per key, sleep, wake, max."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
from aiohttp import web

from mesh import config
from mesh.control.ca import CA
from mesh.sidecar.front import KeyedFront, key_of
from mesh.sidecar.identity import Identity
from mesh.sidecar.registry import Registry
from mesh.sidecar.sidecar import Ports, Sidecar
from mesh.testing import make_request

from ..conftest import eventually

TOML = """
[mesh]
name = "t"
[services.web]
command = "x"
[services.sandbox]
command = "x"
instances = {{ key = "header:X-Session", sleep_after = "{sleep}", max = 2, start_timeout = "5s" }}
[[routes]]
from = "web"
to = "sandbox"
"""


class Keyed:
    """A web sidecar calling a keyed service whose instances are app + sidecar pairs started on demand."""

    def __init__(self, tmp_path, sleep: str, ask_idle=None) -> None:
        self.ask_idle = ask_idle
        (tmp_path / "mesh.toml").write_text(TOML.format(sleep=sleep))
        self.cfg = config.load(tmp_path)
        self.ca = CA.load_or_create(tmp_path / "ca", "t")
        self.starts: list[str] = []
        self.stops: list[str] = []
        self.running: dict[str, tuple[web.AppRunner, Sidecar]] = {}
        self.serial = itertools.count(1)
        self.release = asyncio.Event()
        self.release.set()
        self.waiting = 0  # requests held at /slow

    def identity(self, name: str) -> Identity:
        folder = self.cfg.root / "certs" / name
        self.ca.write_instance(folder, name, lifetime=600)
        return Identity(folder, "t")

    async def start_instance(self, key: str) -> tuple[str, int]:
        self.starts.append(key)
        await asyncio.sleep(0.2)  # a boot takes time: concurrent first requests pile up here
        serial = next(self.serial)
        release = self.release

        async def handler(request):
            if request.path == "/slow":
                self.waiting += 1
                try:
                    await release.wait()
                finally:
                    self.waiting -= 1
            return web.json_response({"key": key, "instance": serial, "peer": request.headers.get("x-mesh-peer")})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        sidecar = Sidecar(self.cfg, "sandbox", Ports(app=port), identity=self.identity("sandbox"))
        await sidecar.start()
        self.running[key] = (runner, sidecar)
        return "127.0.0.1", sidecar.listeners["mesh"].port

    async def stop_instance(self, key: str) -> None:
        self.stops.append(key)
        runner, sidecar = self.running.pop(key)
        await sidecar.stop()
        await runner.cleanup()

    async def __aenter__(self):
        self.front = KeyedFront(self.cfg, "sandbox", start=self.start_instance, stop=self.stop_instance,
                                identity=self.identity("sandbox"), ask_idle=self.ask_idle)
        await self.front.start()
        self.web = Sidecar(self.cfg, "web", Ports(app=9), identity=self.identity("web"),
                           registry=Registry({"sandbox": [self.front.address]}))
        await self.web.start()
        self.url = f"http://{self.web.listeners['outbound'].address}"
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc):
        self.release.set()
        await self.session.close()
        await self.web.stop()
        await self.front.stop()
        assert self.running == {}

    async def get(self, key: str | None, path: str = "/"):
        headers = {"Host": "sandbox"}
        if key is not None:
            headers["X-Session"] = key
        async with self.session.get(self.url + path, headers=headers) as resp:
            return resp.status, (await resp.json() if resp.status == 200 else await resp.text()), resp.headers


async def test_concurrent_first_requests_start_one_instance_and_stick_to_it(tmp_path):
    async with Keyed(tmp_path, "30s") as mesh:
        results = await asyncio.gather(*(mesh.get("alice") for _ in range(20)))
        assert mesh.starts == ["alice"]
        assert {r[1]["instance"] for r in results} == {1}
        assert all(r[0] == 200 and r[1]["peer"] == "web" for r in results)
        status, body, _ = await mesh.get("bob")
        assert body["key"] == "bob" and body["instance"] == 2
        assert (await mesh.get("alice"))[1]["instance"] == 1


async def test_idle_instances_sleep_and_wake_transparently(tmp_path):
    async with Keyed(tmp_path, "300ms") as mesh:
        assert (await mesh.get("alice"))[1]["instance"] == 1
        await eventually(lambda: mesh.stops == ["alice"], what="alice sleeps")
        assert "alice" not in mesh.running
        status, body, _ = await mesh.get("alice")
        assert status == 200 and body["instance"] == 2
        assert mesh.starts == ["alice", "alice"]


async def test_on_idle_may_keep_an_instance_awake(tmp_path):
    asked = []

    async def ask_idle(key):
        asked.append(key)
        return len(asked) > 2  # keep it twice, then let it sleep

    async with Keyed(tmp_path, "300ms", ask_idle=ask_idle) as mesh:
        await mesh.get("alice")
        await eventually(lambda: len(asked) >= 2, what="asked twice")
        assert mesh.stops == []  # idle, asked, kept
        await eventually(lambda: mesh.stops == ["alice"], what="alice sleeps")
        assert len(asked) == 3


async def test_the_idle_timer_starts_when_the_last_request_ends(tmp_path):
    async with Keyed(tmp_path, "300ms") as mesh:
        mesh.release.clear()
        slow = asyncio.ensure_future(mesh.get("alice", "/slow"))
        await asyncio.sleep(1.0)  # far past sleep_after, but a request is in flight
        assert mesh.stops == []
        mesh.release.set()
        assert (await slow)[0] == 200
        await eventually(lambda: mesh.stops == ["alice"], what="alice sleeps")


async def test_max_puts_the_least_recently_used_to_sleep_or_refuses_when_all_busy(tmp_path):
    async with Keyed(tmp_path, "30s") as mesh:
        await mesh.get("a")
        await mesh.get("b")
        await mesh.get("a")  # b is now the least recently used
        assert (await mesh.get("c"))[0] == 200
        assert mesh.stops == ["b"] and sorted(mesh.running) == ["a", "c"]
        # Both remaining instances busy: a new key is refused, not queued.
        mesh.release.clear()
        busy = [asyncio.ensure_future(mesh.get(k, "/slow")) for k in ("a", "c")]
        await eventually(lambda: mesh.waiting == 2, what="both instances busy")
        status, body, headers = await mesh.get("d")
        assert status == 503 and headers["Retry-After"] == "1"
        mesh.release.set()
        assert [(await b)[0] for b in busy] == [200, 200]


async def test_a_request_without_its_key_is_refused(tmp_path):
    async with Keyed(tmp_path, "30s") as mesh:
        status, body, _ = await mesh.get(None)
        assert status == 400 and "header:X-Session" in body
        assert mesh.starts == []


def test_key_sources():
    request = make_request("GET", "/users/alice/files", headers={
        "X-Session": "s1",
        # {"sub": "bob"} as an (unverified) JWT payload
        "Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.sig"})
    assert key_of(request, "header:X-Session") == "s1"
    assert key_of(request, "path:2") == "alice"
    assert key_of(request, "path:9") is None
    assert key_of(request, "claim:sub") == "bob"
    request.state["claims"] = {"sub": "verified"}
    assert key_of(request, "claim:sub") == "verified"
