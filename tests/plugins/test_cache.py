"""The `cache` plugin: what it stores, for how long, for whom, and what it hands back."""

import asyncio
import time
from email.utils import formatdate

import jwt as pyjwt
import pytest
from aiohttp import ClientSession, web
from prometheus_client.parser import text_string_to_metric_families

from mesh import PluginError, Response, UpstreamError
from mesh.loader import load_class
from mesh.testing import make_request, run_chain, run_mesh, run_plugin, started, stream
from mesh_plugins.cache import Cache
from mesh_plugins.jwt import JWT

T0 = 1_000_000.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


MAX_AGE = ("Cache-Control", "max-age=60")


class App:
    """A fake upstream: counts calls, answers ``v1``, ``v2``, ... with the given headers.

    By default its answers say ``max-age=60``: storable, but not ``public``.
    """

    def __init__(self, headers=(MAX_AGE,), status: int = 200) -> None:
        self.headers = list(headers)
        self.status = status
        self.requests = []
        self.sent = []  # the headers of each request as the app got them

    async def __call__(self, request):
        self.requests.append(request)
        self.sent.append(request.headers.copy())
        return Response(self.status, f"v{self.calls}".encode(), list(self.headers))

    @property
    def calls(self) -> int:
        return len(self.requests)


async def settle() -> None:
    """Let every task that can run do so until it waits: loop turns, not wall-clock time."""
    for _ in range(50):
        await asyncio.sleep(0)


def get(path="/a", method="GET", **headers):
    headers = {"Host": "web", **{k.replace("_", "-"): v for k, v in headers.items()}}
    return make_request(method, path, headers=headers)


def cache(**options) -> Cache:
    plugin = Cache(**options)
    plugin.clock = Clock()
    return plugin


async def fetch(plugin, app, path="/a", method="GET", **headers):
    response = await run_plugin(plugin, get(path, method, **headers), upstream=app)
    return response, await response.read()


# -- hits, misses, Age -------------------------------------------------------------


async def test_second_get_is_a_hit_served_without_the_app():
    plugin, app = cache(), App()
    first, body1 = await fetch(plugin, app)
    second, body2 = await fetch(plugin, app)
    assert first.headers["X-Cache"] == "MISS" and "Age" not in first.headers
    assert second.headers["X-Cache"] == "HIT" and second.headers["Age"] == "0"
    assert body1 == body2 == b"v1"
    assert app.calls == 1


async def test_ttl_is_the_lifetime_of_public_responses_that_name_none():
    plugin, app = cache(ttl=30), App([("Cache-Control", "public")])
    await fetch(plugin, app)
    plugin.clock.now += 10
    hit, _ = await fetch(plugin, app)
    assert hit.headers["X-Cache"] == "HIT" and hit.headers["Age"] == "10"
    plugin.clock.now += 21
    miss, body = await fetch(plugin, app)
    assert miss.headers["X-Cache"] == "MISS" and body == b"v2"


async def test_max_age_overrides_ttl():
    plugin, app = cache(ttl=1000), App([("Cache-Control", "max-age=5")])
    await fetch(plugin, app)
    plugin.clock.now += 6
    assert (await fetch(plugin, app))[0].headers["X-Cache"] == "MISS"


async def test_s_maxage_overrides_max_age_for_a_shared_cache():
    plugin, app = cache(), App([("Cache-Control", "max-age=5, s-maxage=100")])
    await fetch(plugin, app)
    plugin.clock.now += 50
    assert (await fetch(plugin, app))[0].headers["X-Cache"] == "HIT"


async def test_age_from_upstream_counts_against_the_lifetime():
    plugin, app = cache(), App([("Cache-Control", "max-age=60"), ("Age", "50")])
    await fetch(plugin, app)
    hit, _ = await fetch(plugin, app)
    assert hit.headers["Age"] == "50"
    plugin.clock.now += 11
    assert (await fetch(plugin, app))[0].headers["X-Cache"] == "MISS"


async def test_expires_counts_from_date():
    date = 1_700_000_000
    app = App([("Date", formatdate(date, usegmt=True)),
               ("Expires", formatdate(date + 20, usegmt=True))])
    plugin = cache(ttl=1000)
    await fetch(plugin, app)
    plugin.clock.now += 10
    assert (await fetch(plugin, app))[0].headers["X-Cache"] == "HIT"
    plugin.clock.now += 11
    assert (await fetch(plugin, app))[0].headers["X-Cache"] == "MISS"


async def test_invalid_expires_means_already_expired():
    plugin, app = cache(ttl=1000), App([("Expires", "0")])
    await fetch(plugin, app)
    await fetch(plugin, app)
    assert app.calls == 2


async def test_zero_ttl_stores_only_responses_with_a_lifetime():
    plugin = cache(ttl=0)
    plain, explicit = App([("Cache-Control", "public")]), App([("Cache-Control", "max-age=60")])
    await fetch(plugin, plain, "/plain")
    await fetch(plugin, plain, "/plain")
    await fetch(plugin, explicit, "/explicit")
    await fetch(plugin, explicit, "/explicit")
    assert (plain.calls, explicit.calls) == (2, 1)


# -- what may be stored ------------------------------------------------------------


@pytest.mark.parametrize("cache_control", ["no-store", "private", "max-age=60, private",
                                           'private="Set-Cookie"', "no-cache"])
async def test_responses_a_shared_cache_must_not_reuse_are_not_served(cache_control):
    plugin, app = cache(), App([("Cache-Control", cache_control)])
    await fetch(plugin, app)
    second, body = await fetch(plugin, app)
    assert second.headers["X-Cache"] == "MISS" and body == b"v2"


async def test_plain_responses_to_authenticated_requests_are_not_cached():
    plugin, app = cache(), App([("Cache-Control", "max-age=60")])
    await fetch(plugin, app, authorization="Bearer alice")
    # Neither alice again nor anyone else may get alice's response from the cache.
    again, _ = await fetch(plugin, app, authorization="Bearer alice")
    other, body = await fetch(plugin, app, authorization="Bearer bob")
    anonymous, _ = await fetch(plugin, app)
    assert [r.headers["X-Cache"] for r in (again, other, anonymous)] == ["MISS"] * 3
    assert body == b"v3" and app.calls == 4


@pytest.mark.parametrize("cache_control, stored", [
    ("public", True), ("s-maxage=60", True), ("public, max-age=60", True),
    ("max-age=60", False), ("must-revalidate, max-age=60", False),
])
async def test_responses_to_authenticated_requests_are_stored_only_when_public(cache_control, stored):
    plugin, app = cache(), App([("Cache-Control", cache_control)])
    await fetch(plugin, app, authorization="Bearer alice")
    second, body = await fetch(plugin, app, authorization="Bearer bob")
    assert (second.headers["X-Cache"] == "HIT") is stored
    assert body == (b"v1" if stored else b"v2")


@pytest.mark.parametrize("cache_control", ["max-age=60", "public, max-age=60", "s-maxage=60"])
async def test_set_cookie_responses_are_never_stored(cache_control):
    plugin = cache()
    app = App([("Cache-Control", cache_control), ("Set-Cookie", "session=alice")])
    await fetch(plugin, app)
    second, _ = await fetch(plugin, app)
    assert second.headers["X-Cache"] == "MISS" and second.headers["Set-Cookie"] == "session=alice"
    assert app.calls == 2


@pytest.mark.parametrize("status, headers, stored", [
    (200, [], False), (404, [], False), (301, [], False), (204, [], False),
    (200, [MAX_AGE], True), (404, [MAX_AGE], True), (301, [MAX_AGE], True), (204, [MAX_AGE], True),
    (500, [MAX_AGE], False), (503, [], False), (201, [MAX_AGE], False),
    (302, [], False), (302, [MAX_AGE], True), (307, [("Cache-Control", "public")], True),
])
async def test_only_explicitly_cacheable_responses_with_cacheable_statuses_are_stored(
        status, headers, stored):
    plugin, app = cache(), App(headers, status=status)
    await fetch(plugin, app)
    second, _ = await fetch(plugin, app)
    assert (second.headers["X-Cache"] == "HIT") is stored


async def test_post_is_never_served_from_the_cache():
    plugin, app = cache(), App([("Cache-Control", "public, max-age=60")])
    await fetch(plugin, app, method="POST")
    second, _ = await fetch(plugin, app, method="POST")
    assert second.headers["X-Cache"] == "MISS" and app.calls == 2


async def test_head_and_get_are_stored_apart_and_a_head_hit_has_no_body():
    plugin, app = cache(), App()
    await fetch(plugin, app, method="HEAD")
    head, head_body = await fetch(plugin, app, method="HEAD")
    get_response, _ = await fetch(plugin, app)
    assert head.headers["X-Cache"] == "HIT" and head_body == b""
    assert get_response.headers["X-Cache"] == "MISS"


@pytest.mark.parametrize("header", ["Range", "If-Match", "If-Range"])
async def test_range_and_precondition_requests_go_straight_to_the_app(header):
    plugin, app = cache(), App()
    await fetch(plugin, app)
    response, _ = await fetch(plugin, app, **{header: "bytes=0-1" if header == "Range" else '"x"'})
    assert response.headers["X-Cache"] == "MISS" and app.calls == 2


# -- keys --------------------------------------------------------------------------


async def test_vary_keeps_one_copy_per_value_of_the_named_headers():
    plugin, app = cache(), App([MAX_AGE, ("Vary", "Accept-Language")])
    await fetch(plugin, app, accept_language="en")
    await fetch(plugin, app, accept_language="fr")
    en, en_body = await fetch(plugin, app, accept_language="en")
    fr, fr_body = await fetch(plugin, app, accept_language="fr")
    assert (en_body, fr_body) == (b"v1", b"v2")
    assert en.headers["X-Cache"] == fr.headers["X-Cache"] == "HIT"


async def test_vary_star_is_not_stored():
    plugin, app = cache(), App([("Cache-Control", "public, max-age=60"), ("Vary", "*")])
    await fetch(plugin, app)
    await fetch(plugin, app)
    assert app.calls == 2


async def test_key_headers_keep_one_copy_per_value():
    plugin, app = cache(key_headers=["X-Tenant"]), App()
    await fetch(plugin, app, x_tenant="a")
    _, b_body = await fetch(plugin, app, x_tenant="b")
    _, a_body = await fetch(plugin, app, x_tenant="a")
    assert (a_body, b_body) == (b"v1", b"v2") and app.calls == 2


async def test_key_includes_host_path_and_query():
    plugin, app = cache(), App()
    await fetch(plugin, app, "/a?x=1")
    for path, host in [("/a?x=2", "web"), ("/b?x=1", "web"), ("/a?x=1", "other")]:
        response = await run_plugin(plugin, make_request("GET", path, headers={"Host": host}),
                                    upstream=app)
        assert response.headers["X-Cache"] == "MISS", (path, host)
    assert (await fetch(plugin, app, "/a?x=1"))[0].headers["X-Cache"] == "HIT"


# -- invalidation and eviction -----------------------------------------------------


async def test_a_successful_unsafe_request_invalidates_its_url_and_location():
    plugin, app = cache(), App()
    await fetch(plugin, app, "/items")
    await fetch(plugin, app, "/items/1")
    writer = App([("Location", "/items/1")], status=201)
    await fetch(plugin, writer, "/items", method="POST")
    items, _ = await fetch(plugin, app, "/items")
    item, _ = await fetch(plugin, app, "/items/1")
    assert items.headers["X-Cache"] == item.headers["X-Cache"] == "MISS"


async def test_a_failed_unsafe_request_invalidates_nothing():
    plugin, app = cache(), App()
    await fetch(plugin, app, "/items")
    await fetch(plugin, App(status=403), "/items", method="DELETE")
    assert (await fetch(plugin, app, "/items"))[0].headers["X-Cache"] == "HIT"


async def test_max_entries_evicts_the_least_recently_used():
    plugin, app = cache(max_entries=2), App()
    await fetch(plugin, app, "/a")
    await fetch(plugin, app, "/b")
    await fetch(plugin, app, "/a")  # /a is now more recent than /b
    await fetch(plugin, app, "/c")
    assert (await fetch(plugin, app, "/a"))[0].headers["X-Cache"] == "HIT"
    assert (await fetch(plugin, app, "/b"))[0].headers["X-Cache"] == "MISS"


async def test_max_bytes_bounds_what_is_kept():
    plugin = cache(max_bytes=3000, max_body=1000)

    async def big(request):
        return Response(200, b"x" * 900, [MAX_AGE])

    for path in ("/a", "/b", "/c", "/d"):
        await fetch(plugin, big, path)
    hits = [(await fetch(plugin, big, p))[0].headers["X-Cache"] for p in ("/a", "/d")]
    assert hits == ["MISS", "HIT"]


# -- request directives ------------------------------------------------------------


@pytest.mark.parametrize("headers", [{"Cache-Control": "no-cache"},
                                     {"Cache-Control": "max-age=0"},
                                     {"Pragma": "no-cache"}])
async def test_reload_requests_skip_the_stored_copy_and_store_the_new_one(headers):
    plugin, app = cache(), App()
    await fetch(plugin, app)
    reloaded, body = await fetch(plugin, app, **headers)
    after, after_body = await fetch(plugin, app)
    assert reloaded.headers["X-Cache"] == "MISS" and body == b"v2"
    assert after.headers["X-Cache"] == "HIT" and after_body == b"v2"


async def test_no_store_requests_neither_use_nor_fill_the_cache():
    plugin, app = cache(), App()
    await fetch(plugin, app, "/a")
    bypass, _ = await fetch(plugin, app, "/a", cache_control="no-store")
    await fetch(plugin, app, "/b", cache_control="no-store")
    later, _ = await fetch(plugin, app, "/b")
    assert bypass.headers["X-Cache"] == later.headers["X-Cache"] == "MISS"


async def test_request_max_age_and_min_fresh_refuse_older_copies():
    plugin, app = cache(), App()
    await fetch(plugin, app)
    plugin.clock.now += 20
    assert (await fetch(plugin, app, cache_control="max-age=30"))[0].headers["X-Cache"] == "HIT"
    assert (await fetch(plugin, app, cache_control="max-age=10"))[0].headers["X-Cache"] == "MISS"
    plugin.clock.now += 20  # the copy stored by the miss is 20s old, 40s left
    assert (await fetch(plugin, app, cache_control="min-fresh=30"))[0].headers["X-Cache"] == "HIT"
    assert (await fetch(plugin, app, cache_control="min-fresh=50"))[0].headers["X-Cache"] == "MISS"


async def test_max_stale_accepts_stale_copies_unless_the_response_forbids_it():
    plugin = cache(ttl=10)
    # With an ETag the stale copies are kept (for revalidation), so max-stale can use them.
    relaxed = App([("ETag", '"r"'), ("Cache-Control", "max-age=10")])
    strict = App([("ETag", '"s"'), ("Cache-Control", "max-age=10, must-revalidate")])
    await fetch(plugin, relaxed, "/relaxed")
    await fetch(plugin, strict, "/strict")
    plugin.clock.now += 15
    stale, _ = await fetch(plugin, relaxed, "/relaxed", cache_control="max-stale=10")
    refused, _ = await fetch(plugin, strict, "/strict", cache_control="max-stale")
    assert stale.headers["X-Cache"] == "HIT" and stale.headers["Age"] == "15"
    assert refused.headers["X-Cache"] == "MISS"


async def test_only_if_cached_gets_504_when_nothing_is_stored():
    plugin, app = cache(), App()
    response, _ = await fetch(plugin, app, cache_control="only-if-cached")
    assert response.status == 504 and app.calls == 0
    await fetch(plugin, app)
    assert (await fetch(plugin, app, cache_control="only-if-cached"))[0].status == 200


# -- validation --------------------------------------------------------------------


async def test_no_cache_response_is_revalidated_and_a_304_serves_the_stored_body():
    plugin = cache()
    seen = []

    async def app(request):
        seen.append(request.headers.get("If-None-Match"))
        if request.headers.get("If-None-Match") == '"1"':
            return Response(304, b"", {"ETag": '"1"', "Cache-Control": "max-age=60, no-cache"})
        return Response(200, b"body", {"ETag": '"1"', "Cache-Control": "max-age=60, no-cache"})

    await fetch(plugin, app)
    request = get()
    response = await run_plugin(plugin, request, upstream=app)
    assert seen == [None, '"1"']
    assert response.status == 200 and await response.read() == b"body"
    assert response.headers["X-Cache"] == "HIT"
    # The validator was the cache's own question, not the client's.
    assert "If-None-Match" not in request.headers


async def test_stale_copy_with_validator_is_replaced_when_the_app_sends_a_new_one():
    plugin = cache()
    app = App([("ETag", '"1"'), ("Cache-Control", "max-age=10")])
    await fetch(plugin, app)
    plugin.clock.now += 11
    response, body = await fetch(plugin, app)
    assert app.sent[1]["If-None-Match"] == '"1"'
    assert response.headers["X-Cache"] == "MISS" and body == b"v2"
    assert (await fetch(plugin, app))[1] == b"v2"


async def test_a_hit_answers_if_none_match_with_304():
    plugin, app = cache(), App([MAX_AGE, ("ETag", 'W/"abc"')])
    await fetch(plugin, app)
    response, body = await fetch(plugin, app, if_none_match='"zzz", "abc"')
    assert response.status == 304 and body == b"" and response.headers["ETag"] == 'W/"abc"'
    other, other_body = await fetch(plugin, app, if_none_match='"zzz"')
    assert other.status == 200 and other_body == b"v1"


# -- coalescing --------------------------------------------------------------------


class SlowApp(App):
    """Holds every call until ``release`` is set."""

    def __init__(self, headers=(MAX_AGE,), status=200) -> None:
        super().__init__(headers, status)
        self.release = asyncio.Event()

    async def __call__(self, request):
        self.requests.append(request)
        number = self.calls
        await self.release.wait()
        return Response(self.status, f"v{number}".encode(), list(self.headers))


async def _many(plugin, app, count=10):
    tasks = [asyncio.create_task(fetch(plugin, app)) for _ in range(count)]
    await settle()  # every request reaches the cache and waits there
    app.release.set()
    return await asyncio.gather(*tasks)


async def test_concurrent_misses_go_to_the_app_once():
    plugin, app = cache(), SlowApp()
    results = await _many(plugin, app)
    assert app.calls == 1
    assert {body for _, body in results} == {b"v1"}
    assert sorted(r.headers["X-Cache"] for r, _ in results) == ["HIT"] * 9 + ["MISS"]


async def test_concurrent_misses_that_cannot_be_stored_each_get_their_own_answer():
    plugin, app = cache(), SlowApp([("Cache-Control", "private")])
    results = await _many(plugin, app)
    assert app.calls == 10
    assert {body for _, body in results} == {f"v{n}".encode() for n in range(1, 11)}


async def test_waiters_go_themselves_when_the_first_request_fails():
    plugin = cache()
    release, calls = asyncio.Event(), []

    async def app(request):
        calls.append(request)
        if len(calls) == 1:
            await release.wait()
            raise UpstreamError(502, "connection reset")
        return Response(200, b"ok")

    first = asyncio.create_task(fetch(plugin, app))
    await settle()
    others = [asyncio.create_task(fetch(plugin, app)) for _ in range(3)]
    await settle()
    release.set()
    with pytest.raises(UpstreamError):
        await first
    assert [body for _, body in await asyncio.gather(*others)] == [b"ok"] * 3


# -- stale-while-revalidate --------------------------------------------------------


async def test_stale_while_revalidate_serves_stale_and_refreshes_once_in_background():
    plugin, app = cache(stale_while_revalidate=30), SlowApp([("Cache-Control", "max-age=10")])
    app.release.set()
    async with started(plugin):
        await fetch(plugin, app)
        plugin.clock.now += 15
        app.release.clear()  # hold the background refresh
        stale = [await fetch(plugin, app) for _ in range(5)]
        assert all(r.headers["X-Cache"] == "HIT" and body == b"v1" for r, body in stale)
        assert stale[0][0].headers["Age"] == "15"
        await settle()
        assert app.calls == 2  # one refresh for five stale hits
        app.release.set()
        await settle()
        fresh, body = await fetch(plugin, app)
    assert fresh.headers["X-Cache"] == "HIT" and fresh.headers["Age"] == "0" and body == b"v2"


async def test_stale_while_revalidate_window_ends():
    plugin, app = cache(stale_while_revalidate=30), App([("Cache-Control", "max-age=10")])
    await fetch(plugin, app)
    plugin.clock.now += 41
    response, body = await fetch(plugin, app)
    assert response.headers["X-Cache"] == "MISS" and body == b"v2"


async def test_must_revalidate_responses_are_never_served_stale():
    plugin = cache(stale_while_revalidate=60)
    app = App([("Cache-Control", "max-age=10, must-revalidate")])
    await fetch(plugin, app)
    plugin.clock.now += 11
    assert (await fetch(plugin, app))[0].headers["X-Cache"] == "MISS"


async def test_stop_cancels_a_background_refresh_still_running():
    plugin, cancelled = cache(stale_while_revalidate=30), asyncio.Event()

    async def app(request):
        if request.headers.get("X-Refresh"):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return Response(200, b"ok", [("Cache-Control", "max-age=10")])

    async with asyncio.timeout(5):  # a stop() that waits for the refresh would hang here
        async with started(plugin):
            await fetch(plugin, app)
            plugin.clock.now += 15
            await fetch(plugin, app, x_refresh="1")
            await settle()
    assert cancelled.is_set()


# -- large and streaming bodies ----------------------------------------------------


class Chunks:
    """A streaming body of ``count`` chunks that records how many were pulled."""

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size, self.pulled = count, size, 0

    async def __aiter__(self):
        for n in range(self.count):
            self.pulled += 1
            yield bytes([65 + n]) * self.size


async def test_a_stream_over_max_body_passes_through_without_being_buffered():
    plugin, chunks = cache(max_body=100), Chunks(10, 50)

    async def app(request):
        return Response(200, chunks.__aiter__(), [MAX_AGE])

    response = await run_plugin(plugin, get(), upstream=app)
    assert chunks.pulled <= 3  # the cache stopped reading just past max_body
    body = await response.read()
    assert body == b"".join(bytes([65 + n]) * 50 for n in range(10))
    assert response.headers["X-Cache"] == "MISS"
    assert (await fetch(plugin, app))[0].headers["X-Cache"] == "MISS"


async def test_a_declared_length_over_max_body_is_not_even_read():
    plugin, chunks = cache(max_body=100), Chunks(4, 50)

    async def app(request):
        return Response(200, chunks.__aiter__(), {"Content-Length": "200", "Cache-Control": "max-age=60"})

    response = await run_plugin(plugin, get(), upstream=app)
    assert chunks.pulled == 0
    assert len(await response.read()) == 200


async def test_a_small_stream_is_stored():
    plugin = cache(max_body=100)

    async def app(request):
        return Response(200, stream([b"ab", b"cd"]), [MAX_AGE])

    await fetch(plugin, app)
    response, body = await fetch(plugin, app)
    assert response.headers["X-Cache"] == "HIT" and body == b"abcd"


# -- options -----------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"max_body": 2000, "max_bytes": 1000}, "max_body"),
    ({"max_entries": 0}, "max_entries"),
])
def test_inconsistent_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Cache(**options)


async def test_entries_are_keyed_on_the_request_as_it_came_not_as_rewritten():
    from mesh import Plugin

    class Strip(Plugin):
        async def handle(self, request, call_next):
            request.path = request.path.removeprefix("/api")
            return await call_next(request)

    calls = []

    async def app(request):
        calls.append(request.path)
        return Response(200, b"x", {"Cache-Control": "max-age=60"})

    cache = Cache()
    for _ in range(2):
        response = await run_chain([cache, Strip()], make_request("GET", "/api/a", headers={"Host": "h"}), app)
    assert response.headers["X-Cache"] == "HIT" and calls == ["/a"]


# -- leaks between users -----------------------------------------------------------

SECRET = "a-test-secret-that-is-long-enough-for-hs256"


def token(sub: str) -> str:
    """A token minted when the test runs, valid for an hour: far longer than any test."""
    return pyjwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def personal(headers=()):
    """An app that answers each user with their own page, identified as the app sees them."""
    seen = []

    async def app(request):
        seen.append(request)
        who = (request.headers.get("x-user") or request.headers.get("Cookie")
               or request.headers.get("Authorization") or "anonymous")
        return Response(200, f"page of {who}".encode(), list(headers))

    app.seen = seen
    return app


async def as_user(plugin, app, path="/account", **headers):
    _, body = await fetch(plugin, app, path, **headers)
    return body


@pytest.mark.parametrize("headers", [[], [MAX_AGE]], ids=["plain", "max-age"])
async def test_bob_does_not_get_alices_page_by_cookie(headers):
    plugin, app = cache(), personal(headers)
    assert await as_user(plugin, app, cookie="session=alice") == b"page of session=alice"
    assert await as_user(plugin, app, cookie="session=bob") == b"page of session=bob"
    assert await as_user(plugin, app) == b"page of anonymous"
    assert len(app.seen) == 3


async def jwt_chain(plugins, path, user, app):
    request = make_request("GET", path, headers={"Host": "web", "Authorization": f"Bearer {token(user)}"})
    response = await run_chain(plugins, request, app)
    return response, await response.read()


def stripping_jwt():
    """jwt set not to forward the token: the cache never sees Authorization."""
    return JWT(secret=SECRET, forward_token=False, forward_claims={"sub": "x-user"})


@pytest.mark.parametrize("headers", [[], [MAX_AGE]], ids=["plain", "max-age"])
async def test_bob_does_not_get_alices_page_when_jwt_strips_the_token(headers):
    auth, plugin, app = stripping_jwt(), cache(), personal(headers)
    async with started(auth):
        _, alice = await jwt_chain([auth, plugin], "/me", "alice", app)
        _, bob = await jwt_chain([auth, plugin], "/me", "bob", app)
    assert (alice, bob) == (b"page of alice", b"page of bob")
    assert all("Authorization" not in request.headers for request in app.seen)


async def test_keying_on_a_header_jwt_removed_does_not_merge_users():
    auth, app = stripping_jwt(), personal([MAX_AGE])
    plugin = cache(key=["header:Authorization"])
    async with started(auth):
        await jwt_chain([auth, plugin], "/me", "alice", app)
        _, bob = await jwt_chain([auth, plugin], "/me", "bob", app)
    assert bob == b"page of bob"


async def test_key_on_a_claim_keeps_private_entries_per_user():
    auth, app = stripping_jwt(), personal([MAX_AGE])
    plugin = cache(key=["claim:sub"])
    async with started(auth):
        first, _ = await jwt_chain([auth, plugin], "/me", "alice", app)
        again, alice = await jwt_chain([auth, plugin], "/me", "alice", app)
        other, bob = await jwt_chain([auth, plugin], "/me", "bob", app)
    assert [r.headers["X-Cache"] for r in (first, again, other)] == ["MISS", "HIT", "MISS"]
    assert (alice, bob) == (b"page of alice", b"page of bob")
    assert len(app.seen) == 2


@pytest.mark.parametrize("key, credentials", [
    (["header:Cookie"], {"cookie": "session=%s"}),
    (["header:Authorization"], {"authorization": "Bearer %s"}),
    (["header:Authorization", "header:Cookie", "claim:sub", "peer"], {"cookie": "s=%s"}),
])
async def test_key_option_isolates_identities(key, credentials):
    plugin, app = cache(key=key), personal([MAX_AGE])

    async def visit(user):
        headers = {name: value % user for name, value in credentials.items()}
        response, body = await fetch(plugin, app, "/account", **headers)
        return response.headers["X-Cache"], body

    alice, bob, alice_again, bob_again = [await visit(u) for u in ("alice", "bob", "alice", "bob")]
    assert alice[0] == bob[0] == "MISS" and alice_again[0] == bob_again[0] == "HIT"
    assert alice[1] == alice_again[1] != bob[1] == bob_again[1]
    assert (await as_user(plugin, app)) == b"page of anonymous"


@pytest.mark.parametrize("key, headers", [
    (["header:Authorization"], {"cookie": "s=alice", "authorization": "Bearer alice"}),
    (["header:Cookie"], {"cookie": "s=alice", "authorization": "Bearer alice"}),
    (["claim:sub"], {"authorization": "Bearer alice"}),  # no plugin checked the token
])
async def test_a_credential_outside_the_key_keeps_the_request_out_of_private_entries(key, headers):
    plugin, app = cache(key=key), personal([MAX_AGE])
    await fetch(plugin, app, **headers)
    second, _ = await fetch(plugin, app, **headers)
    assert second.headers["X-Cache"] == "MISS" and len(app.seen) == 2


async def test_authenticated_requests_are_served_only_entries_any_user_may_get():
    plugin, app = cache(), personal([MAX_AGE])
    await as_user(plugin, app)  # the anonymous page is stored, but not as public
    assert await as_user(plugin, app, cookie="s=alice") == b"page of s=alice"
    shared = App([("Cache-Control", "public, max-age=60")])
    await fetch(plugin, shared, "/logo")
    hit, body = await fetch(plugin, shared, "/logo", cookie="s=alice")
    assert hit.headers["X-Cache"] == "HIT" and body == b"v1"


@pytest.mark.parametrize("cache_control", ["public", "s-maxage=60"])
async def test_public_and_s_maxage_answers_to_authenticated_requests_are_stored(cache_control):
    auth, app = stripping_jwt(), personal([("Cache-Control", cache_control)])
    plugin = cache()
    async with started(auth):
        await jwt_chain([auth, plugin], "/catalog", "alice", app)
        hit, body = await jwt_chain([auth, plugin], "/catalog", "bob", app)
    cookie_hit, _ = await fetch(plugin, app, "/catalog", cookie="s=carol")
    assert hit.headers["X-Cache"] == cookie_hit.headers["X-Cache"] == "HIT"
    assert body == b"page of alice" and len(app.seen) == 1


async def test_claims_put_on_by_a_plugin_after_the_cache_count_too():
    from mesh import Plugin

    class ApiKey(Plugin):
        """Authenticates by a header the cache knows nothing about, and removes it."""

        async def handle(self, request, call_next):
            request.state["claims"] = {"sub": request.headers.popone("X-Api-Key")}
            return await call_next(request)

    plugin, app = cache(), personal([MAX_AGE])
    for user in ("alice", "bob"):
        request = make_request("GET", "/me", headers={"Host": "web", "X-Api-Key": user})
        response = await run_chain([plugin, ApiKey()], request, app)
        assert response.headers["X-Cache"] == "MISS"
    assert len(app.seen) == 2


@pytest.mark.parametrize("path", ["/account.css", "/account;x.css", "/account/x.css",
                                  "/account.js?v=1", "/account.png", "/static/account.css"])
async def test_cache_deception_paths_change_nothing(path):
    plugin = cache()
    app = personal()  # a plain answer, whatever the path looks like
    assert await as_user(plugin, app, path, cookie="s=alice") == b"page of s=alice"
    assert await as_user(plugin, app, path, cookie="s=bob") == b"page of s=bob"
    await as_user(plugin, app, path)
    again, _ = await fetch(plugin, app, path)
    assert again.headers["X-Cache"] == "MISS" and len(app.seen) == 4
    # Turning heuristics on stores anonymous answers, but never an authenticated one.
    heuristic = cache(heuristic=True)
    await as_user(heuristic, app, path, cookie="s=alice")
    assert await as_user(heuristic, app, path, cookie="s=bob") == b"page of s=bob"


async def test_concurrent_requests_of_different_users_are_not_coalesced():
    release, seen = asyncio.Event(), []

    async def app(request):
        seen.append(request)
        await release.wait()
        return Response(200, f"page of {request.headers['Cookie']}".encode(), [MAX_AGE])

    for plugin in (cache(), cache(key=["header:Cookie"])):
        seen.clear()
        release.clear()
        users = ["s=alice", "s=bob", "s=alice", "s=bob"]
        tasks = [asyncio.create_task(fetch(plugin, app, "/account", cookie=u)) for u in users]
        await settle()
        release.set()
        results = await asyncio.gather(*tasks)
        assert [body for _, body in results] == [f"page of {u}".encode() for u in users]
        # Keyed on the cookie, each user's second request waited for their first.
        assert len(seen) == (4 if not plugin.key else 2)


# -- heuristic freshness -----------------------------------------------------------


@pytest.mark.parametrize("status", [200, 203, 204, 301, 404, 410])
async def test_no_heuristic_freshness_by_default(status):
    date = 1_700_000_000
    app = App([("Date", formatdate(date, usegmt=True)),
               ("Last-Modified", formatdate(date - 86400, usegmt=True))], status=status)
    plugin = cache(ttl=3600)
    await fetch(plugin, app)
    second, _ = await fetch(plugin, app)
    assert second.headers["X-Cache"] == "MISS" and app.calls == 2


async def test_heuristic_lifetime_is_a_tenth_since_last_modified_at_most_ttl():
    date = 1_700_000_000
    recent = App([("Date", formatdate(date, usegmt=True)),
                  ("Last-Modified", formatdate(date - 100, usegmt=True))])
    old = App([("Date", formatdate(date, usegmt=True)),
               ("Last-Modified", formatdate(date - 86400, usegmt=True))])
    undated = App([])
    plugin = cache(heuristic=True, ttl=30)
    for path, app in (("/recent", recent), ("/old", old), ("/undated", undated)):
        await fetch(plugin, app, path)
    plugin.clock.now += 9
    assert (await fetch(plugin, recent, "/recent"))[0].headers["X-Cache"] == "HIT"
    plugin.clock.now += 2  # 11 s: past a tenth of 100 s
    assert (await fetch(plugin, recent, "/recent"))[0].headers["X-Cache"] == "MISS"
    plugin.clock.now += 18  # 29 s: within ttl
    assert (await fetch(plugin, old, "/old"))[0].headers["X-Cache"] == "HIT"
    assert (await fetch(plugin, undated, "/undated"))[0].headers["X-Cache"] == "HIT"
    plugin.clock.now += 2  # 31 s: ttl caps both
    assert (await fetch(plugin, old, "/old"))[0].headers["X-Cache"] == "MISS"
    assert (await fetch(plugin, undated, "/undated"))[0].headers["X-Cache"] == "MISS"


@pytest.mark.parametrize("headers", [
    [("Set-Cookie", "session=alice")],
    [("Cache-Control", "private")],
    [("Cache-Control", "no-store")],
    [("Vary", "*")],
], ids=["set-cookie", "private", "no-store", "vary-star"])
@pytest.mark.parametrize("lifetime", [[], [MAX_AGE], [("Cache-Control", "public, s-maxage=60")]],
                         ids=["plain", "max-age", "public"])
@pytest.mark.parametrize("request_headers", [{}, {"cookie": "s=alice"}], ids=["anonymous", "cookie"])
async def test_never_stored_even_when_everything_else_allows_it(headers, lifetime, request_headers):
    plugin = cache(heuristic=True, key=["header:Cookie"])
    app = App([*lifetime, *headers])
    await fetch(plugin, app, **request_headers)
    second, _ = await fetch(plugin, app, **request_headers)
    assert second.headers["X-Cache"] == "MISS" and app.calls == 2


async def test_no_cache_request_revalidates_the_stored_copy():
    plugin = cache()

    async def app(request):
        if request.headers.get("If-None-Match") == '"1"':
            return Response(304, b"", {"ETag": '"1"', "Cache-Control": "max-age=60"})
        return Response(200, b"body", {"ETag": '"1"', "Cache-Control": "max-age=60"})

    await fetch(plugin, app)
    response, body = await fetch(plugin, app, cache_control="no-cache")
    assert response.status == 200 and body == b"body" and response.headers["X-Cache"] == "HIT"


@pytest.mark.parametrize("key", [["cookie"], ["header:"], ["claim:"], ["peer:x"], ["path"]])
def test_bad_key_entries_are_refused(key):
    with pytest.raises(ValueError, match="key"):
        Cache(key=key)


@pytest.mark.parametrize("use, message", [
    ("http_caching", "unknown plugin 'http_caching'"),
    ("mesh_plugins.http_caching:StoreRules", "is not a plugin"),
])
def test_the_http_caching_rules_are_not_a_plugin(use, message):
    with pytest.raises(PluginError, match=message):
        load_class(use)


# -- metrics -----------------------------------------------------------------------

METERED = """
[mesh]
name = "cachem"
[services.web]
command = "x"
port = 1
plugins = [ { use = "cache" } ]
"""

# What the app says per path.
CACHE_CONTROL = {
    "/fresh": "max-age=60",
    "/etag": "max-age=60, no-cache",                    # stored, confirmed before every use
    "/stale": "max-age=10, stale-while-revalidate=600",  # stale at once: see its Age
    "/nostore": "no-store",
}


async def test_lookups_are_counted_by_result_on_the_sidecars_metrics(aiohttp_server, tmp_path):
    async def app_handler(request: web.Request) -> web.Response:
        headers = {"Cache-Control": CACHE_CONTROL.get(request.path, "max-age=60"), "ETag": '"1"', "Age": "100"}
        if request.headers.get("If-None-Match") == '"1"':
            return web.Response(status=304, headers=headers)
        return web.Response(text="body", headers=headers if request.path == "/stale" else
                            {k: v for k, v in headers.items() if k != "Age"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", app_handler)
    port = (await aiohttp_server(app)).port
    sent = [  # (method, path, request headers, X-Cache, counted as)
        ("GET", "/fresh", {}, "MISS", "miss"),
        ("GET", "/fresh", {}, "HIT", "hit"),
        ("GET", "/fresh", {}, "HIT", "hit"),
        ("GET", "/etag", {}, "MISS", "miss"),
        ("GET", "/etag", {}, "HIT", "hit"),  # the app's 304 confirmed the stored copy
        ("GET", "/stale", {}, "MISS", "miss"),
        ("GET", "/stale", {}, "HIT", "stale"),
        ("GET", "/nostore", {}, "MISS", "miss"),
        ("GET", "/nostore", {}, "MISS", "miss"),
        ("GET", "/absent", {"Cache-Control": "only-if-cached"}, "MISS", "miss"),
        ("POST", "/other", {}, "MISS", "bypass"),
        ("GET", "/fresh", {"Cache-Control": "no-store"}, "MISS", "bypass"),
        ("GET", "/fresh", {"Range": "bytes=0-1"}, "MISS", "bypass"),
    ]
    async with run_mesh(METERED, {"web": port}, tmp_path, tls=False) as mesh, ClientSession() as session:
        for method, path, headers, x_cache, _ in sent:
            async with session.request(method, mesh.url("web") + path, headers=headers) as response:
                await response.read()
                assert response.headers["X-Cache"] == x_cache, (method, path, headers)
        async with session.get(mesh.url("web", "admin") + "/metrics") as response:
            text = await response.text()
    found = {sample.labels["result"]: sample.value
             for family in text_string_to_metric_families(text) for sample in family.samples
             if sample.name == "mesh_cache_lookups_total" and sample.labels["plugin"] == "cache"}
    assert found == {result: sum(1 for *_, counted in sent if counted == result)
                     for result in ("hit", "stale", "miss", "bypass")}

