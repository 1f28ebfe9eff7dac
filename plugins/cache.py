"""``cache``: a shared HTTP cache in front of the app, with RFC 9111 semantics.

Options:

- ``ttl`` (duration, default ``"60s"``): how long a response stays fresh when
  it may be cached but names no lifetime of its own (no ``max-age``,
  ``s-maxage`` or ``Expires``). ``"0s"`` caches only responses that name one.
- ``max_entries`` (integer, default 1000): most responses kept.
- ``max_bytes`` (integer, default 64 MiB): most bytes kept, bodies plus headers.
- ``max_body`` (integer, default 1 MiB): the largest body stored. A larger or
  longer streaming response passes through to the client unbuffered: the
  cache never holds more than ``max_body`` bytes of it.
- ``key_headers`` (list of strings): request headers whose values are added
  to the key, e.g. ``["X-Tenant"]``: one stored copy per value.
- ``stale_while_revalidate`` (duration, default ``"0s"``): for this long after
  a response goes stale it is still served (``X-Cache: HIT``) while one
  background request refreshes it. A response's own
  ``stale-while-revalidate=N`` overrides it; ``must-revalidate``,
  ``proxy-revalidate``, ``s-maxage`` and ``no-cache`` forbid it.
- ``store_set_cookie`` (boolean, default false): store responses that carry
  ``Set-Cookie``. The stored copy never keeps the cookie: only the client
  whose request went to the app gets it.

What is stored (what a shared cache may store, RFC 9111 §3):

- responses to ``GET`` and ``HEAD`` with status 200, 203, 204, 300, 301,
  308, 404, 405, 410, 414 or 501, and 302 or 307 when they name a lifetime
  (or say ``public``). Nothing else: no 206, no 5xx errors.
- never a response with ``Cache-Control: no-store`` or ``private``, with
  ``Vary: *``, or with a body over ``max_body``;
- a response with ``no-cache`` only when it has an ``ETag`` or
  ``Last-Modified``, and then it is revalidated before every use;
- a response to a request with ``Authorization`` only when it says
  ``public``, ``s-maxage`` or ``must-revalidate``: plain responses to
  authenticated requests are never stored.

Freshness is ``s-maxage``, else ``max-age``, else ``Expires`` minus ``Date``,
else ``ttl``; an ``Age`` from upstream counts against it. A stale entry with
an ``ETag`` or ``Last-Modified`` is kept and revalidated with a conditional
request: a 304 refreshes it and the stored body is served. A stale entry
without either is dropped once its stale-while-revalidate window is over.

The key is the method, ``Host``, path and query, the ``key_headers`` values,
and the request's values of the headers the response's ``Vary`` names.

Requests (RFC 9111 §5.2.1): ``Cache-Control: no-store`` (or a ``Range``,
``If-Match``, ``If-Unmodified-Since`` or ``If-Range`` header) bypasses the
cache; ``no-cache``, ``max-age=0`` or ``Pragma: no-cache`` skip the stored
copy and store the new one; ``max-age``, ``min-fresh`` and ``max-stale`` are
honoured; ``only-if-cached`` gets a 504 when nothing usable is stored. A hit
answers ``If-None-Match`` with a 304 when the stored ``ETag`` matches.

A successful ``POST``, ``PUT``, ``DELETE`` or ``PATCH`` (status below 400)
invalidates what is stored for its URL, and for its ``Location`` and
``Content-Location`` on the same host.

Concurrent misses for one key go to the app once: the others wait for that
response and are served from the cache; if it could not be stored they go to
the app themselves.

Headers: every response gets ``X-Cache: HIT`` (served from the cache, also
after a 304 revalidation or while stale-while-revalidate refreshes it) or
``X-Cache: MISS``; a hit carries ``Age`` in seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from cachetools import LRUCache, TLRUCache

from mesh import CallNext, Context, Duration, Plugin, Request, Response

# RFC 9110 §15.1: stored with a heuristic lifetime (our `ttl`) when none is given.
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
# Understood, but stored only when the response names a lifetime or says `public`.
EXPLICIT_STATUSES = frozenset({302, 307})
UNSAFE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
# Request headers the cache does not answer itself: such requests go straight through.
BYPASS_HEADERS = ("Range", "If-Match", "If-Unmodified-Since", "If-Range")
# Never part of a stored copy: per-connection, or ours to set on each hit.
NOT_STORED = frozenset({
    "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
    "trailer", "upgrade", "proxy-authenticate", "proxy-authorization", "age", "x-cache",
})
# What a 304 carries over from the stored 200 (RFC 9110 §15.4.5).
NOT_MODIFIED_HEADERS = frozenset({
    "cache-control", "content-location", "date", "etag", "expires", "vary", "last-modified",
})
# How many times a request waits for someone else's miss before going itself.
MAX_WAITS = 3

_DIRECTIVE = re.compile(r"""([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:\s*=\s*(?:"([^"]*)"|([^,\s]*)))?""")


def cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """Parse ``Cache-Control`` values into ``{directive: argument or None}``; first one wins."""
    directives: dict[str, str | None] = {}
    for value in values:
        for match in _DIRECTIVE.finditer(value):
            argument = match.group(2) if match.group(2) is not None else match.group(3)
            directives.setdefault(match.group(1).lower(), argument)
    return directives


def delta_seconds(value: str | None) -> int | None:
    """A directive's seconds argument, or None when missing or not a number."""
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def http_date(value: str | None) -> float | None:
    """An HTTP date as a POSIX timestamp, or None when missing or invalid."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Weak comparison of an ``If-None-Match`` list against one ``ETag`` (RFC 9110 §13.1.2)."""
    tags = [tag.strip() for tag in if_none_match.split(",")]
    return "*" in tags or etag.removeprefix("W/") in {tag.removeprefix("W/") for tag in tags}


@dataclass(frozen=True)
class _Entry:
    """One stored response and what decides when it may be used."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float        # Cache.clock() when it arrived (or was last revalidated)
    initial_age: float      # the Age it already had then
    lifetime: float         # freshness lifetime, seconds
    stale_window: float     # seconds past `lifetime` it may be served while refreshing
    no_stale: bool          # must-revalidate & co: never served stale, even on max-stale
    revalidate: bool        # response no-cache: validate before every use
    etag: str | None
    last_modified: str | None
    generation: int = 0     # must equal its URL's marker generation to be found

    @property
    def size(self) -> int:
        return 256 + len(self.body) + sum(len(k) + len(v) for k, v in self.headers)

    @property
    def expires(self) -> float:
        """When (on `Cache.clock`) the entry is useless and may be dropped."""
        if self.etag or self.last_modified:
            return math.inf  # still worth a conditional request; LRU drops it under pressure
        return self.stored_at + self.lifetime - self.initial_age + self.stale_window

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.stored_at)


@dataclass
class _Flight:
    """A request on its way to the app that others with the same key wait for."""

    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    stored: bool = False


class Cache(Plugin):
    """A shared HTTP cache (see the module docstring for the full contract)."""

    def __init__(
        self,
        ttl: Duration = Duration(60),
        max_entries: int = 1000,
        max_bytes: int = 64 * 1024 * 1024,
        max_body: int = 1024 * 1024,
        key_headers: list[str] | None = None,
        stale_while_revalidate: Duration = Duration(0),
        store_set_cookie: bool = False,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        if not 0 <= max_body <= max_bytes:
            raise ValueError(f"max_body ({max_body}) must be between 0 and max_bytes ({max_bytes})")
        if ttl < 0 or stale_while_revalidate < 0:
            raise ValueError("ttl and stale_while_revalidate must not be negative")
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_body = max_body
        self.key_headers = tuple(key_headers or ())
        self.stale_while_revalidate = float(stale_while_revalidate)
        self.store_set_cookie = store_set_cookie
        # Seconds on a monotonic clock: every age and lifetime is measured on it.
        # Tests replace it to move time without sleeping.
        self.clock: Callable[[], float] = time.monotonic
        self._store: TLRUCache = TLRUCache(
            maxsize=max_bytes, ttu=lambda _key, entry, _now: entry.expires,
            timer=lambda: self.clock(), getsizeof=lambda entry: entry.size)
        # (method, host, target) -> (Vary names, generation). Dropping a marker
        # invalidates every variant of the URL at once; a new one gets a new generation.
        self._markers: LRUCache = LRUCache(maxsize=max_entries)
        self._generations = itertools.count(1)
        self._flights: dict[tuple, _Flight] = {}
        self._tasks: set[asyncio.Task] = set()
        self._log = logging.getLogger("mesh.plugin.cache")

    async def start(self, ctx: Context) -> None:
        self._log = ctx.logger

    async def stop(self) -> None:
        """Cancel background refreshes still running."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        if request.method not in ("GET", "HEAD"):
            response = await call_next(request)
            if request.method in UNSAFE_METHODS and response.status < 400:
                self._invalidate(request, response)
            return _mark(response, "MISS")
        directives = cache_control(request.headers.getall("Cache-Control", ()))
        if not directives and "no-cache" in request.headers.get("Pragma", "").lower():
            directives = {"no-cache": None}  # HTTP/1.0 clients (RFC 9111 §5.4)
        if "no-store" in directives or any(h in request.headers for h in BYPASS_HEADERS):
            return _mark(await call_next(request), "MISS")
        reload = "no-cache" in directives or delta_seconds(directives.get("max-age")) == 0
        key = self._flight_key(request)
        stale: _Entry | None = None
        waits = 0
        while True:
            now = self.clock()
            entry = None if reload else self._lookup(request)
            if entry is not None:
                usable = self._usable(entry, directives, now)
                if usable == "fresh":
                    return self._serve(entry, request, now)
                if usable == "stale":
                    self._refresh_in_background(key, request, entry, call_next)
                    return self._serve(entry, request, now)
                stale = entry
            if "only-if-cached" in directives:
                return _mark(Response(504, "504 Gateway Timeout: not in the cache\n"), "MISS")
            flight = self._flights.get(key)
            if flight is None or reload or waits == MAX_WAITS:
                break
            waits += 1
            await flight.done.wait()
            if not flight.stored:
                break  # the app's answer could not be stored: ask it ourselves
        return await self._lead(key, request, call_next, stale)

    # -- keys and lookup ------------------------------------------------------

    def _flight_key(self, request: Request) -> tuple:
        """What two requests share to be coalesced: everything but the Vary values."""
        return (request.method, request.host.lower(), request.target,
                _values(request, self.key_headers))

    def _entry_key(self, request: Request, vary: tuple[str, ...]) -> tuple:
        return self._flight_key(request) + (_values(request, vary),)

    def _lookup(self, request: Request) -> _Entry | None:
        marker = self._markers.get((request.method, request.host.lower(), request.target))
        if marker is None:
            return None
        vary, generation = marker
        entry = self._store.get(self._entry_key(request, vary))
        if entry is None or entry.generation != generation:
            return None
        return entry

    def _put(self, request: Request, vary: tuple[str, ...], entry: _Entry) -> None:
        url = (request.method, request.host.lower(), request.target)
        marker = self._markers.get(url)
        if marker is None or marker[0] != vary:
            marker = (vary, next(self._generations))
            self._markers[url] = marker
        entry = dataclasses.replace(entry, generation=marker[1])
        try:
            self._store[self._entry_key(request, vary)] = entry
        except ValueError:  # bigger than max_bytes on its own (headers included)
            return
        while len(self._store) > self.max_entries:
            self._store.popitem()

    def _invalidate(self, request: Request, response: Response) -> None:
        """Forget the URL an unsafe request changed (RFC 9111 §4.4)."""
        host = request.host.lower()
        targets = {request.target}
        for name in ("Location", "Content-Location"):
            url = urlsplit(response.headers.get(name, ""))
            if url.path.startswith("/") and (not url.netloc or url.netloc.lower() == host):
                targets.add(f"{url.path}?{url.query}" if url.query else url.path)
        for target in targets:
            for method in ("GET", "HEAD"):
                self._markers.pop((method, host, target), None)

    # -- using an entry -------------------------------------------------------

    def _usable(self, entry: _Entry, directives: dict[str, str | None], now: float) -> str | None:
        """``"fresh"`` to serve, ``"stale"`` to serve and refresh, None to go upstream."""
        if entry.revalidate:
            return None
        age = entry.age(now)
        if "max-age" in directives:
            limit = delta_seconds(directives["max-age"])
            if limit is None or age > limit:
                return None
        left = entry.lifetime - age
        if "min-fresh" in directives and left < (delta_seconds(directives["min-fresh"]) or 0):
            return None
        if left > 0:
            return "fresh"
        if "max-stale" in directives and not entry.no_stale:
            allowed = directives["max-stale"]
            limit = math.inf if allowed is None else (delta_seconds(allowed) or 0)
            if -left <= limit:
                return "fresh"  # the client accepts it as is: nothing to refresh for it
        if -left <= entry.stale_window and not {"max-age", "min-fresh"} & directives.keys():
            return "stale"
        return None

    def _serve(self, entry: _Entry, request: Request, now: float) -> Response:
        """A hit: a new Response from the entry, or a 304 if the client's ETag matches."""
        if_none_match = request.headers.get("If-None-Match")
        if if_none_match and entry.etag and entry.status == 200 and etag_matches(if_none_match, entry.etag):
            kept = [(k, v) for k, v in entry.headers if k.lower() in NOT_MODIFIED_HEADERS]
            response = Response(304, b"", kept)
        else:
            body = b"" if request.method == "HEAD" else entry.body
            response = Response(entry.status, body, list(entry.headers), reason=entry.reason)
        response.headers["Age"] = str(int(entry.age(now)))
        return _mark(response, "HIT")

    # -- going upstream -------------------------------------------------------

    async def _lead(self, key: tuple, request: Request, call_next: CallNext,
                    stale: _Entry | None) -> Response:
        """Fetch for ``request``, letting later requests with the same key wait for it."""
        flight = None
        if key not in self._flights:
            flight = self._flights[key] = _Flight()
        try:
            response, stored = await self._fetch(request, call_next, stale)
            if flight is not None:
                flight.stored = stored
            return response
        finally:
            if flight is not None:
                del self._flights[key]
                flight.done.set()

    def _refresh_in_background(self, key: tuple, request: Request, entry: _Entry,
                               call_next: CallNext) -> None:
        if key in self._flights:
            return  # a refresh or a miss for this key is already on its way
        flight = self._flights[key] = _Flight()
        copy = Request(request.method, request.path, query=request.query,
                       headers=request.headers.copy(), peer=request.peer,
                       service=request.service, client=request.client,
                       scheme=request.scheme, state=dict(request.state),
                       version=request.version)
        # The refresh asks on the cache's behalf, not with this client's conditions.
        for name in ("If-None-Match", "If-Modified-Since"):
            copy.headers.popall(name, None)
        task = asyncio.create_task(self._refresh(key, flight, copy, call_next, entry))
        # The loop keeps only a weak reference to tasks: hold one until it is done.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, key: tuple, flight: _Flight, request: Request,
                       call_next: CallNext, entry: _Entry) -> None:
        try:
            response, flight.stored = await self._fetch(request, call_next, entry)
            await response.aclose()
        except Exception:
            self._log.warning("refreshing %s %s in the background failed",
                              request.method, request.target, exc_info=True)
        finally:
            del self._flights[key]
            flight.done.set()

    async def _fetch(self, request: Request, call_next: CallNext,
                     stale: _Entry | None) -> tuple[Response, bool]:
        """Forward ``request``; store the response if allowed. Returns (response, stored)."""
        added = []
        if stale is not None and "If-None-Match" not in request.headers \
                and "If-Modified-Since" not in request.headers:
            # Ask the app whether our stale copy is still good (RFC 9111 §4.3.1).
            if stale.etag:
                request.headers["If-None-Match"] = stale.etag
                added.append("If-None-Match")
            if stale.last_modified:
                request.headers["If-Modified-Since"] = stale.last_modified
                added.append("If-Modified-Since")
        # Plugins further in (a router) may rewrite the request: key the entry on it as it came.
        asked = Request(request.method, request.path, query=request.query,
                        headers=request.headers.copy())
        try:
            response = await call_next(request)
        finally:
            for name in added:
                request.headers.popall(name, None)
                asked.headers.popall(name, None)
        request = asked
        now = self.clock()
        if response.status == 304 and added and stale is not None:
            await response.aclose()
            return self._revalidated(request, stale, response, now), True
        entry = self._admit(request, response.status, response.reason,
                            response.headers.items(), now)
        if entry is None:
            return _mark(response, "MISS"), False
        declared = response.headers.get("Content-Length", "")
        if request.method != "HEAD" and declared.isdigit() and int(declared) > self.max_body:
            return _mark(response, "MISS"), False
        body = await _read_upto(response, self.max_body)
        if body is None:
            return _mark(response, "MISS"), False
        self._put(request, _vary(response.headers.getall("Vary", ())),
                  dataclasses.replace(entry, body=body))
        return _mark(response, "MISS"), True

    def _revalidated(self, request: Request, stale: _Entry, response: Response,
                     now: float) -> Response:
        """Update ``stale`` with a 304's headers (RFC 9111 §4.3.4), store and serve it."""
        fresh = {k.lower() for k in response.headers if k.lower() not in NOT_STORED}
        fresh.discard("content-length")
        headers = [(k, v) for k, v in stale.headers if k.lower() not in fresh]
        headers += [(k, v) for k, v in response.headers.items() if k.lower() in fresh]
        entry = self._admit(request, stale.status, stale.reason, headers, now)
        if entry is None:  # the 304 changed its mind (no-store, say): serve, don't keep
            entry = dataclasses.replace(stale, stored_at=now, initial_age=0.0)
        else:
            entry = dataclasses.replace(entry, body=stale.body)
            self._put(request, _vary(v for k, v in headers if k.lower() == "vary"), entry)
        return self._serve(entry, request, now)

    def _admit(self, request: Request, status: int, reason: str,
               headers: Iterable[tuple[str, str]], now: float) -> _Entry | None:
        """An entry (without body) for a response a shared cache may store, else None."""
        headers = list(headers)
        lower = {k.lower(): v for k, v in reversed(headers)}  # first value of each name
        cc = cache_control(v for k, v in headers if k.lower() == "cache-control")
        if status not in HEURISTIC_STATUSES | EXPLICIT_STATUSES:
            return None
        if "no-store" in cc or "private" in cc:
            return None
        # SECURITY: what answered an authenticated request is someone's own data
        # unless the response says a shared cache may keep it (RFC 9111 §3.5).
        if "authorization" in request.headers and not {"public", "s-maxage", "must-revalidate"} & cc.keys():
            return None
        if "set-cookie" in lower and not self.store_set_cookie:
            return None
        if "*" in _vary(v for k, v in headers if k.lower() == "vary"):
            return None
        lifetime = self._lifetime(cc, lower)
        if lifetime is None:
            if status not in HEURISTIC_STATUSES and "public" not in cc:
                return None
            lifetime = self.ttl
        etag, last_modified = lower.get("etag"), lower.get("last-modified")
        revalidate = "no-cache" in cc
        if revalidate and not (etag or last_modified):
            return None
        no_stale = revalidate or bool({"must-revalidate", "proxy-revalidate", "s-maxage"} & cc.keys())
        if revalidate:
            window = 0.0
        elif "stale-while-revalidate" in cc:
            window = float(delta_seconds(cc["stale-while-revalidate"]) or 0)
        else:
            window = 0.0 if no_stale else self.stale_while_revalidate
        initial_age = float(delta_seconds(lower.get("age")) or 0)
        if lifetime + window <= initial_age and not (etag or last_modified):
            return None  # already useless
        kept = tuple((k, v) for k, v in headers
                     if k.lower() not in NOT_STORED and k.lower() != "set-cookie")
        return _Entry(status=status, reason=reason, headers=kept, body=b"", stored_at=now,
                      initial_age=initial_age, lifetime=lifetime, stale_window=window,
                      no_stale=no_stale, revalidate=revalidate, etag=etag,
                      last_modified=last_modified)

    @staticmethod
    def _lifetime(cc: dict[str, str | None], headers: dict[str, str]) -> float | None:
        """The explicit freshness lifetime (RFC 9111 §4.2.1), or None if there is none."""
        for name in ("s-maxage", "max-age"):
            if name in cc:
                return float(delta_seconds(cc[name]) or 0)  # invalid: stale at once
        if "expires" in headers:
            expires = http_date(headers["expires"])
            if expires is None:
                return 0.0  # "Expires: 0" and other invalid dates mean already expired
            date = http_date(headers.get("date")) or time.time()
            return max(0.0, expires - date)
        return None


def _mark(response: Response, value: str) -> Response:
    response.headers["X-Cache"] = value
    return response


def _values(request: Request, names: Iterable[str]) -> tuple[str, ...]:
    return tuple(",".join(v.strip() for v in request.headers.getall(name, ())) for name in names)


def _vary(values: Iterable[str]) -> tuple[str, ...]:
    """The header names ``Vary`` lists, lowercased, sorted, without duplicates."""
    names = {name.strip().lower() for value in values for name in value.split(",")}
    names.discard("")
    return tuple(sorted(names))


async def _read_upto(response: Response, limit: int) -> bytes | None:
    """Buffer the body if it is at most ``limit`` bytes, else return None.

    Over the limit, ``response.body`` becomes a stream of the chunks already
    read followed by the rest, so the client still gets every byte and the
    cache never holds more than ``limit`` bytes plus one chunk.
    """
    if isinstance(response.body, bytes):
        return response.body if len(response.body) <= limit else None
    chunks: list[bytes] = []
    size = 0
    stream = response.stream()
    try:
        while size <= limit:
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                body = b"".join(chunks)
                response.body = body
                return body
            chunks.append(chunk)
            size += len(chunk)
    except BaseException:
        await stream.aclose()
        raise
    response.body = _replay(chunks, stream)
    return None


async def _replay(chunks: list[bytes], rest: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """The chunks already read, then the rest of the stream they came from."""
    try:
        for chunk in chunks:
            yield chunk
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()
