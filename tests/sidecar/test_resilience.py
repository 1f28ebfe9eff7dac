"""`mesh.sidecar.resilience`: retries, retry budget, circuit breaking, deadlines, through real sidecars.

Apps are aiohttp test servers whose behaviour a test changes as it goes;
services with several instances get extra in-process sidecars (`cluster`, tests/harness.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mesh import DEADLINE, RETRIES, TIMEOUT, UPSTREAM, Response, Retries
from mesh import config as config_mod
from mesh.errors import ConfigError
from mesh.options import Duration
from mesh.sidecar.resilience import DEADLINE_HEADER, Deadline, Outbound, Retry, RetryBudget
from mesh.testing import make_request, run_mesh, run_plugin

from ..harness import App, cluster, serve
from ..harness import routed_toml as toml


async def call(session: aiohttp.ClientSession, mesh: Any, method: str = "GET", path: str = "/",
               **kwargs: Any) -> tuple[int, dict[str, str], str]:
    headers = {"Host": "api", **kwargs.pop("headers", {})}
    async with session.request(method, mesh.url("web", "outbound") + path, headers=headers, **kwargs) as response:
        return response.status, dict(response.headers), await response.text()


# retries


@pytest.mark.parametrize("victim", ["sidecar", "app"])
async def test_killing_one_of_three_instances_mid_load_loses_no_get_and_ejects_it(aiohttp_server, victim):
    apps = [App("a1"), App("a2"), App("a3")]
    servers = [await aiohttp_server(a.app()) for a in apps]
    (web_port,) = await serve(aiohttp_server, App("web"))
    async with cluster(toml(), {"web": [web_port], "api": [s.port for s in servers]}) as (mesh, instances):
        statuses: list[int] = []
        killed = asyncio.Event()
        address = instances["api"][1].listeners["mesh"].address

        async with aiohttp.ClientSession() as session:
            async def load() -> None:
                while len(statuses) < 400:
                    status, _, _ = await call(session, mesh)
                    statuses.append(status)
                    if len(statuses) == 100 and not killed.is_set():
                        killed.set()
                        if victim == "sidecar":
                            await instances["api"][1].stop()
                        else:
                            await servers[1].close()

            await asyncio.gather(*(load() for _ in range(12)))
        hits_at_end = apps[1].hits
        backends = {b["address"]: b for b in mesh.sidecars["web"].balancer.snapshot()["api"]}
        retry = dict(mesh.sidecars["web"].outbound.plugins)["mesh.defaults (retry)"]

    assert killed.is_set() and len(statuses) >= 400
    assert set(statuses) == {200}, [s for s in statuses if s != 200]
    assert backends[address]["ejected"] and backends[address]["ejections"] == 1, backends
    assert sum(b["ejected"] for b in backends.values()) == 1
    assert retry.retries >= 1  # some requests did meet the dead instance
    assert apps[0].hits + apps[2].hits + hits_at_end >= 400


async def test_a_503_is_retried_on_another_instance_and_counts_towards_ejection(aiohttp_server):
    bad, good = App("bad", status=503), App("good")
    ports = await serve(aiohttp_server, bad, good, App("web"))
    async with cluster(toml(), {"web": ports[2:], "api": ports[:2]}) as (mesh, _):
        async with aiohttp.ClientSession() as session:
            results = [await call(session, mesh) for _ in range(30)]
        backends = mesh.sidecars["web"].balancer.snapshot()["api"]
    assert {(s, body) for s, _, body in results} == {(200, "good")}
    assert 1 <= bad.hits <= 5  # five failures in a row and it is out (consecutive_failures = 5)
    assert [b["ejected"] for b in backends] == [True, False]


async def test_post_is_not_replayed_once_sent_but_is_after_a_connect_failure(aiohttp_server, unused_tcp_port):
    api = App("api", status=503)
    ports = await serve(aiohttp_server, api, App("web"))
    async with cluster(toml(), {"web": ports[1:], "api": ports[:1]}) as (mesh, _):
        async with aiohttp.ClientSession() as session:
            status, _, _ = await call(session, mesh, "POST", data=b"order")
            assert status == 503 and api.hits == 1  # sent once: a POST is not idempotent
            status, _, _ = await call(session, mesh, "GET")
            assert status == 503 and api.hits == 1 + 3  # GET: three attempts

            # A dead address next to the live one: a POST that meets it is tried again, nothing was sent.
            api.status, api.hits, api.bodies = 200, 0, []
            registry = mesh.sidecars["web"].registry
            live = registry.as_dict()["api"][0]
            registry.update({**registry.as_dict(), "api": [f"127.0.0.1:{unused_tcp_port}", live]})
            results = [await call(session, mesh, "POST", data=b"order") for _ in range(20)]
    assert {s for s, _, _ in results} == {200}
    assert api.hits == 20 and set(api.bodies) == {b"order"}


async def test_a_small_streamed_put_body_is_kept_and_replayed(aiohttp_server):
    api = App("api", fail_first=2)
    ports = await serve(aiohttp_server, api, App("web"))
    payload = b"x" * 40_000

    async def body():  # a streamed request body, with a Content-Length
        for i in range(0, len(payload), 10_000):
            yield payload[i:i + 10_000]

    async with cluster(toml(), {"web": ports[1:], "api": ports[:1]}) as (mesh, _):
        async with aiohttp.ClientSession() as session:
            status, _, text = await call(session, mesh, "PUT", data=body(),
                                         headers={"Content-Length": str(len(payload))})
    assert (status, text) == (200, "api")
    assert api.bodies == [payload] * 3


async def test_retry_budget_caps_retries_at_its_share_of_requests(aiohttp_server):
    api = App("api", status=503)
    ports = await serve(aiohttp_server, api, App("web"))
    route = 'retries = { attempts = 3, budget = 0.2, min_per_second = 0, backoff = "1ms" }'
    async with cluster(toml(route=route), {"web": ports[1:], "api": ports[:1]}) as (mesh, _):
        async with aiohttp.ClientSession() as session:
            statuses = [(await call(session, mesh))[0] for _ in range(100)]
        retry = dict(mesh.sidecars["web"].outbound.plugins)["mesh.defaults (retry)"]
    assert set(statuses) == {503}
    # Without a budget: 300 hits. With 20%: at most 20 retries (and one more at the very start).
    assert 100 < api.hits <= 121, api.hits
    assert retry.retries == api.hits - 100 and retry.refused > 50


def test_retry_budget_slides_with_time():
    now = [100.0]
    budget = RetryBudget(window=10, clock=lambda: now[0])
    for _ in range(10):
        budget.request()
    assert budget.allows(0.2, 0)
    budget.retried()
    budget.retried()
    assert not budget.allows(0.2, 0)  # 2 retries for 10 requests is 20%
    now[0] += 11  # the window moved past all of it
    assert not budget.allows(0.2, 0)  # no requests: no retries...
    assert budget.allows(0.2, 1)  # ...but the floor of min_per_second * window
    budget.request()
    assert budget.allows(0.2, 0)


async def test_backoff_is_full_jitter_doubling_up_to_its_cap():
    retry = Retry(backoff=Duration(0.01), max_backoff=Duration(0.05))
    policy = retry.policy(Outbound().default)
    firsts = [retry.delay(policy, 1) for _ in range(200)]
    thirds = [retry.delay(policy, 3) for _ in range(200)]
    later = [retry.delay(policy, 9) for _ in range(200)]
    assert all(0 <= d <= 0.01 for d in firsts) and len(set(firsts)) > 100
    assert all(0 <= d <= 0.04 for d in thirds) and max(thirds) > 0.01
    assert all(0 <= d <= 0.05 for d in later) and max(later) > 0.04


async def test_per_try_timeout_moves_on_to_another_instance(aiohttp_server):
    stuck, one, two = App("stuck", delay=5), App("one"), App("two")
    ports = await serve(aiohttp_server, stuck, one, two, App("web"))
    route = 'retries = { per_try_timeout = "200ms" }'
    async with cluster(toml(route=route), {"web": ports[3:], "api": ports[:3]}) as (mesh, _):
        async with aiohttp.ClientSession() as session:
            for _ in range(40):
                started = time.monotonic()
                status, _, text = await call(session, mesh)
                assert status == 200 and text in ("one", "two")
                # Well short of the stuck instance's 5 s: the try on it gave up (a slow machine takes
                # a second or so for the 200 ms try and the next).
                assert time.monotonic() - started < 4.0
                if stuck.hits >= 2:
                    break
    assert stuck.hits >= 2
    assert all(0 < d <= 200 for d in stuck.deadlines)  # each try told the next hop what it waits


# circuit breaking


async def test_over_max_pending_fails_fast_with_503_and_retry_after(aiohttp_server):
    api = App("api", delay=0.6)
    ports = await serve(aiohttp_server, api, App("web"))
    async with cluster(toml(route="max_pending = 2"), {"web": ports[1:], "api": ports[:1]}) as (mesh, _):
        async with aiohttp.ClientSession() as session:
            async def timed() -> tuple[int, dict[str, str], float]:
                started = time.monotonic()
                status, headers, _ = await call(session, mesh)
                return status, headers, time.monotonic() - started

            results = await asyncio.gather(*(timed() for _ in range(5)))
            after, _, _ = await call(session, mesh)  # they finished: room again
    assert sorted(s for s, _, _ in results) == [200, 200, 503, 503, 503]
    for status, headers, took in results:
        if status == 503:
            assert headers["Retry-After"] == "1" and took < 0.4
    assert api.hits == 3 and after == 200  # the refused ones were never sent, nor retried


# deadlines


async def test_deadline_header_bounds_the_call_to_the_app(aiohttp_server):
    api = App("api", delay=3)
    ports = await serve(aiohttp_server, api, App("web"))
    async with run_mesh(toml(), {"api": ports[0], "web": ports[1]}, tls=False) as mesh:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.get(mesh.url("api", "mesh") + "/", headers={
                    "x-mesh-peer": "web", DEADLINE_HEADER: "300"}) as response:
                status = response.status
            took = time.monotonic() - started
    assert status == 504 and 0.25 < took < 1.5, (status, took)
    assert len(api.deadlines) == 1 and 200 < api.deadlines[0] <= 300  # the app is told what is left


async def test_deadline_travels_through_an_app_that_passes_it_on(aiohttp_server):
    """web -> api (route timeout 1s) -> api's app copies the header onto its call to db -> db hangs."""
    api, db = App("api"), App("db", delay=5)
    seen: dict[str, Any] = {}
    outbound: list[str] = []
    tasks: set[asyncio.Future[None]] = set()

    async def call_db(deadline: str) -> None:
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            async with session.get(outbound[0] + "/", headers={"Host": "db", DEADLINE_HEADER: deadline}) as response:
                seen["status"], seen["took"] = response.status, time.monotonic() - started

    async def api_calls_db(request: web.Request) -> web.Response:
        # Shielded: api's sidecar drops this request at the same deadline, which cancels the handler.
        task = asyncio.ensure_future(call_db(request.headers[DEADLINE_HEADER]))
        tasks.add(task)
        await asyncio.shield(task)
        return web.Response(text="api")

    api.extra = api_calls_db
    ports = await serve(aiohttp_server, api, db, App("web"))
    mesh_toml = toml(route='timeout = "1s"', services='[services.db]\ncommand = "x"\n'
                     '[[routes]]\nfrom = "api"\nto = "db"\ntimeout = "30s"\n')
    async with run_mesh(mesh_toml, {"api": ports[0], "db": ports[1], "web": ports[2]}) as mesh:
        outbound.append(mesh.url("api", "outbound"))
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            status, _, _ = await call(session, mesh)
            took = time.monotonic() - started
        await asyncio.wait(tasks, timeout=3)  # api's app finishes its call
    assert status == 504 and took < 1.5
    assert 800 < api.deadlines[0] <= 1000
    # The db call was cut at what was left of web's second, not at its own route's 30s.
    assert seen["status"] == 504 and seen["took"] < 1.2, seen
    assert 0 < db.deadlines[0] <= api.deadlines[0]


async def test_deadline_layer_takes_the_earlier_of_timeout_and_header():
    request = make_request(headers={DEADLINE_HEADER: "200"}, state={UPSTREAM: "api"})
    seen: dict[str, float] = {}

    async def upstream(req):
        seen["left"] = req.state[DEADLINE] - time.monotonic()
        seen["header"] = DEADLINE_HEADER in req.headers
        return Response(200)

    await run_plugin(Deadline(timeout=Duration(5)), request, upstream)
    assert 0.15 < seen["left"] <= 0.2 and not seen["header"]
    await run_plugin(Deadline(timeout=Duration(0.05)), make_request(headers={DEADLINE_HEADER: "200"}), upstream)
    assert seen["left"] <= 0.05
    late = await run_plugin(Deadline(), make_request(headers={DEADLINE_HEADER: "0"}), upstream)
    assert late.status == 504


async def test_a_requests_own_timeout_wins_over_the_layers_and_the_routes():
    seen: dict[str, Any] = {}

    async def upstream(req):
        seen["deadline"] = req.state.get(DEADLINE)
        return Response(200)

    started = time.monotonic()
    await run_plugin(Deadline(timeout=Duration(0.05)), make_request(state={UPSTREAM: "api", TIMEOUT: 5.0}), upstream)
    assert 4.9 < seen["deadline"] - started <= 5.1
    await run_plugin(Deadline(timeout=Duration(5)), make_request(state={UPSTREAM: "api", TIMEOUT: 0.0}), upstream)
    assert seen["deadline"] is None  # 0: no timeout at all
    late = await run_plugin(Deadline(), make_request(headers={DEADLINE_HEADER: "0"}, state={TIMEOUT: 5.0}), upstream)
    assert late.status == 504  # the caller's earlier deadline still wins


async def test_a_requests_own_retries_go_over_the_layers_and_the_routes():
    tries: list[str] = []

    async def unavailable(req):
        tries.append(req.method)
        return Response(503)

    retry = Retry(attempts=2, backoff=Duration(0))

    async def run(method: str = "GET", **state: Any) -> int:
        tries.clear()
        await run_plugin(retry, make_request(method, state={UPSTREAM: "api", **state}), unavailable)
        return len(tries)

    assert await run() == 2  # the layer's option
    assert await run(**{RETRIES: Retries(attempts=4)}) == 4
    assert await run(**{RETRIES: Retries(attempts=1)}) == 1
    assert await run("POST", **{RETRIES: Retries(attempts=4)}) == 1  # idempotent_only, from the route
    assert await run("POST", **{RETRIES: Retries(attempts=4, idempotent_only=False)}) == 4
    # Tables made per request do not pile up in the layer's cache.
    for _ in range(300):
        await run(**{RETRIES: Retries(attempts=1)})
    assert len(retry._request_policies) <= 256


# a timeout fires once, at its value


def hangs_on(path: str) -> App:
    """The app of "api": "fast", but no answer (within 30s) on ``path``."""
    async def handler(request: web.Request) -> web.Response:
        if request.path == path:
            await asyncio.sleep(30)
        return web.Response(text="fast")

    api = App("api")
    api.extra = handler
    return api


async def test_a_route_timeout_answers_504_once_at_its_value_on_reused_connections(aiohttp_server):
    api = hangs_on("/slow")
    ports = await serve(aiohttp_server, api, App("web"))
    async with run_mesh(toml(route='timeout = "2s"'), {"api": ports[0], "web": ports[1]}) as mesh:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):  # every connection on the way is pooled and warm
                assert (await call(session, mesh))[0] == 200
            started = time.monotonic()
            status, _, _ = await call(session, mesh, path="/slow")
            took = time.monotonic() - started
    assert status == 504 and took < 2 * 1.5 + 0.5, f"a 2s route timeout answered after {took:.2f}s"
    assert api.hits == 4  # /slow reached the app once: a timeout is not sent again


async def test_a_services_own_timeout_on_its_app_fires_once(aiohttp_server):
    api = hangs_on("/slow")
    ports = await serve(aiohttp_server, api, App("web"))
    async with run_mesh(toml(services='timeout = "2s"'), {"api": ports[0], "web": ports[1]}) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.get(mesh.url("api") + "/") as response:
                assert response.status == 200
            started = time.monotonic()
            async with session.get(mesh.url("api") + "/slow") as response:
                status = response.status
            took = time.monotonic() - started
    assert status == 504 and took < 2 * 1.5 + 0.5, f"a 2s timeout answered after {took:.2f}s"
    assert api.hits == 2


async def test_a_post_that_may_have_reached_the_app_is_not_sent_again():
    """The app reads a POST on a kept-alive connection, then closes it without an answer."""
    posts: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                if head.startswith(b"POST"):
                    posts.append(body)
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(app, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with run_mesh(toml(), {"api": port, "web": port}) as mesh:
            async with aiohttp.ClientSession() as session:
                assert (await call(session, mesh))[0] == 200
                status, _, _ = await call(session, mesh, "POST", data=b"charge once")
    finally:
        server.close()
    assert status == 502 and posts == [b"charge once"]


# the chain, replacing layers, configuration


async def test_default_chain_is_visible_and_a_listed_layer_replaces_the_default(aiohttp_server):
    api = App("api", fail_first=4)
    ports = await serve(aiohttp_server, api, App("web"), App("other"))
    mesh_toml = toml(route="retries = { attempts = 2 }",
                     web='outbound = [ { use = "stamp", value = "w" }, { use = "retry", attempts = 5 } ]',
                     services='[services.other]\ncommand = "x"\n')
    async with run_mesh(mesh_toml, {"api": ports[0], "web": ports[1], "other": ports[2]}) as mesh:
        async with aiohttp.ClientSession() as session:
            admin = mesh.admin_headers()
            async with session.get(mesh.url("web", "admin") + "/config", headers=admin) as response:
                web_config = await response.json()
            async with session.get(mesh.url("other", "admin") + "/config", headers=admin) as response:
                other_config = await response.json()
            status, _, text = await call(session, mesh)
    assert other_config["outbound"] == ["mesh.defaults (deadline)", "mesh.defaults (breaker)",
                                        "mesh.defaults (retry)"]
    assert web_config["outbound"] == ["services.web.outbound[0] (stamp)", "services.web.outbound[1] (retry)",
                                      "mesh.defaults (deadline)", "mesh.defaults (breaker)"]
    assert web_config["lb"] == "p2c"
    assert (status, text, api.hits) == (200, "api", 5)  # the listed layer's 5 attempts beat the route's 2


def load(tmp_path: Any, text: str) -> Any:
    (tmp_path / "mesh.toml").write_text(text)
    return config_mod.load(tmp_path)


def test_settings_come_from_route_then_target_then_mesh_defaults(tmp_path):
    cfg = load(tmp_path, toml(
        defaults='defaults = { timeout = "9s", max_pending = 50, retries = { attempts = 4, on = ["reset", 429] } }',
        route='paths = ["/slow/*"]\ntimeout = "30s"\nretries = { per_try_timeout = "2s" }\nmax_pending = 5\n'
              '[[routes]]\nfrom = "web"\nto = "api"\n',
        services='timeout = "12s"'))
    out = Outbound(cfg, "web")
    slow = out.lookup("api", "GET", "/slow/x")
    plain = out.lookup("api", "GET", "/fast")
    assert (slow.timeout, slow.max_pending, plain.timeout, plain.max_pending) == (30, 5, 12, 50)
    assert (slow.retries.attempts, slow.retries.per_try_timeout, slow.retries.on) == (4, 2, ["reset", "429"])
    assert (plain.retries.per_try_timeout, plain.retries.idempotent_only, plain.retries.budget) == (0, True, 0.2)
    assert out.lookup("web", "GET", "/").timeout == 9  # no route, no service timeout: the mesh default
    policy = Retry(attempts=6, on=["5xx"]).policy(slow)
    assert (policy.attempts, 599 in policy.statuses, policy.connect, policy.per_try_timeout) == (6, True, False, 2)
    assert Outbound(load(tmp_path, toml(defaults='defaults = { timeout = "0s" }')), "web").lookup(
        "api", "GET", "/").timeout is None


@pytest.mark.parametrize("text, expected", [
    (toml(route='retries = { attempts = 0 }'), "routes[0].retries: attempts: expected at least 1"),
    (toml(route='retries = { on = ["reset", "sometimes"] }'), "routes[0].retries: on[1]: expected one of"),
    (toml(route='retries = { atempts = 2 }'), "routes[0].retries: unknown option 'atempts', did you mean 'attempts'?"),
    (toml(route='max_pending = 0'), "routes[0]: max_pending: expected at least 1"),
    (toml(defaults='defaults = { lb = "random" }'), "mesh.defaults.lb: expected one of 'p2c', 'round-robin'"),
    (toml(defaults='defaults = { outlier = { max_ejection_percent = 101 } }'),
     "mesh.defaults.outlier: max_ejection_percent: expected 0 to 100"),
    (toml(web='outbound = [ { use = "retry", per_try_timeout = "soon" } ]'),
     "services.web.outbound[0] (retry): per_try_timeout: expected a duration"),
    (toml(web='outbound = [ { use = "breaker", max_pending = -1 } ]'),
     "services.web.outbound[0] (breaker): max_pending: expected at least 1"),
    (toml(services='health = "/h"\nhealth_check = { unhealthy_threshold = 0 }'),
     "services.api.health_check: unhealthy_threshold: expected at least 1"),
    (toml(services='health_check = { interval = "5s" }'),
     "services.api.health_check: checks the 'health' path, and the service has none"),
])
def test_bad_resilience_keys_are_named(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert any(expected in p for p in info.value.problems), info.value.problems
