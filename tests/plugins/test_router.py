"""The `router` plugin: which rule matches, what it does to the request, where it goes."""

import asyncio
from collections import Counter

import pytest

from mesh import Response, UpstreamError
from mesh.options import bind
from mesh.testing import make_request, run_plugin, stream
from mesh_plugins.router import Router, Rule

TOML_EXAMPLE = {"rules": [
    {"path": "/api/v1/*", "strip_prefix": "/api/v1", "to": "orders"},
    {"path": "/old", "redirect": "/new"},
    {"path": "/v/*", "split": {"v1": 50, "v2": 50}, "sticky": "header:X-User"},
]}


async def where(request):
    """An upstream that answers with where the request went: service, path and query."""
    upstream = request.state.get("upstream", "self")
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


class Flaky:
    """Answers with ``outcomes`` in turn: a status, ``"hang"``, or an exception."""

    def __init__(self, *outcomes) -> None:
        self.outcomes = list(outcomes)
        self.bodies = []

    async def __call__(self, request):
        # Consume the body as a forwarder does: chunk by chunk, once.
        self.bodies.append(b"".join([chunk async for chunk in request.stream()]))
        outcome = self.outcomes.pop(0) if self.outcomes else 200
        if outcome == "hang":
            await asyncio.sleep(3600)
        if isinstance(outcome, Exception):
            raise outcome
        return Response(outcome, f"try {len(self.bodies)}")

    @property
    def calls(self) -> int:
        return len(self.bodies)


async def test_timeout_gives_a_short_504():
    router = Router([Rule(path="/*", to="slow", timeout=0.05)])
    request = make_request("GET", "/x")
    response = await run_plugin(router, request, upstream=Flaky("hang"))
    assert response.status == 504
    assert request.id in (await response.read()).decode()


async def test_idempotent_requests_are_retried_on_502_503_504_and_upstream_errors():
    router = Router([Rule(path="/*", to="orders", retries=3)])
    app = Flaky(503, UpstreamError(502, "reset"), 504)
    response = await run_plugin(router, make_request("GET", "/x"), upstream=app)
    assert response.status == 200 and app.calls == 4


async def test_retries_give_up_with_the_last_answer():
    router = Router([Rule(path="/*", to="orders", retries=1)])
    app = Flaky(503, 503, 200)
    response = await run_plugin(router, make_request("GET", "/x"), upstream=app)
    assert response.status == 503 and app.calls == 2
    with pytest.raises(UpstreamError):
        await run_plugin(router, make_request("GET", "/x"),
                         upstream=Flaky(UpstreamError(502, "a"), UpstreamError(502, "b")))


async def test_non_idempotent_requests_are_not_retried():
    router = Router([Rule(path="/*", to="orders", retries=3)])
    app = Flaky(503)
    response = await run_plugin(router, make_request("POST", "/x", body=b"pay"), upstream=app)
    assert response.status == 503 and app.calls == 1


async def test_a_retried_request_sends_its_streamed_body_again():
    router = Router([Rule(path="/*", to="orders", retries=1)])
    app = Flaky(503)
    request = make_request("PUT", "/x", body=stream([b"he", b"llo"]))
    response = await run_plugin(router, request, upstream=app)
    assert response.status == 200 and app.bodies == [b"hello", b"hello"]


async def test_per_try_timeout_retries_a_hanging_try():
    router = Router([Rule(path="/*", to="orders", retries=2, per_try_timeout=0.05)])
    app = Flaky("hang", 200)
    response = await run_plugin(router, make_request("GET", "/x"), upstream=app)
    assert response.status == 200 and app.calls == 2


async def test_the_overall_timeout_bounds_all_tries():
    router = Router([Rule(path="/*", to="orders", timeout=0.15, retries=10,
                          per_try_timeout=0.05)])
    app = Flaky(*["hang"] * 11)
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await run_plugin(router, make_request("GET", "/x"), upstream=app)
    assert response.status == 504
    assert app.calls < 11
    # Eleven tries and their back-off would take over 10 s; a slow machine
    # may be late to cut them at 0.15 s, but not this late.
    assert loop.time() - started < 5.0


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
