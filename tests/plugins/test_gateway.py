"""The four first-party plugins together, through real sidecars: examples/gateway's chain."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mesh.testing import run_mesh

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gateway"


def mint(sub: str, **claims) -> str:
    spec = importlib.util.spec_from_file_location("gateway_mint", EXAMPLE / "keys" / "mint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.mint(sub, **claims)


@pytest.fixture
async def backends(aiohttp_server):
    calls: dict[str, list[str]] = {"gateway": [], "orders": [], "catalog": []}

    def app(name: str, cache_control: str | None):
        async def handler(request: web.Request) -> web.Response:
            calls[name].append(request.path_qs)
            headers = {"Cache-Control": cache_control} if cache_control else {}
            return web.json_response({"service": name, "path": request.path_qs,
                                      "user": request.headers.get("x-user"),
                                      "peer": request.headers.get("x-mesh-peer")}, headers=headers)

        application = web.Application()
        application.router.add_route("*", "/{tail:.*}", handler)
        return application

    servers = {
        "gateway": await aiohttp_server(app("gateway", None)),
        "orders": await aiohttp_server(app("orders", "public, max-age=30")),
        "catalog": await aiohttp_server(app("catalog", None)),
    }
    return {name: s.port for name, s in servers.items()}, calls


@pytest.fixture
async def gateway(tmp_path, backends):
    ports, calls = backends
    shutil.copytree(EXAMPLE / "keys", tmp_path / "keys")
    text = (EXAMPLE / "mesh.toml").read_text()
    async with run_mesh(text, ports, root=tmp_path) as mesh:
        yield mesh.url("gateway"), calls


async def test_gateway_chain_end_to_end(gateway):
    url, calls = gateway
    alice = {"Authorization": f"Bearer {mint('alice')}"}
    async with aiohttp.ClientSession() as session:
        # jwt: no token, a garbled one, an alg=none one: 401 with the Bearer challenge.
        none_token = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5In0."
        for headers in ({}, {"Authorization": "Bearer junk"}, {"Authorization": f"Bearer {none_token}"}):
            async with session.get(url + "/api/orders/1", headers=headers) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert calls["orders"] == []

        # router: /api stripped, sent to orders through the mesh; jwt's claim forwarded.
        async with session.get(url + "/api/orders/1?x=1", headers=alice) as resp:
            body = await resp.json()
            assert resp.status == 200 and resp.headers["X-Cache"] == "MISS"
            assert body == {"service": "orders", "path": "/orders/1?x=1", "user": "alice", "peer": "gateway"}
            assert "RateLimit-Limit" in resp.headers

        # cache: a public response is served again without reaching orders.
        async with session.get(url + "/api/orders/1?x=1", headers=alice) as resp:
            assert resp.headers["X-Cache"] == "HIT"
        assert calls["orders"] == ["/orders/1?x=1"]

        # The gateway's own app answers plain responses; with Authorization they are never stored.
        for _ in range(2):
            async with session.get(url + "/me", headers=alice) as resp:
                assert (await resp.json())["user"] == "alice"
                assert resp.headers["X-Cache"] == "MISS"
        assert calls["gateway"] == ["/me", "/me"]

        # router: a direct answer and a redirect.
        async with session.get(url + "/ping", headers=alice) as resp:
            assert resp.status == 200 and await resp.text() == "pong\n"
        async with session.get(url + "/old-api/orders", headers=alice, allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/api/orders"


async def test_split_is_even_and_sticky_per_user(gateway):
    url, calls = gateway
    sides: dict[str, set[str]] = {}
    async with aiohttp.ClientSession() as session:
        for i in range(40):
            user = f"user{i}"
            token = {"Authorization": f"Bearer {mint(user)}"}
            for n in range(2):
                # A path of its own each time: orders' answers are public, and the cache would serve them.
                async with session.get(url + f"/api/catalog/{user}/{n}", headers=token) as resp:
                    assert resp.status == 200
                    sides.setdefault(user, set()).add((await resp.json())["service"])
    assert all(len(s) == 1 for s in sides.values())  # sticky
    chosen = [next(iter(s)) for s in sides.values()]
    assert 8 <= chosen.count("catalog") <= 32  # both sides get a share (binomial, p=0.5, n=40)


async def test_rate_limit_per_user_with_retry_after(gateway):
    url, _ = gateway
    bob = {"Authorization": f"Bearer {mint('bob')}"}
    carol = {"Authorization": f"Bearer {mint('carol')}"}
    async with aiohttp.ClientSession() as session:
        async def get(headers):
            async with session.get(url + "/ping", headers=headers) as resp:
                return resp.status, resp.headers.get("Retry-After")

        results = await asyncio.gather(*(get(bob) for _ in range(30)))
        statuses = [s for s, _ in results]
        assert statuses.count(200) == 20 and statuses.count(429) == 10
        assert all(int(r) >= 1 for s, r in results if s == 429)
        # Another user has a budget of their own.
        assert (await get(carol))[0] == 200
