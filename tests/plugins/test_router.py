"""The `router` plugin: which rule matches, what it does to the request, where it goes."""

import asyncio
import time
from collections import Counter
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from mesh import RETRIES, TIMEOUT, UPSTREAM, Response
from mesh.options import bind
from mesh.testing import make_request, run_mesh, run_plugin, stream
from mesh_plugins.router import Router, Rule

TOML_EXAMPLE = {"rules": [
    {"path": "/api/v1/*", "strip_prefix": "/api/v1", "to": "orders"},
    {"path": "/old", "redirect": "/new"},
    {"path": "/v/*", "split": {"v1": 50, "v2": 50}, "sticky": "header:X-User"},
]}


async def where(request):
    """An upstream that answers with where the request went: service, path and query."""
    upstream = request.state.get(UPSTREAM, "self")
    return Response(200, f"{upstream} {request.target}")


async def route(router, method="GET", path="/", **kwargs):
    response = await run_plugin(router, make_request(method, path, **kwargs), upstream=where)
    return (await response.read()).decode()


def configured(table):
    """A Router built from mesh.toml-shaped options, as the loader builds it."""
    problems = []
    router = bind(Router, table, where="services.web.plugins[0]", label="router",
                  problems=problems)
    assert not problems, problems
    return router


# -- matching ----------------------------------------------------------------------


async def test_prefix_rule_strips_the_prefix_and_sends_to_the_service():
    router = configured(TOML_EXAMPLE)
    assert await route(router, path="/api/v1/orders/7?expand=items") == "orders /orders/7?expand=items"
    assert await route(router, path="/api/v1/") == "orders /"


async def test_unmatched_requests_go_to_the_own_app_unchanged():
    router = configured(TOML_EXAMPLE)
    assert await route(router, path="/api/v2/orders") == "self /api/v2/orders"
    assert await route(router, path="/api/v1") == "self /api/v1"  # '/x/*' is below /x only
    assert await route(router, path="/api/v1x/y") == "self /api/v1x/y"


async def test_a_list_of_paths_matches_the_prefix_itself_too():
    router = Router([Rule(path=["/api", "/api/*"], strip_prefix="/api", to="orders")])
    assert await route(router, path="/api") == "orders /"
    assert await route(router, path="/api/x") == "orders /x"


async def test_the_first_matching_rule_wins():
    router = Router([Rule(path="/a/special", to="one"), Rule(path="/a/*", to="two"),
                     Rule(path="/a/special", to="never")])
    assert await route(router, path="/a/special") == "one /a/special"
    assert await route(router, path="/a/other") == "two /a/other"


async def test_methods_headers_and_query_all_have_to_match():
    router = Router([Rule(path="/x", methods=["get"], headers={"X-Canary": "1"},
                          query={"beta": "*"}, to="canary")])
    assert await route(router, path="/x?beta=", headers={"X-Canary": "1"}) == "canary /x?beta="
    assert await route(router, "POST", "/x?beta=1", headers={"X-Canary": "1"}) == "self /x?beta=1"
    assert await route(router, path="/x?beta=1", headers={"X-Canary": "2"}) == "self /x?beta=1"
    assert await route(router, path="/x?alpha=1", headers={"X-Canary": "1"}) == "self /x?alpha=1"


async def test_regex_must_match_the_whole_path_and_feeds_rewrite():
    router = Router([Rule(regex=r"/users/(?P<id>\d+)/profile", rewrite=r"/profiles/\g<id>",
                          to="profiles")])
    assert await route(router, path="/users/42/profile") == "profiles /profiles/42"
    assert await route(router, path="/users/42/profile/x") == "self /users/42/profile/x"


async def test_rewrite_puts_what_the_star_matched_in_place():
    router = Router([Rule(path="/old/*", rewrite="/new/*")])
    assert await route(router, path="/old/a/b?q=1") == "self /new/a/b?q=1"


async def test_set_and_remove_headers_change_the_request():
    seen = {}

    async def upstream(request):
        seen.update(request.headers)
        return Response(200)

    router = Router([Rule(path="/*", set_headers={"X-Api": "v1"}, remove_headers=["Cookie"])])
    await run_plugin(router, make_request("GET", "/a", headers={"Cookie": "s=1", "X-Api": "old"}),
                     upstream=upstream)
    assert seen.get("X-Api") == "v1" and "Cookie" not in seen


# -- split -------------------------------------------------------------------------


async def count(router, requests, **kwargs):
    return Counter([(await route(router, path="/v/x", **kwargs)).split()[0]
                    for _ in range(requests)])


async def test_a_50_50_split_gives_both_sides_a_fair_share():
    router = Router([Rule(path="/v/*", split={"v1": 50, "v2": 50})])
    counts = await count(router, 1000)
    # Mean 500, standard deviation ~16: 400..600 is over 6 deviations wide.
    assert set(counts) == {"v1", "v2"}
    assert 400 <= counts["v1"] <= 600


async def test_split_follows_unequal_weights_and_never_picks_a_zero_weight():
    router = Router([Rule(path="/v/*", split={"v1": 90, "v2": 10, "off": 0})])
    counts = await count(router, 2000)
    # Mean 200 for v2, standard deviation ~13.
    assert 100 <= counts["v2"] <= 300 and counts["off"] == 0


async def test_sticky_split_sends_each_user_to_one_side_and_spreads_users():
    router = configured(TOML_EXAMPLE)
    chosen = {}
    for user in range(200):
        sides = {(await route(router, path="/v/x", headers={"X-User": f"u{user}"})).split()[0]
                 for _ in range(5)}
        assert len(sides) == 1, f"user u{user} went to {sides}"
        chosen[user] = sides.pop()
    # 200 users, 50/50: each side gets 100 +- 7 on average; 60 is far out.
    assert min(Counter(chosen.values()).values()) >= 60


async def test_sticky_choice_is_the_same_on_another_sidecar():
    first, second = configured(TOML_EXAMPLE), configured(TOML_EXAMPLE)
    for user in ("alice", "bob", "carol", "dave"):
        headers = {"X-User": user}
        assert await route(first, path="/v/", headers=headers) == \
            await route(second, path="/v/", headers=headers)


# -- answering directly ------------------------------------------------------------


async def test_redirect_answers_without_forwarding_and_keeps_the_query():
    router = configured(TOML_EXAMPLE)
    response = await run_plugin(router, make_request("GET", "/old?page=2"), upstream=where)
    assert response.status == 302 and response.headers["Location"] == "/new?page=2"


async def test_redirect_with_star_and_status():
    router = Router([Rule(path="/docs/*", redirect="https://docs.example/*", redirect_status=308)])
    response = await run_plugin(router, make_request("GET", "/docs/a/b"), upstream=where)
    assert response.status == 308 and response.headers["Location"] == "https://docs.example/a/b"


async def test_respond_answers_with_status_body_and_headers():
    router = configured({"rules": [
        {"path": "/gone", "respond": {"status": 410, "body": "gone", "headers": {"X-Why": "moved"}}},
    ]})
    response = await run_plugin(router, make_request("GET", "/gone"), upstream=where)
    assert response.status == 410 and await response.read() == b"gone"
    assert response.headers["X-Why"] == "moved"


# -- timeouts and retries ----------------------------------------------------------
#
# The router only says what a request may take: the sidecar's deadline and retry layers
# (mesh.sidecar.resilience) do it, on the way to another service or to the own app. So these
# tests go through real sidecars: gateway (the router) and orders.


async def test_a_rule_puts_its_timeout_and_retries_on_the_request():
    seen = {}

    async def upstream(request):
        seen.update(request.state)
        return Response(200)

    router = configured({"rules": [{"path": "/*", "to": "orders", "timeout": "2s", "retries": 3,
                                    "per_try_timeout": "500ms"}]})
    await run_plugin(router, make_request("GET", "/x"), upstream)
    assert (seen[UPSTREAM], seen[TIMEOUT]) == ("orders", 2.0)
    retries = seen[RETRIES]
    assert (retries.attempts, retries.per_try_timeout, retries.idempotent_only) == (4, 0.5, True)
    assert retries.on == ["connect-failure", "reset", "timeout", "502", "503", "504"]
    assert retries.backoff == 0.025 and retries.budget is None  # the rest from the route

    # A rule that sets neither leaves the route's settings alone; `retries = 0` asks for none.
    seen.clear()
    await run_plugin(Router([Rule(path="/*", to="orders")]), make_request("GET", "/x"), upstream)
    assert TIMEOUT not in seen and RETRIES not in seen
    await run_plugin(Router([Rule(path="/*", to="orders", retries=0)]), make_request("GET", "/x"), upstream)
    assert seen[RETRIES].attempts == 1


class Backend:
    """An app that answers with ``outcomes`` in turn (a status or ``"hang"``), then 200."""

    def __init__(self, *outcomes) -> None:
        self.outcomes = list(outcomes)
        self.bodies = []
        self.delay = 0.0

    @property
    def calls(self) -> int:
        return len(self.bodies)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.bodies.append(await request.read())
            outcome = self.outcomes.pop(0) if self.outcomes else 200
            await asyncio.sleep(self.delay)
            if outcome == "hang":
                await asyncio.sleep(30)
                outcome = 200
            return web.Response(status=outcome, text=f"try {self.calls}")

        application = web.Application()
        application.router.add_route("*", "/{tail:.*}", handle)
        return application


ROUTED = """
[mesh]
name = "routing"
{defaults}

[services.gateway]
command = "x"
{gateway}
plugins = [ {{ use = "router", rules = [ {rules} ] }} ]

[services.orders]
command = "x"

[[routes]]
from = "gateway"
to = "orders"
"""


@asynccontextmanager
async def routed(aiohttp_server, rules: str, orders: Backend, own: Backend | None = None, gateway: str = "",
                 defaults: str = ""):
    """A gateway whose router has ``rules`` (TOML), in front of ``orders``; yields (url, mesh)."""
    ports = {"orders": (await aiohttp_server(orders.app())).port,
             "gateway": (await aiohttp_server((own or Backend()).app())).port}
    async with run_mesh(ROUTED.format(rules=rules, gateway=gateway, defaults=defaults), ports) as mesh:
        yield mesh.url("gateway"), mesh


async def fetch(url: str, method: str = "GET", **kwargs) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, **kwargs) as response:
            return response.status, await response.text()


async def test_timeout_gives_a_short_504(aiohttp_server):
    orders = Backend("hang")
    async with routed(aiohttp_server, '{ path = "/*", to = "orders", timeout = "300ms" }', orders) as (url, _):
        started = time.monotonic()
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/x", headers={"x-request-id": "req-7"}) as response:
                status, text = response.status, await response.text()
        took = time.monotonic() - started
    assert status == 504 and "request id: req-7" in text
    assert took < 2.0 and orders.calls == 1  # no time left for a second try


async def test_idempotent_requests_are_retried_on_502_503_504(aiohttp_server):
    orders = Backend(503, 502, 504)
    async with routed(aiohttp_server, '{ path = "/*", to = "orders", retries = 3 }', orders) as (url, mesh):
        assert await fetch(url + "/x") == (200, "try 4")
        retry = dict(mesh.sidecars["gateway"].outbound.plugins)["mesh.defaults (retry)"]
    assert orders.calls == 4 and retry.retries == 3  # the gateway's outbound retry layer retried


async def test_a_failed_connect_is_tried_again_on_another_instance(aiohttp_server, unused_tcp_port):
    orders = Backend()
    async with routed(aiohttp_server, '{ path = "/*", to = "orders", retries = 1 }', orders) as (url, mesh):
        registry = mesh.sidecars["gateway"].registry
        live = registry.as_dict()["orders"][0]
        registry.update({**registry.as_dict(), "orders": [f"127.0.0.1:{unused_tcp_port}", live]})
        results = [await fetch(url + "/x", "POST", data=b"order") for _ in range(10)]
    # Nothing reached the dead address, so even a POST goes again, to the instance that answers.
    assert {status for status, _ in results} == {200} and orders.bodies == [b"order"] * 10


async def test_retries_give_up_with_the_last_answer(aiohttp_server):
    orders = Backend(503, 503, 200)
    async with routed(aiohttp_server, '{ path = "/*", to = "orders", retries = 1 }', orders) as (url, _):
        assert await fetch(url + "/x") == (503, "try 2")
    assert orders.calls == 2


async def test_non_idempotent_requests_are_not_retried(aiohttp_server):
    orders = Backend(503)
    async with routed(aiohttp_server, '{ path = "/*", to = "orders", retries = 3 }', orders) as (url, _):
        assert (await fetch(url + "/x", "POST", data=b"pay"))[0] == 503
    assert orders.bodies == [b"pay"]


async def test_a_retried_request_sends_its_streamed_body_again(aiohttp_server):
    orders = Backend(503)
    async with routed(aiohttp_server, '{ path = "/*", to = "orders", retries = 1 }', orders) as (url, _):
        status, _ = await fetch(url + "/x", "PUT", data=stream([b"he", b"llo"]), headers={"Content-Length": "5"})
    assert status == 200 and orders.bodies == [b"hello", b"hello"]


async def test_per_try_timeout_retries_a_hanging_try(aiohttp_server):
    orders = Backend("hang", 200)
    rule = '{ path = "/*", to = "orders", retries = 2, per_try_timeout = "300ms" }'
    async with routed(aiohttp_server, rule, orders) as (url, _):
        assert await fetch(url + "/x") == (200, "try 2")


async def test_the_overall_timeout_bounds_all_tries(aiohttp_server):
    orders = Backend(*["hang"] * 11)
    rule = '{ path = "/*", to = "orders", timeout = "800ms", retries = 10, per_try_timeout = "200ms" }'
    async with routed(aiohttp_server, rule, orders) as (url, _):
        started = time.monotonic()
        status, _ = await fetch(url + "/x")
        took = time.monotonic() - started
    assert status == 504 and 2 <= orders.calls < 11
    # Eleven tries and their back-off would take over 2 s; a slow machine may be late to cut
    # them at 0.8 s, but not this late.
    assert took < 2.5


async def test_the_rule_timeout_takes_the_place_of_the_mesh_default(aiohttp_server):
    orders = Backend()
    orders.delay = 0.4
    defaults = 'defaults = { timeout = "100ms", retries = { attempts = 1 } }'
    rules = '{ path = "/patient", to = "orders", timeout = "5s" }, { path = "/*", to = "orders" }'
    async with routed(aiohttp_server, rules, orders, defaults=defaults) as (url, _):
        assert (await fetch(url + "/hasty"))[0] == 504  # [mesh.defaults] timeout: 100ms
        assert await fetch(url + "/patient") == (200, "try 2")


async def test_rules_for_the_own_app_bound_and_retry_the_call_to_it(aiohttp_server):
    own = Backend(503)
    rules = '{ path = "/again", retries = 1 }, { path = "/quick", timeout = "300ms" }'
    async with routed(aiohttp_server, rules, Backend(), own) as (url, _):
        assert await fetch(url + "/again") == (200, "try 2")
        own.outcomes = ["hang"]
        started = time.monotonic()
        assert (await fetch(url + "/quick"))[0] == 504
        assert time.monotonic() - started < 2.0
        own.outcomes = [503]
        assert await fetch(url + "/plain") == (503, "try 4")  # no rule: the app never gets it twice
    assert own.calls == 4


async def test_calls_to_other_services_take_the_outbound_chain(aiohttp_server):
    # The gateway's outbound plugins, and the route's retries (attempts = 3 by default), apply.
    orders = Backend(503)
    gateway = 'outbound = [ { use = "stamp", value = "out" } ]'
    async with routed(aiohttp_server, '{ path = "/*", to = "orders" }', orders, gateway=gateway) as (url, mesh):
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/x") as response:
                assert (response.status, await response.text()) == (200, "try 2")
                assert response.headers["X-Stamp"] == "out"
        config = mesh.sidecars["gateway"].outbound.plugins
    assert [name for name, _ in config][0] == "services.gateway.outbound[0] (stamp)"
    # `retries = 0`: this rule's calls are never retried, whatever the route says.
    orders = Backend(503)
    async with routed(aiohttp_server, '{ path = "/*", to = "orders", retries = 0 }', orders) as (url, _):
        assert (await fetch(url + "/x"))[0] == 503
    assert orders.calls == 1


# -- configuration -----------------------------------------------------------------


def problems_of(table):
    problems = []
    bind(Router, table, where="services.web.plugins[0]", label="router", problems=problems)
    return problems


@pytest.mark.parametrize("rule, message", [
    ({"path": "/a", "to": "x", "redirect": "/b"}, "to and redirect"),
    ({"path": "/a", "respond": {"status": 204}, "timeout": "1s"}, "timeout would do nothing"),
    ({"path": "/a", "sticky": "header:X-User", "to": "x"}, "sticky only applies to a split"),
    ({"path": "/a", "split": {"a": 1}, "sticky": "cookie"}, "header:X-User"),
    ({"path": "/a", "split": {"a": 0}}, "add up to 0"),
    ({"path": "/a/*/b"}, "may only end"),
    ({"path": "a"}, "must start with '/'"),
    ({"path": "/a", "regex": "/a"}, "path or regex"),
    ({"regex": "(unclosed"}, "not a valid regular expression"),
    ({"path": "/a", "strip_prefix": "/a", "rewrite": "/b"}, "strip_prefix or rewrite"),
    ({"path": "/a", "redirect": "/b", "redirect_status": 200}, "redirect_status"),
    ({"path": "/a", "to": "x", "per_try_timeout": "1s"}, "needs retries"),
    ({"path": "/a", "to": "x", "timeout": "soon"}, "duration"),
    ({"pth": "/a"}, "did you mean 'path'"),
])
def test_bad_rules_are_refused_naming_the_rule(rule, message):
    (problem,) = problems_of({"rules": [{"path": "/ok", "to": "x"}, rule]})
    assert problem.startswith("services.web.plugins[0] (router): ")
    assert "rules[1]" in problem and message in problem
