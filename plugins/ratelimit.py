"""``ratelimit``: answer 429 to callers over their budget (the ``limits`` library's strategies).

Options:

- ``limit`` (required): a rate like ``"10/second"``, or a list of rates
  (``["10/second", "500/hour"]``) that must all hold.
- ``key`` (default ``"ip"``): what a budget belongs to. One part, or a list
  of parts that together name a budget (``["claim:sub", "path"]``: one
  budget per user and path). Parts:

  - ``ip``: the client's address, as the sidecar's socket saw it
    (``X-Forwarded-For`` is not trusted; use ``header:X-Forwarded-For``
    only behind a proxy you control);
  - ``peer``: the calling mesh service (``request.peer``);
  - ``header:NAME``: a request header's (first) value;
  - ``claim:NAME``: a claim of the token the ``jwt`` plugin verified
    (put ``jwt`` before ``ratelimit``);
  - ``path``: the request path.

  A request without the part (no such header, no token, not from a mesh
  service) counts against one shared budget for "missing": leaving a
  header out never escapes the limit.
- ``strategy`` (default ``"sliding-window"``): ``"sliding-window"`` (cheap,
  close to exact), ``"moving-window"`` (exact, keeps one timestamp per
  request) or ``"fixed-window"`` (cheapest, but lets up to twice the limit
  through around a window's edge).
- ``storage`` (default ``"memory"``): ``"memory"`` keeps budgets in this
  sidecar (`mesh_plugins.ratelimit_windows`: the strategies' arithmetic,
  counted in one synchronous step per request); a Redis URL
  (``redis://host:6379/0``, ``rediss://...``, ``redis+unix:///path``) shares
  them between every replica of the service (through ``limits`` and
  redis-py, the ``redis`` package). Budgets are per service: two services
  never share one.
- ``batch`` (default 1, Redis only): with 1, every request is counted in
  Redis as it comes (two round trips). With N > 1, a sidecar claims up to N
  hits of a budget at a time and spends them without asking Redis again
  (`mesh_plugins.ratelimit_claims`); claims start at one hit and grow only
  while a budget's traffic spends them within a second. The price, with S
  sidecars sharing a budget: in any window at most S × (N - 1) requests
  over the limit (hits claimed before the window moved on), and at most
  S × (N - 1) refused that exact counting would let through (hits claimed
  by a sidecar and not spent). A request served from a claim doesn't need
  Redis, so ``on_storage_error`` applies only to requests that claim.
- ``on_storage_error`` (default ``"allow"``): when Redis fails or is slower
  than ``storage_timeout``, ``"allow"`` lets requests through and
  ``"deny"`` answers ``503`` with ``Retry-After: 1``. The failure is logged
  once, and its recovery once; while it lasts, Redis is tried again once a
  second and other requests don't wait for it.
- ``storage_timeout`` (duration, default ``"500ms"``): the most a request's
  Redis commands may take before the storage counts as failed. Requests
  queue for one of 16 connections first; that wait isn't counted.

Every answer carries ``RateLimit-Limit``, ``RateLimit-Remaining`` and
``RateLimit-Reset`` (seconds), for the limit closest to running out (none
while the storage is failing; with a ``batch``, as Redis said at the last
claim, less what was spent of it since). Over
the limit the answer is ``429`` with ``Retry-After`` (seconds), and the
request goes no further. Limits are checked shortest window first, and a
request refused by one limit doesn't use up the ones after it. A rate
given twice is one limit.

Metrics (on the sidecar's ``/metrics``): ``mesh_ratelimit_decisions_total``
by ``result`` (``allowed`` or ``limited``), for the requests the storage
counted, and ``mesh_ratelimit_storage_errors_total``, the requests it
couldn't count (it failed, was slower than ``storage_timeout``, or is down
and not retried yet), which got what ``on_storage_error`` says.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.errors import ConfigurationError, StorageError
from limits.storage import storage_from_string
from limits.util import WindowStats

from mesh import CallNext, Context, Duration, Plugin, Rate, Request, Response
from mesh_plugins.ratelimit_claims import Claims
from mesh_plugins.ratelimit_windows import Windows

__all__ = ["RateLimit"]

_STRATEGIES: dict[str, type[RateLimiter]] = {
    "sliding-window": SlidingWindowCounterRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}
_REDIS_SCHEMES = ("redis://", "rediss://", "redis+unix://")
# Redis connections per sidecar. Requests beyond it wait their turn instead
# of failing with "too many connections" (more connections don't go faster:
# the client's CPU is the bottleneck).
_CONNECTIONS = 16
_RETRY_INTERVAL = 1.0   # while storage is failing, how often one request tries it
_MAX_VALUE = 64         # longer key values are hashed to keep storage keys short
# The clock of storage retries, read through this name so that tests can move it.
_monotonic = time.monotonic

Getter = Callable[[Request], Any]
_T = TypeVar("_T")


def _part(spec: str) -> tuple[str, Getter]:
    """``(name, getter)`` for one part of ``key``; ValueError names what's wrong."""
    kind, _, arg = spec.partition(":")
    if kind in ("ip", "peer", "path") and not arg:
        return kind, {"ip": lambda r: r.client, "peer": lambda r: r.peer,
                      "path": lambda r: r.path}[kind]
    if kind == "header" and arg:
        return f"header:{arg.lower()}", lambda r: r.headers.get(arg)
    if kind == "claim" and arg:
        return f"claim:{arg}", lambda r: (r.state.get("claims") or {}).get(arg)
    hint = " (to combine parts, give a list: key = [\"ip\", \"path\"])" if "+" in spec else ""
    raise ValueError(f"key: unknown part {spec!r}; expected ip, peer, path, "
                     f"header:NAME or claim:NAME{hint}")


def _encode(value: Any) -> str:
    """One key value as a storage-safe string: distinct values stay distinct."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(text) > _MAX_VALUE:
        return "#" + hashlib.sha256(text.encode()).hexdigest()  # '#' never survives quote()
    return urllib.parse.quote(text, safe="")


def _local(value: Any) -> str:
    """One key value as part of an in-memory budget's key: distinct values stay distinct.

    Like `_encode`, a missing value and an empty one share a budget.
    """
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(text) > _MAX_VALUE:
        return "#" + hashlib.sha256(text.encode()).hexdigest()  # longer than any value kept as is
    return text


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


class _Unavailable(Exception):
    """The storage can't answer now; ``on_storage_error`` decides."""


class RateLimit(Plugin):
    """Counts requests per key in a shared budget; see the module docstring for options."""

    def __init__(
        self,
        limit: Rate | list[Rate],
        key: str | list[str] = "ip",
        strategy: Literal["sliding-window", "moving-window", "fixed-window"] = "sliding-window",
        storage: str = "memory",
        on_storage_error: Literal["allow", "deny"] = "allow",
        storage_timeout: Duration = Duration(0.5),
        batch: int = 1,
    ) -> None:
        rates = [Rate.parse(r) if isinstance(r, str) else r
                 for r in (limit if isinstance(limit, list) else [limit])]
        if not rates:
            raise ValueError("limit: give at least one rate, like '10/second'")
        for rate in rates:
            if rate.seconds < 1 or not float(rate.seconds).is_integer():
                raise ValueError(f"limit: {rate.text!r} needs a whole number of seconds")
        parts = key if isinstance(key, list) else [key]
        if not parts:
            raise ValueError("key: give at least one part, like 'ip'")
        if strategy not in _STRATEGIES:
            raise ValueError(f"strategy: expected one of {', '.join(_STRATEGIES)}, got {strategy!r}")
        if storage != "memory" and not storage.startswith(_REDIS_SCHEMES):
            raise ValueError(f"storage: expected 'memory' or a redis:// URL, got {storage!r}")
        if on_storage_error not in ("allow", "deny"):
            raise ValueError(f"on_storage_error: expected 'allow' or 'deny', got {on_storage_error!r}")
        if float(storage_timeout) <= 0:
            raise ValueError("storage_timeout must be more than 0")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch: expected a whole number of hits, 1 or more, got {batch!r}")
        if batch > 1 and storage == "memory":
            raise ValueError("batch: only for a Redis storage (in memory every hit is counted at once)")

        # Shortest window first: a request it refuses never reaches (and
        # uses up) the longer ones. A rate given twice is one budget.
        self.rates = sorted(dict.fromkeys(rates), key=lambda r: (r.seconds, r.amount))
        self._items: list[RateLimitItem] = [
            RateLimitItemPerSecond(r.amount, int(r.seconds)) for r in self.rates]
        self._parts = [_part(p) for p in parts]
        self.strategy = strategy
        self.storage = storage
        self.on_storage_error = on_storage_error
        self.storage_timeout = float(storage_timeout)
        self.batch = batch

        self._log = logging.getLogger("mesh.plugin.ratelimit")
        self._define_metrics(Context())  # until start() gives the sidecar's
        self._scope = ""
        self._windows: Windows | None = None           # memory only
        self._claims: Claims | None = None             # Redis with batch > 1
        self._storage: Storage | None = None
        self._limiter: RateLimiter | None = None
        self._slots: asyncio.Semaphore | None = None   # Redis only
        self._errors: tuple[type[BaseException], ...] = ()
        self._down = False
        self._retry_at = 0.0

    async def start(self, ctx: Context) -> None:
        """Open the storage. A Redis that is down is logged, not fatal."""
        self._log = ctx.logger
        self._define_metrics(ctx)
        self._scope = ctx.service
        if self.storage == "memory":
            self._windows = Windows(self.strategy, [(r.amount, int(r.seconds)) for r in self.rates])
        else:
            timeout = self.storage_timeout
            options: dict[str, Any] = {
                # redis-py, not coredis: coredis pipelines commands on a
                # connection, drops the connection on any error (a
                # NOSCRIPT) and retries the others, so a hit can count twice.
                "implementation": "redispy",
                # No retries either: a retried hit may have counted already.
                "retry": None,
                # Without these a frozen Redis holds every request forever.
                "socket_timeout": timeout, "socket_connect_timeout": timeout,
                "max_connections": _CONNECTIONS}
            try:
                storage = storage_from_string("async+" + self.storage, wrap_exceptions=True, **options)
            except ConfigurationError as exc:
                raise ValueError(f"storage: {exc} (Redis storage needs the 'redis' "
                                 "package: pip install redis)") from exc
            assert isinstance(storage, Storage)  # an async+ URI gives limits' asyncio storage
            self._storage = storage
            base = storage.base_exceptions
            # limits wraps some storage errors but not all (acquire_* aren't).
            self._errors = (StorageError, OSError, TimeoutError,
                            *(base if isinstance(base, tuple) else (base,)))
            self._slots = asyncio.Semaphore(_CONNECTIONS)
            try:
                async with asyncio.timeout(timeout):
                    healthy = await storage.check()
            except self._errors as exc:
                self._failed(exc)
            else:
                if not healthy:
                    self._failed(ConnectionError("no answer to PING"))
            self._limiter = _STRATEGIES[self.strategy](storage)
            if self.batch > 1:
                self._claims = Claims([int(r.seconds) for r in self.rates], self.batch)

    def _define_metrics(self, ctx: Context) -> None:
        decisions = ctx.metrics.counter("decisions", "requests counted, by result", ["result"])
        self._allowed, self._limited = decisions.labels(result="allowed"), decisions.labels(result="limited")
        self._storage_errors = ctx.metrics.counter(
            "storage_errors", "requests the rate-limit storage could not count")
        for series in (self._allowed, self._limited, self._storage_errors):
            series.inc(0)  # every series from the start: a rate of 0, not a missing one

    async def stop(self) -> None:
        # limits has no close(): reach the redis-py client behind it.
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        close = getattr(client, "aclose", None)
        if close is not None:
            await close()

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        windows = self._windows
        if windows is not None:
            parts = self._parts
            key: Any = (_local(parts[0][1](request)) if len(parts) == 1
                        else tuple(_local(get(request)) for _, get in parts))
            now = time.time()
            which, remaining, reset_at, allowed = windows.hit(key, now)
            reset = max(0, math.ceil(reset_at - now))
        else:
            try:
                which, remaining, reset, allowed = await self._shared(request)
            except _Unavailable:
                self._storage_errors.inc()
                if self.on_storage_error == "deny":
                    return Response(503, "503 Service Unavailable: rate limit storage unavailable\n",
                                    {"Retry-After": "1"})
                return await call_next(request)
        headers = {"RateLimit-Limit": str(self.rates[which].amount),
                   "RateLimit-Remaining": str(remaining),
                   "RateLimit-Reset": str(reset)}
        if not allowed:
            self._limited.inc()
            headers["Retry-After"] = str(max(1, reset))
            return Response(429, f"429 Too Many Requests: over {self.rates[which].text}\n", headers)
        self._allowed.inc()
        response = await call_next(request)
        response.headers.update(headers)
        return response

    async def _shared(self, request: Request) -> tuple[int, int, int, bool]:
        """Count the request in Redis: ``(which, remaining, reset in seconds, allowed)``."""
        ids = [self._scope, *(f"{name}={_encode(get(request))}" for name, get in self._parts)]
        if self._claims is not None:
            now = time.time()
            which, remaining, reset_at, allowed = await self._claims.spend(
                tuple(ids), now, lambda which, size: self._check(lambda: self._take(which, ids, size)))
            return which, remaining, max(0, math.ceil(reset_at - now)), allowed
        item, stats, allowed = await self._check(lambda: self._count(ids))
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        return self._items.index(item), max(0, stats.remaining), reset, allowed

    async def _check(self, count: Callable[[], Awaitable[_T]]) -> _T:
        """Ask Redis (``count``); raise `_Unavailable` if it can't say."""
        assert self._slots is not None, "ratelimit plugin used before start()"
        # Waiting for a connection is not the storage's fault, so it isn't
        # timed; it is short anyway, because when the storage hangs the
        # requests ahead time out, mark it down, and the queue drains at once.
        async with self._slots:
            now = _monotonic()
            if self._down:
                if now < self._retry_at:
                    raise _Unavailable
                self._retry_at = now + _RETRY_INTERVAL  # this request probes; others fail fast
            try:
                async with asyncio.timeout(self.storage_timeout):
                    verdict = await count()
            except self._errors as exc:
                self._failed(exc)
                raise _Unavailable from None
        if self._down:
            self._down = False
            self._log.warning("rate-limit storage %s recovered", _redacted(self.storage))
        return verdict

    async def _count(self, ids: list[str]) -> tuple[RateLimitItem, WindowStats, bool]:
        """Hit each limit in order, stopping at the first one over; return the binding one."""
        assert self._limiter is not None, "ratelimit plugin used before start()"
        for item in self._items:
            if not await self._limiter.hit(item, *ids):
                return item, await self._limiter.get_window_stats(item, *ids), False
        windows = [(item, await self._limiter.get_window_stats(item, *ids)) for item in self._items]
        item, stats = min(windows, key=lambda pair: pair[1].remaining)
        return item, stats, True

    async def _take(self, which: int, ids: list[str], size: int) -> tuple[int, int, float]:
        """Claim up to ``size`` hits of rate ``which`` (see `Claims`): (granted, remaining, reset)."""
        assert self._limiter is not None, "ratelimit plugin used before start()"
        item = self._items[which]
        if size > 1 and self.strategy == "fixed-window" and not await self._limiter.test(item, *ids, cost=size):
            size = 1  # a fixed window counts the hits it refuses: ask before claiming more than one
        granted = size if await self._limiter.hit(item, *ids, cost=size) else 0
        if not granted and size > 1 and await self._limiter.hit(item, *ids):
            granted = 1  # near the limit: what is left, one hit at a time
        stats = await self._limiter.get_window_stats(item, *ids)
        return granted, max(0, stats.remaining), stats.reset_time

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = _monotonic() + _RETRY_INTERVAL
        if not self._down:
            self._down = True
            what = "letting requests through" if self.on_storage_error == "allow" \
                else "refusing requests (503)"
            detail = str(exc) or f"no answer within {self.storage_timeout:g}s"
            self._log.error("rate-limit storage %s failed (%s: %s); %s until it recovers",
                            _redacted(self.storage), type(exc).__name__, detail, what)
