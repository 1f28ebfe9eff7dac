"""The ``ratelimit`` plugin: budgets, headers, keys, strategies, Redis and its failures.

Counting must not depend on how fast the machine is. In memory, tests stop
wall time (`clock`) and move it by hand, so no window ends mid-test. Redis
budgets use windows of an hour (Redis counts a sliding window from the
first hit, so an hour is an hour of headroom), and the retry clock of a
failing storage is moved by hand (`retry_clock`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import pytest
from aiohttp import ClientSession, web
from prometheus_client.parser import text_string_to_metric_families

import mesh_plugins.ratelimit as ratelimit_plugin
from mesh import Context, Request, Response
from mesh.testing import make_request, run_mesh, run_plugin, started
from mesh_plugins.ratelimit import RateLimit

# A whole number of days since the epoch, so of minutes and seconds too:
# every window of these tests starts here.
T0 = 1_800_000_000.0 - 1_800_000_000.0 % 86400


class Upstream:
    """An app that counts what reaches it."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, request: Request) -> Response:
        self.calls += 1
        return Response(200, b"ok")


def ctx() -> Context:
    # A fresh service name per test keeps budgets apart in the shared Redis.
    return Context(service=f"svc-{uuid.uuid4().hex[:8]}")


async def send(plugin: RateLimit, upstream: Upstream | None = None, **request) -> Response:
    return await run_plugin(plugin, make_request(**request), upstream or Upstream())


async def burst(plugin: RateLimit, n: int, upstream: Upstream | None = None) -> list[int]:
    responses = await asyncio.gather(*(send(plugin, upstream) for _ in range(n)))
    return [r.status for r in responses]


class Clock:
    """A clock moved by hand: ``now`` is seconds since the epoch."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def set(self, now: float) -> None:
        self.now = now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Wall time, stopped 10 s into a minute: the limits library and the plugin read it.

    Only ``time.time`` stops: the event loop runs on ``time.monotonic``.
    """
    wall = Clock(T0 + 10)
    monkeypatch.setattr(time, "time", wall)
    return wall


@pytest.fixture
def retry_clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The clock that decides when a failed storage is tried again."""
    retry = Clock(1000.0)
    monkeypatch.setattr(ratelimit_plugin, "_monotonic", retry)
    return retry


def errors_logged(caplog: pytest.LogCaptureFixture, level: int = logging.ERROR) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("mesh.plugin") and r.levelno == level]


# --- options -----------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"limit": "10/second", "key": "ip+path"}, "give a list"),
    ({"limit": "10/second", "key": "cookie:session"}, "unknown part 'cookie:session'"),
    ({"limit": "10/second", "key": "header:"}, "unknown part 'header:'"),
    ({"limit": "10/second", "storage": "memcached://127.0.0.1"}, "redis:// URL"),
    ({"limit": "10/second", "strategy": "token-bucket"}, "strategy"),
    ({"limit": "10/second", "on_storage_error": "maybe"}, "on_storage_error"),
    ({"limit": []}, "at least one rate"),
    ({"limit": "10/second", "key": []}, "at least one part"),
    ({"limit": "10/second", "storage": "redis://127.0.0.1:1/0", "batch": 0}, "batch"),
    ({"limit": "10/second", "batch": 10}, "only for a Redis storage"),
])
def test_bad_options_are_refused_with_a_reason(options, message):
    with pytest.raises(ValueError, match=message):
        RateLimit(**options)


# --- budgets and headers -----------------------------------------------------

async def test_under_the_limit_the_response_carries_the_budget(clock):
    plugin = RateLimit(limit="3/minute")
    async with started(plugin, ctx=ctx()):
        remaining = []
        for _ in range(3):
            response = await send(plugin)
            assert response.status == 200
            assert response.headers["RateLimit-Limit"] == "3"
            assert 0 <= int(response.headers["RateLimit-Reset"]) <= 60
            remaining.append(response.headers["RateLimit-Remaining"])
        assert remaining == ["2", "1", "0"]


async def test_over_the_limit_is_429_with_retry_after_and_never_reaches_the_app(clock):
    plugin = RateLimit(limit="2/minute")
    upstream = Upstream()
    async with started(plugin, ctx=ctx()):
        assert [(await send(plugin, upstream)).status for _ in range(2)] == [200, 200]
        response = await send(plugin, upstream)
    assert response.status == 429
    assert upstream.calls == 2
    assert response.headers["RateLimit-Limit"] == "2"
    assert response.headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert int(response.headers["RateLimit-Reset"]) <= 60
    assert b"2/minute" in response.body


async def test_budgets_are_per_client_ip_by_default(clock):
    plugin = RateLimit(limit="1/minute")
    async with started(plugin, ctx=ctx()):
        assert (await send(plugin, client="10.0.0.1")).status == 200
        assert (await send(plugin, client="10.0.0.1")).status == 429
        assert (await send(plugin, client="10.0.0.2")).status == 200


async def test_header_key_and_a_missing_header_does_not_escape_the_limit(clock):
    plugin = RateLimit(limit="1/minute", key="header:X-Api-Key")
    async with started(plugin, ctx=ctx()):
        assert (await send(plugin, headers={"x-api-key": "a"})).status == 200
        assert (await send(plugin, headers={"X-API-KEY": "a"})).status == 429
        assert (await send(plugin, headers={"X-Api-Key": "b"})).status == 200
        # Requests without the header share one budget.
        assert (await send(plugin)).status == 200
        assert (await send(plugin, client="10.9.9.9")).status == 429
        # An empty value is not a way around it either, nor a clash with "a".
        assert (await send(plugin, headers={"X-Api-Key": ""})).status == 429


async def test_claim_key_uses_the_claims_the_jwt_plugin_left(clock):
    plugin = RateLimit(limit="1/minute", key="claim:sub")
    async with started(plugin, ctx=ctx()):
        alice = {"claims": {"sub": "alice"}}
        assert (await send(plugin, state=dict(alice))).status == 200
        assert (await send(plugin, state=dict(alice), client="10.1.1.1")).status == 429
        assert (await send(plugin, state={"claims": {"sub": "bob"}})).status == 200


async def test_a_list_of_parts_names_one_budget_per_combination(clock):
    plugin = RateLimit(limit="1/minute", key=["peer", "path"])
    async with started(plugin, ctx=ctx()):
        assert (await send(plugin, peer="web", path="/a")).status == 200
        assert (await send(plugin, peer="web", path="/a")).status == 429
        assert (await send(plugin, peer="web", path="/b")).status == 200
        assert (await send(plugin, peer="api", path="/a")).status == 200


async def test_values_cannot_be_spliced_into_another_budget(clock):
    # Parts are joined with "/" in the storage key: a value holding "/" and
    # the next part's name must not land in someone else's budget.
    plugin = RateLimit(limit="1/minute", key=["header:x-a", "header:x-b"])
    async with started(plugin, ctx=ctx()):
        assert (await send(plugin, headers={"x-a": "a/header:x-b=b", "x-b": "c"})).status == 200
        assert (await send(plugin, headers={"x-a": "a", "x-b": "b/header:x-b=c"})).status == 200


async def test_a_refusal_by_the_short_limit_does_not_use_up_the_long_one(clock):
    plugin = RateLimit(limit=["6/minute", "5/second"], strategy="moving-window")
    upstream = Upstream()
    async with started(plugin, ctx=ctx()):
        statuses = [(await send(plugin, upstream)).status for _ in range(8)]
        assert statuses == [200] * 5 + [429] * 3
        refused = await send(plugin, upstream)
        assert refused.headers["RateLimit-Limit"] == "5"  # the per-second limit said no
        clock.advance(1.1)  # the per-second budget is back
        # 5 of 6 per minute are used: one more goes through, then the minute says no.
        assert (await send(plugin, upstream)).status == 200
        refused = await send(plugin, upstream)
    assert refused.status == 429
    assert refused.headers["RateLimit-Limit"] == "6"
    assert upstream.calls == 6


async def test_the_headers_describe_the_limit_closest_to_running_out(clock):
    plugin = RateLimit(limit=["100/second", "3/minute"])
    async with started(plugin, ctx=ctx()):
        response = await send(plugin)
    assert response.headers["RateLimit-Limit"] == "3"
    assert response.headers["RateLimit-Remaining"] == "2"


# --- strategies and concurrency ----------------------------------------------

@pytest.mark.parametrize("strategy", ["sliding-window", "moving-window", "fixed-window"])
async def test_200_concurrent_requests_let_exactly_50_through_in_memory(strategy, clock):
    plugin = RateLimit(limit="50/minute", strategy=strategy)
    upstream = Upstream()
    async with started(plugin, ctx=ctx()):
        statuses = await burst(plugin, 200, upstream)
    assert statuses.count(200) == 50
    assert statuses.count(429) == 150
    assert upstream.calls == 50


@pytest.mark.parametrize("strategy, second_burst", [
    (None, range(0, 3)),              # the default: the first burst still weighs in
    ("fixed-window", range(10, 11)),  # what the default avoids: the budget resets at once
])
async def test_default_strategy_does_not_double_the_limit_at_a_window_edge(
        strategy, second_burst, clock):
    options = {"strategy": strategy} if strategy else {}
    plugin = RateLimit(limit="10/second", **options)
    async with started(plugin, ctx=ctx()):
        clock.set(T0 + 0.05)
        first = await burst(plugin, 1)     # a fixed window starts here...
        clock.set(T0 + 0.95)
        first += await burst(plugin, 9)
        clock.set(T0 + 1.10)               # ...and has just ended: 0.15 s after the 9
        second = await burst(plugin, 10)
    assert first.count(200) == 10
    assert second.count(200) in second_burst


# --- Redis ---------------------------------------------------------------------

@pytest.mark.redis
@pytest.mark.parametrize("strategy", ["sliding-window", "moving-window"])
async def test_200_concurrent_requests_let_exactly_50_through_with_redis(redis_server, strategy):
    # 200 at once is more than the Redis connection pool: they must queue, not fail.
    plugin = RateLimit(limit="50/hour", storage=redis_server.url, strategy=strategy,
                       on_storage_error="deny", storage_timeout=30)
    upstream = Upstream()
    async with started(plugin, ctx=ctx()):
        statuses = await burst(plugin, 200, upstream)
    assert statuses.count(200) == 50
    assert statuses.count(429) == 150
    assert upstream.calls == 50


@pytest.mark.redis
async def test_replicas_of_a_service_share_one_budget_in_redis(redis_server):
    service = ctx()
    replicas = [RateLimit(limit="4/hour", storage=redis_server.url, storage_timeout=30)
                for _ in range(2)]
    other = RateLimit(limit="4/hour", storage=redis_server.url, storage_timeout=30)
    async with started(replicas[0], ctx=service), started(replicas[1], ctx=service), \
            started(other, ctx=ctx()):
        statuses = [(await send(replicas[i % 2])).status for i in range(6)]
        assert statuses == [200] * 4 + [429] * 2
        # Another service with the same key has a budget of its own.
        assert (await send(other)).status == 200


@pytest.mark.redis
@pytest.mark.parametrize("strategy", ["sliding-window", "moving-window", "fixed-window"])
async def test_with_a_batch_hits_are_claimed_a_few_at_a_time_and_exactly_50_get_through(
        redis_server, strategy, clock):
    plugin = RateLimit(limit="50/hour", storage=redis_server.url, strategy=strategy, batch=10,
                       on_storage_error="deny", storage_timeout=30)
    claims: list[tuple[int, int]] = []
    take = plugin._take

    async def counted(which, ids, size):
        granted, remaining, reset = await take(which, ids, size)
        claims.append((size, granted))
        return granted, remaining, reset

    plugin._take = counted  # type: ignore[method-assign]
    upstream = Upstream()
    async with started(plugin, ctx=ctx()):
        remaining = [(await send(plugin, upstream)).headers["RateLimit-Remaining"] for _ in range(5)]
        statuses = await burst(plugin, 200, upstream)
    assert remaining == ["49", "48", "47", "46", "45"]  # counting down through the claims
    assert statuses.count(200) == 45 and upstream.calls == 50
    granting = [granted for _, granted in claims if granted]
    assert sum(granting) == 50
    assert len(granting) <= 16  # not one round trip per request: claims of up to 10 hits


@pytest.mark.redis
async def test_with_a_batch_replicas_share_one_budget_and_stay_within_it(redis_server, clock):
    service = ctx()
    replicas = [RateLimit(limit="20/hour", storage=redis_server.url, batch=5, storage_timeout=30)
                for _ in range(2)]
    async with started(replicas[0], ctx=service), started(replicas[1], ctx=service):
        statuses = [(await send(replicas[i % 2])).status for i in range(40)]
    # Within one window nothing goes over; what the other replica holds
    # unspent (4 hits at most) may be refused here.
    assert 20 - 2 * (5 - 1) <= statuses.count(200) <= 20


@pytest.mark.redis
async def test_frozen_redis_with_allow_lets_requests_through_and_logs_once(
        private_redis, caplog, retry_clock, monkeypatch):
    caplog.set_level(logging.INFO, logger="mesh.plugin")
    # Long enough for one round trip to a local Redis however loaded the machine.
    timeout = 3.0
    plugin = RateLimit(limit="5/hour", storage=private_redis.url, storage_timeout=timeout)
    upstream = Upstream()
    async with started(plugin, ctx=ctx()):
        assert (await send(plugin, upstream)).headers["RateLimit-Remaining"] == "4"
        tries = 0
        count = plugin._count

        async def counting(ids):
            nonlocal tries
            tries += 1
            return await count(ids)

        monkeypatch.setattr(plugin, "_count", counting)
        private_redis.freeze()
        began = time.monotonic()
        first = await send(plugin, upstream)  # waits for storage_timeout, once
        waited = time.monotonic() - began
        assert first.status == 200 and tries == 1
        assert "RateLimit-Limit" not in first.headers  # no budget to report
        assert timeout * 0.9 < waited < timeout + 30  # waited for the timeout, not forever
        # The storage is known down and no retry is due (its clock stands
        # still): these don't try it, so none of them waits for it.
        rest = await burst(plugin, 50, upstream)
        assert rest == [200] * 50 and tries == 1
        assert upstream.calls == 52
        assert len(errors_logged(caplog)) == 1

        private_redis.thaw()
        retry_clock.advance(1.0)  # the next try at the storage is due
        statuses = [(await send(plugin, upstream)).status for _ in range(6)]
    # Counting resumes where it stopped: 1 counted before the freeze, and the
    # command in flight when it froze may land when it thaws.
    assert statuses in ([200] * 4 + [429] * 2, [200] * 3 + [429] * 3)
    assert tries == 7
    assert len(errors_logged(caplog)) == 1
    assert len([m for m in errors_logged(caplog, logging.WARNING) if "recovered" in m]) == 1


@pytest.mark.redis
async def test_frozen_redis_with_deny_refuses_with_503(private_redis, caplog):
    plugin = RateLimit(limit="5/minute", storage=private_redis.url, storage_timeout=0.2,
                       on_storage_error="deny")
    upstream = Upstream()
    async with started(plugin, ctx=ctx()):
        private_redis.freeze()
        statuses = await burst(plugin, 20, upstream)
        response = await send(plugin, upstream)
    assert statuses == [503] * 20
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert upstream.calls == 0
    assert len(errors_logged(caplog)) == 1


@pytest.mark.redis
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("policy, status", [("allow", 200), ("deny", 503)])
async def test_stopped_redis_follows_on_storage_error(private_redis, caplog, policy, status, batch):
    # With a batch, the first request claims one hit and spends it: every
    # request after it needs a claim, which the stopped Redis can't give.
    plugin = RateLimit(limit="5/hour", storage=private_redis.url, on_storage_error=policy,
                       storage_timeout=30, batch=batch)
    upstream = Upstream()
    async with started(plugin, ctx=ctx()):
        assert (await send(plugin, upstream)).status == 200
        private_redis.stop()
        statuses = [(await send(plugin, upstream)).status for _ in range(10)]
    assert statuses == [status] * 10
    assert upstream.calls == (11 if policy == "allow" else 1)
    assert len(errors_logged(caplog)) == 1


@pytest.mark.redis
async def test_unreachable_redis_at_start_is_logged_not_fatal_and_hides_the_password(
        private_redis, caplog):
    port = private_redis.port
    private_redis.stop()
    plugin = RateLimit(limit="5/minute", storage=f"redis://:hunter2@127.0.0.1:{port}/0",
                       on_storage_error="deny")
    async with started(plugin, ctx=ctx()):
        assert (await send(plugin)).status == 503
    logged = errors_logged(caplog)
    assert len(logged) == 1
    assert "hunter2" not in logged[0] and ":***@" in logged[0]


# --- metrics ---------------------------------------------------------------------

METERED = """
[mesh]
name = "rlm"
[services.api]
command = "x"
port = 1
plugins = [ { use = "ratelimit", limit = "3/hour" } ]
[services.shared]
command = "x"
port = 1
plugins = [ { use = "ratelimit", limit = "100/hour", storage = "%s", on_storage_error = "%s" } ]
"""


@pytest.mark.redis
@pytest.mark.parametrize("policy, status", [("allow", 200), ("deny", 503)])
async def test_decisions_and_storage_errors_are_counted_on_the_sidecars_metrics(
        aiohttp_server, private_redis, tmp_path, policy, status):
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", ok)
    port = (await aiohttp_server(app)).port
    toml = METERED % (private_redis.url, policy)
    async with run_mesh(toml, {"api": port, "shared": port}, tmp_path, tls=False) as mesh, \
            ClientSession() as session:

        async def statuses(service: str, n: int) -> list[int]:
            found = []
            for _ in range(n):
                async with session.get(mesh.url(service) + "/") as response:
                    found.append(response.status)
            return found

        async def counted(service: str) -> dict[tuple[str, str | None], float]:
            async with session.get(mesh.url(service, "admin") + "/metrics") as response:
                text = await response.text()
            return {(sample.name, sample.labels.get("result")): sample.value
                    for family in text_string_to_metric_families(text) for sample in family.samples
                    if sample.name.startswith("mesh_ratelimit_") and sample.labels["plugin"] == "ratelimit"}

        assert await statuses("api", 5) == [200] * 3 + [429] * 2
        assert await statuses("shared", 2) == [200] * 2
        private_redis.stop()
        assert await statuses("shared", 3) == [status] * 3
        api, shared = await counted("api"), await counted("shared")
    assert api == {("mesh_ratelimit_decisions_total", "allowed"): 3,
                   ("mesh_ratelimit_decisions_total", "limited"): 2,
                   ("mesh_ratelimit_storage_errors_total", None): 0}
    assert shared == {("mesh_ratelimit_decisions_total", "allowed"): 2,
                      ("mesh_ratelimit_decisions_total", "limited"): 0,
                      ("mesh_ratelimit_storage_errors_total", None): 3}
