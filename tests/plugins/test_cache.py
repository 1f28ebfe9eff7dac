"""The `cache` plugin: what it stores, for how long, for whom, and what it hands back."""

import asyncio
from email.utils import formatdate

import pytest

from mesh import Response, UpstreamError
from mesh.testing import make_request, run_plugin, started, stream
from mesh_plugins.cache import Cache

T0 = 1_000_000.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class App:
    """A fake upstream: counts calls, answers ``v1``, ``v2``, ... with the given headers."""

    def __init__(self, headers=(), status: int = 200) -> None:
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


async def test_age_grows_and_ttl_ends_freshness():
    plugin, app = cache(ttl=30), App()
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
    plain, explicit = App(), App([("Cache-Control", "max-age=60")])
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


@pytest.mark.parametrize("cache_control", ["public", "s-maxage=60", "must-revalidate, max-age=60"])
async def test_responses_to_authenticated_requests_are_stored_when_they_allow_it(cache_control):
    plugin, app = cache(), App([("Cache-Control", cache_control)])
    await fetch(plugin, app, authorization="Bearer alice")
    hit, _ = await fetch(plugin, app, authorization="Bearer bob")
    assert hit.headers["X-Cache"] == "HIT" and app.calls == 1


async def test_set_cookie_responses_are_not_stored_by_default():
    plugin, app = cache(), App([("Set-Cookie", "session=alice")])
    await fetch(plugin, app)
    second, _ = await fetch(plugin, app)
    assert second.headers["X-Cache"] == "MISS" and app.calls == 2


async def test_stored_set_cookie_responses_never_hand_the_cookie_to_others():
    plugin, app = cache(store_set_cookie=True), App([("Set-Cookie", "session=alice")])
    first, _ = await fetch(plugin, app)
    second, _ = await fetch(plugin, app)
    assert first.headers["Set-Cookie"] == "session=alice"
    assert second.headers["X-Cache"] == "HIT" and "Set-Cookie" not in second.headers


@pytest.mark.parametrize("status, headers, stored", [
    (200, [], True), (404, [], True), (301, [], True), (204, [], True),
    (500, [("Cache-Control", "max-age=60")], False),
    (503, [], False), (201, [("Cache-Control", "max-age=60")], False),
    (302, [], False), (302, [("Cache-Control", "max-age=60")], True),
])
async def test_only_cacheable_statuses_are_stored(status, headers, stored):
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
    plugin, app = cache(), App([("Vary", "Accept-Language")])
    await fetch(plugin, app, accept_language="en")
    await fetch(plugin, app, accept_language="fr")
    en, en_body = await fetch(plugin, app, accept_language="en")
    fr, fr_body = await fetch(plugin, app, accept_language="fr")
    assert (en_body, fr_body) == (b"v1", b"v2")
    assert en.headers["X-Cache"] == fr.headers["X-Cache"] == "HIT"


async def test_vary_star_is_not_stored():
    plugin, app = cache(), App([("Vary", "*")])
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
        return Response(200, b"x" * 900)

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
    plugin, app = cache(ttl=60), App()
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
    relaxed = App([("ETag", '"r"')])
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
            return Response(304, b"", {"ETag": '"1"', "Cache-Control": "no-cache"})
        return Response(200, b"body", {"ETag": '"1"', "Cache-Control": "no-cache"})

    await fetch(plugin, app)
    request = get()
    response = await run_plugin(plugin, request, upstream=app)
    assert seen == [None, '"1"']
    assert response.status == 200 and await response.read() == b"body"
    assert response.headers["X-Cache"] == "HIT"
    # The validator was the cache's own question, not the client's.
    assert "If-None-Match" not in request.headers


async def test_stale_copy_with_validator_is_replaced_when_the_app_sends_a_new_one():
    plugin = cache(ttl=10)
    app = App([("ETag", '"1"')])
    await fetch(plugin, app)
    plugin.clock.now += 11
    response, body = await fetch(plugin, app)
    assert app.sent[1]["If-None-Match"] == '"1"'
    assert response.headers["X-Cache"] == "MISS" and body == b"v2"
    assert (await fetch(plugin, app))[1] == b"v2"


async def test_a_hit_answers_if_none_match_with_304():
    plugin, app = cache(), App([("ETag", 'W/"abc"')])
    await fetch(plugin, app)
    response, body = await fetch(plugin, app, if_none_match='"zzz", "abc"')
    assert response.status == 304 and body == b"" and response.headers["ETag"] == 'W/"abc"'
    other, other_body = await fetch(plugin, app, if_none_match='"zzz"')
    assert other.status == 200 and other_body == b"v1"


# -- coalescing --------------------------------------------------------------------


class SlowApp(App):
    """Holds every call until ``release`` is set."""

    def __init__(self, headers=(), status=200) -> None:
        super().__init__(headers, status)
        self.release = asyncio.Event()

    async def __call__(self, request):
        self.requests.append(request)
        number = self.calls
        await self.release.wait()
        return Response(self.status, f"v{number}".encode(), list(self.headers))


async def _many(plugin, app, count=10):
    tasks = [asyncio.create_task(fetch(plugin, app)) for _ in range(count)]
    await asyncio.sleep(0.01)  # let every request reach the cache
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
    await asyncio.sleep(0.01)
    others = [asyncio.create_task(fetch(plugin, app)) for _ in range(3)]
    await asyncio.sleep(0.01)
    release.set()
    with pytest.raises(UpstreamError):
        await first
    assert [body for _, body in await asyncio.gather(*others)] == [b"ok"] * 3


# -- stale-while-revalidate --------------------------------------------------------


async def test_stale_while_revalidate_serves_stale_and_refreshes_once_in_background():
    plugin, app = cache(ttl=10, stale_while_revalidate=30), SlowApp()
    app.release.set()
    async with started(plugin):
        await fetch(plugin, app)
        plugin.clock.now += 15
        app.release.clear()  # hold the background refresh
        stale = [await fetch(plugin, app) for _ in range(5)]
        assert all(r.headers["X-Cache"] == "HIT" and body == b"v1" for r, body in stale)
        assert stale[0][0].headers["Age"] == "15"
        await asyncio.sleep(0.01)
        assert app.calls == 2  # one refresh for five stale hits
        app.release.set()
        await asyncio.sleep(0.01)
        fresh, body = await fetch(plugin, app)
    assert fresh.headers["X-Cache"] == "HIT" and fresh.headers["Age"] == "0" and body == b"v2"


async def test_stale_while_revalidate_window_ends():
    plugin, app = cache(ttl=10, stale_while_revalidate=30), App()
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
    plugin, cancelled = cache(ttl=10, stale_while_revalidate=30), asyncio.Event()

    async def app(request):
        if request.headers.get("X-Refresh"):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return Response(200, b"ok")

    async with asyncio.timeout(5):  # a stop() that waits for the refresh would hang here
        async with started(plugin):
            await fetch(plugin, app)
            plugin.clock.now += 15
            await fetch(plugin, app, x_refresh="1")
            await asyncio.sleep(0.01)
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
        return Response(200, chunks.__aiter__())

    response = await run_plugin(plugin, get(), upstream=app)
    assert chunks.pulled <= 3  # the cache stopped reading just past max_body
    body = await response.read()
    assert body == b"".join(bytes([65 + n]) * 50 for n in range(10))
    assert response.headers["X-Cache"] == "MISS"
    assert (await fetch(plugin, app))[0].headers["X-Cache"] == "MISS"


async def test_a_declared_length_over_max_body_is_not_even_read():
    plugin, chunks = cache(max_body=100), Chunks(4, 50)

    async def app(request):
        return Response(200, chunks.__aiter__(), {"Content-Length": "200"})

    response = await run_plugin(plugin, get(), upstream=app)
    assert chunks.pulled == 0
    assert len(await response.read()) == 200


async def test_a_small_stream_is_stored():
    plugin = cache(max_body=100)

    async def app(request):
        return Response(200, stream([b"ab", b"cd"]))

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
    from mesh.testing import run_chain

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
