"""The four first-party plugins together, through real sidecars: examples/gateway's chain."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from mesh.testing import run_mesh

from ..conftest import port_of

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "gateway"

# The example's budgets, counted per hour instead of per second: a loaded
# machine may spread a burst over more than a second. The moving window is
# exact, with no window edge for a slow run to cross.
PER_HOUR = ('limit = ["20/second", "1000/hour"]',
            'limit = ["20/hour", "1000/day"]\nstrategy = "moving-window"')
# Client headers with underscores reach the plugins (the sidecar's default drops them).
UNDERSCORES = ("expose = 8081\n", "expose = 8081\nunderscores_in_headers = true\n")


def example_toml(*changes: tuple[str, str]) -> str:
    text = (EXAMPLE / "mesh.toml").read_text()
    for old, new in changes:
        assert text.count(old) == 1, f"examples/gateway/mesh.toml no longer has {old!r}"
        text = text.replace(old, new)
    return text


def is_user_header(name: str) -> bool:
    """Whether an app would read this header as x-user (WSGI maps ``_`` to ``-``)."""
    return name.lower().replace("_", "-") == "x-user"


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
                                      "peer": request.headers.get("x-mesh-peer"),
                                      "user_headers": [[k.lower(), v] for k, v in request.headers.items()
                                                       if is_user_header(k)]},
                                     headers=headers)

        application = web.Application()
        application.router.add_route("*", "/{tail:.*}", handler)
        return application

    servers = {
        "gateway": await aiohttp_server(app("gateway", None)),
        "orders": await aiohttp_server(app("orders", "public, max-age=30")),
        "catalog": await aiohttp_server(app("catalog", None)),
    }
    return {name: s.port for name, s in servers.items()}, calls


@asynccontextmanager
async def example_mesh(tmp_path, backends, *changes: tuple[str, str]):
    ports, calls = backends
    shutil.copytree(EXAMPLE / "keys", tmp_path / "keys")
    async with run_mesh(example_toml(PER_HOUR, *changes), ports, root=tmp_path) as mesh:
        yield mesh.url("gateway"), calls


@pytest.fixture
async def gateway(tmp_path, backends):
    async with example_mesh(tmp_path, backends) as started:
        yield started


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
            assert body == {"service": "orders", "path": "/orders/1?x=1", "user": "alice",
                            "peer": "gateway", "user_headers": [["x-user", "alice"]]}
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


FORGED = [("X-User", "root"), ("x-USER", "root"), ("X_User", "root"), ("x_user", "root")]


@pytest.mark.parametrize("underscores", [False, True], ids=["default", "underscores_allowed"])
async def test_a_client_cannot_forge_the_forwarded_claim(tmp_path, backends, underscores):
    changes = [UNDERSCORES] if underscores else []
    async with example_mesh(tmp_path, backends, *changes) as (url, calls), \
            aiohttp.ClientSession() as session:
        async def get(path: str, token: str | None = None) -> tuple[int, dict | None]:
            headers = [*FORGED, *([("Authorization", f"Bearer {token}")] if token else [])]
            async with session.get(url + path, headers=headers) as resp:
                return resp.status, (await resp.json() if resp.status == 200 else None)

        # A valid token: the app sees the token's sub, once, and nothing else called x-user.
        status, body = await get("/me", mint("alice"))
        assert status == 200 and body["user_headers"] == [["x-user", "alice"]]
        # Through the router to another service: the same.
        status, body = await get("/api/orders/forged", mint("alice"))
        assert status == 200 and body["user_headers"] == [["x-user", "alice"]]
        # A path that needs no token: no x-user at all.
        status, body = await get("/healthz")
        assert status == 200 and body["user_headers"] == []
        # No token, or a bad one: refused, and nothing reached an app.
        before = {name: list(seen) for name, seen in calls.items()}
        assert (await get("/me"))[0] == 401
        assert (await get("/me", "junk"))[0] == 401
        assert (await get("/me", mint("alice", ttl=-3600)))[0] == 401
        assert calls == before


async def test_no_token_gets_a_bare_challenge_and_a_bad_one_an_error(gateway):
    url, _ = gateway
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/me") as resp:
            assert resp.status == 401
            assert resp.headers.getall("WWW-Authenticate") == ['Bearer realm="gateway"']
        async with session.get(url + "/me", headers={"Authorization": "Bearer junk"}) as resp:
            assert resp.status == 401
            assert resp.headers.getall("WWW-Authenticate") == [
                'Bearer realm="gateway", error="invalid_token", error_description="malformed token"']


PATH_BUDGET = """
[mesh]
name = "paths"

[services.web]
command = "python web.py"
plugins = [ { use = "ratelimit", limit = "2/hour", key = "path", strategy = "moving-window" } ]
"""


async def test_a_path_budget_cannot_be_evaded_with_percent_escapes(tmp_path, aiohttp_server, raw):
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", handler)
    app = await aiohttp_server(application)
    async with run_mesh(PATH_BUDGET, {"web": app.port}, root=tmp_path) as mesh:
        port = port_of(mesh.url("web"))
        statuses = []
        for target in ("/api/x", "/%61pi/x", "/%61%70%69/%78", "/api/y"):
            answer = await raw(port, f"GET {target} HTTP/1.1\r\nHost: web\r\n"
                                     "Connection: close\r\n\r\n".encode(), timeout=30)
            statuses.append(int(answer.split(b" ", 2)[1]))
    # One budget for /api/x however it is spelled; /api/y has its own.
    assert statuses == [200, 200, 429, 200]
    assert seen == ["/api/x", "/api/x", "/api/y"]
