"""``cache``: a shared HTTP cache in front of the app, with RFC 9111 semantics.

It stores only what a response explicitly allows a shared cache to store,
and keeps what answered one user away from every other user.

Options:

- ``ttl`` (duration, default ``"60s"``): the lifetime of a response that may
  be stored but names none of its own: one that says ``public`` without
  ``max-age``, ``s-maxage`` or ``Expires``, and, only with ``heuristic =
  true``, a plain response (there it is the most it gets). ``ttl`` never makes
  a response cacheable: without ``public`` or ``heuristic`` it changes nothing.
  ``"0s"`` keeps only responses that name a lifetime.
- ``heuristic`` (boolean, default false): also store responses that name no
  lifetime and do not say ``public``, with a heuristic lifetime (RFC 9111
  §4.2.2): a tenth of the time since their ``Last-Modified``, at most
  ``ttl``, or ``ttl`` without ``Last-Modified``. Off, a plain ``200`` is never
  stored, whatever its path looks like (``/account.css`` included).
- ``key`` (list of strings, default none): more parts of the key, each
  ``"header:NAME"`` (the request's values of that header), ``"claim:NAME"``
  (that claim from ``request.state["claims"]``) or ``"peer"`` (the calling
  service). Entries are kept apart per value, and a request whose identity
  is in the key (see below) may use and fill entries private to it.
- ``key_headers`` (list of strings): the same as ``"header:NAME"`` entries of
  ``key``, e.g. ``["X-Tenant"]``: one stored copy per value.
- ``max_entries`` (integer, default 1000): most responses kept.
- ``max_bytes`` (integer, default 64 MiB): most bytes kept, bodies plus headers.
- ``max_body`` (integer, default 1 MiB): the largest body stored. A larger or
  longer streaming response passes through to the client unbuffered: the
  cache never holds more than ``max_body`` bytes of it.
- ``stale_while_revalidate`` (duration, default ``"0s"``): for this long after
  a response goes stale it is still served (``X-Cache: HIT``) while one
  background request refreshes it. A response's own
  ``stale-while-revalidate=N`` overrides it; ``must-revalidate``,
  ``proxy-revalidate``, ``s-maxage`` and ``no-cache`` forbid it.

What is stored (what a shared cache may store, RFC 9111 §3), only when the
response makes it explicitly cacheable: ``s-maxage``, ``max-age``,
``Expires`` or ``public`` (or any plain one with ``heuristic = true``):

- responses to ``GET`` and ``HEAD`` with status 200, 203, 204, 300, 301,
  308, 404, 405, 410, 414 or 501, and 302 or 307 when they name a lifetime
  or say ``public``. Nothing else: no 206, no 5xx errors.
- never a response with ``Set-Cookie``, with ``Cache-Control: no-store`` or
  ``private``, with ``Vary: *``, or with a body over ``max_body``;
- a response with ``no-cache`` only when it has an ``ETag`` or
  ``Last-Modified``, and then it is revalidated before every use.

Authenticated requests. A request is authenticated when it carries
``Authorization`` or ``Cookie``, or when a plugin before the cache put
``claims`` on ``request.state`` (``jwt`` does, also when it removes
``Authorization`` with ``forward_token = false``), or one after it did by the
time the response comes back. Such a request is neither served from nor
stored in the shared cache unless the response says ``public`` or
``s-maxage``: it gets only entries stored from such responses, and only
such responses to it are stored. The one exception is a request whose
identity is in ``key``: its entries are then keyed on that identity and
private to it, and every response storable for an anonymous request is
stored for it. Its identity is in the key when every credential it carries is:

- ``Cookie`` needs ``"header:Cookie"``;
- ``Authorization`` needs ``"header:Authorization"``, or claims on the
  request and a ``"claim:NAME"`` entry;
- claims need ``"claim:NAME"`` entries, every one of them a claim the
  request has, or ``"header:Authorization"`` with the ``Authorization``
  header still on the request. When ``jwt`` removes the token, only claims
  identify the user: key on ``"claim:sub"``.

The calling service (``request.peer``) is not a credential: add ``"peer"``
to ``key`` to keep services apart. Put the cache after the plugins that
authenticate.

Freshness is ``s-maxage``, else ``max-age``, else ``Expires`` minus ``Date``,
else ``ttl`` for ``public``, else the heuristic lifetime when it is on; an
``Age`` from upstream counts against it. A stale entry with an ``ETag`` or
``Last-Modified`` is kept and revalidated with a conditional request: a 304
refreshes it and the stored body is served. A stale entry without either is
dropped once its stale-while-revalidate window is over.

The key is the method, ``Host``, path and query, the values of ``key`` and
``key_headers``, and the request's values of the headers the response's
``Vary`` names. The path is the normalized one plugins see; its extension
means nothing to the cache.

Requests (RFC 9111 §5.2.1): ``Cache-Control: no-store`` (or a ``Range``,
``If-Match``, ``If-Unmodified-Since`` or ``If-Range`` header) bypasses the
cache; ``no-cache``, ``max-age=0`` or ``Pragma: no-cache`` do not use the
stored copy without asking the app (a conditional request when it has a
validator) and store the new one; ``max-age``, ``min-fresh`` and
``max-stale`` are honoured; ``only-if-cached`` gets a 504 when nothing usable
is stored. A hit answers ``If-None-Match`` with a 304 when the stored
``ETag`` matches.

A successful ``POST``, ``PUT``, ``DELETE`` or ``PATCH`` (status below 400)
invalidates what is stored for its URL, and for its ``Location`` and
``Content-Location`` on the same host, for every identity.

Concurrent misses with the same key (identity included) go to the app once:
the others wait for that response and are served from the cache; if it
could not be stored they go to the app themselves. Authenticated requests
whose identity is not in the key never wait for another request.

Headers: every response gets ``X-Cache: HIT`` (served from the cache, also
after a 304 revalidation or while stale-while-revalidate refreshes it) or
``X-Cache: MISS``; a hit carries ``Age`` in seconds.

Metrics (on the sidecar's ``/metrics``): ``mesh_cache_lookups_total`` by
``result``, one per request: ``hit`` (a fresh entry, or a stale one the app
confirmed with a 304), ``stale`` (served stale while it is refreshed),
``miss`` (the app answered, ``only-if-cached``'s 504 included) or ``bypass``
(a method other than ``GET`` and ``HEAD``, or a request that bypasses the
cache as above).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from cachetools import LRUCache, TLRUCache

from mesh import CallNext, Context, Duration, Headers, Plugin, Request, Response
from mesh_plugins.http_caching import (
    BYPASS_HEADERS,
    NOT_MODIFIED_HEADERS,
    UNSAFE_METHODS,
    StoredResponse,
    StoreRules,
    delta_seconds,
    etag_matches,
    invalidated_targets,
    request_directives,
    updated_headers,
    usable,
    vary_names,
)

# How many times a request waits for someone else's miss before going itself.
MAX_WAITS = 3

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def parse_key(parts: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """``key`` entries as ``(kind, name)``: ``("header", lowercased name)``, ``("claim", name)``
    or ``("peer", "")``, without duplicates. Raises ValueError on anything else."""
    parsed: list[tuple[str, str]] = []
    for part in parts:
        kind, colon, name = part.strip().partition(":")
        kind, name = kind.strip().lower(), name.strip()
        if kind == "peer" and not colon:
            item = ("peer", "")
        elif kind == "header" and _TOKEN.match(name):
            item = ("header", name.lower())
        elif kind == "claim" and name:
            item = ("claim", name)
        else:
            raise ValueError(f"key: {part!r} is not 'header:NAME', 'claim:NAME' or 'peer'")
        if item not in parsed:
            parsed.append(item)
    return tuple(parsed)


class _Scope(NamedTuple):
    """Where one request's entries live and which of them it may use."""

    url: tuple              # (method, host, target): Vary markers and invalidation work on it
    base: tuple             # url + the `key` values: every entry of the request is under it
    authenticated: bool     # it carried credentials or claims when the cache saw it
    shared_only: bool       # authenticated, identity not in the key: public/s-maxage only
    flight: tuple | None    # requests with equal flights may wait for each other's miss;
                            # None: this one never waits, nor is waited for


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
        heuristic: bool = False,
        key: list[str] | None = None,
        key_headers: list[str] | None = None,
        max_entries: int = 1000,
        max_bytes: int = 64 * 1024 * 1024,
        max_body: int = 1024 * 1024,
        stale_while_revalidate: Duration = Duration(0),
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
        self.heuristic = heuristic
        self.key = parse_key([*(key or ()), *(f"header:{name}" for name in key_headers or ())])
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_body = max_body
        self.stale_while_revalidate = float(stale_while_revalidate)
        self._key_headers = frozenset(name for kind, name in self.key if kind == "header")
        self._key_claims = tuple(name for kind, name in self.key if kind == "claim")
        # Seconds on a monotonic clock: every age and lifetime is measured on it.
        # Tests replace it to move time without sleeping.
        self.clock: Callable[[], float] = time.monotonic
        # Wall-clock seconds, for dates without a Date header to count from.
        self.wall_clock: Callable[[], float] = time.time
        self._rules = StoreRules(self.ttl, heuristic, self.stale_while_revalidate,
                                 wall_clock=lambda: self.wall_clock())
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
        self._define_metrics(Context())  # until start() gives the sidecar's

    async def start(self, ctx: Context) -> None:
        self._log = ctx.logger
        self._define_metrics(ctx)

    def _define_metrics(self, ctx: Context) -> None:
        lookups = ctx.metrics.counter("lookups", "requests by what the cache did", ["result"])
        self._lookups = {result: lookups.labels(result=result) for result in ("hit", "stale", "miss", "bypass")}
        for series in self._lookups.values():
            series.inc(0)  # a rate of 0, not a missing series

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
            self._lookups["bypass"].inc()
            return _mark(response, "MISS")
        headers = request.headers
        directives = (request_directives(headers)
                      if "Cache-Control" in headers or "Pragma" in headers else {})
        if "no-store" in directives or any(h in headers for h in BYPASS_HEADERS):
            response = await call_next(request)
            self._lookups["bypass"].inc()
            return _mark(response, "MISS")
        reload = "no-cache" in directives or delta_seconds(directives.get("max-age")) == 0
        scope = self._scope(request)
        stale: StoredResponse | None = None
        waits = 0
        while True:
            now = self.clock()
            entry = self._lookup(scope, request)
            if entry is not None and reload:
                stale = entry  # the client wants the app asked: validate our copy if we can
                break
            if entry is not None:
                use = usable(entry, directives, now)
                if use == "fresh":
                    self._lookups["hit"].inc()
                    return self._serve(entry, request.method, request.headers, now)
                if use == "stale":
                    self._refresh_in_background(scope, request, entry, call_next)
                    self._lookups["stale"].inc()
                    return self._serve(entry, request.method, request.headers, now)
                stale = entry
            if "only-if-cached" in directives:
                self._lookups["miss"].inc()
                return _mark(Response(504, "504 Gateway Timeout: not in the cache\n"), "MISS")
            flight = self._flights.get(scope.flight) if scope.flight is not None else None
            if flight is None or reload or waits == MAX_WAITS:
                break
            waits += 1
            await flight.done.wait()
            if not flight.stored:
                break  # the app's answer could not be stored: ask it ourselves
        response = await self._lead(scope, request, call_next, stale)
        # HIT: the app confirmed the stored copy with a 304.
        self._lookups["hit" if response.headers.get("X-Cache") == "HIT" else "miss"].inc()
        return response

    # -- keys and lookup ------------------------------------------------------

    def _scope(self, request: Request) -> _Scope:
        headers = request.headers
        url = (request.method, headers.get("Host", "").lower(), request.target)
        base = url + self._key_values(request) if self.key else url
        authenticated = "Authorization" in headers or "Cookie" in headers or "claims" in request.state
        # Without a key no identity is in it.
        shared_only = authenticated and not (self.key and self._identity_keyed(request))
        # An identity outside the key is not comparable: such a request never
        # waits for another one.
        return _Scope(url, base, authenticated, shared_only, None if shared_only else base)

    def _key_values(self, request: Request) -> tuple:
        values: list[Any] = []
        for kind, name in self.key:
            if kind == "header":
                values.append(_values(request.headers, (name,)))
            elif kind == "claim":
                values.append(_claim(request.state.get("claims"), name))
            else:
                values.append(request.peer)
        return tuple(values)

    def _identity_keyed(self, request: Request) -> bool:
        """Whether every credential ``request`` carries is part of the key."""
        headers = request.headers
        has_authorization = "Authorization" in headers
        has_claims = "claims" in request.state
        claims = request.state.get("claims")
        claims_keyed = (has_claims and bool(self._key_claims) and isinstance(claims, Mapping)
                        and all(name in claims for name in self._key_claims))
        authorization_keyed = "authorization" in self._key_headers
        # SECURITY: a credential outside the key would let two users share an entry.
        if "Cookie" in headers and "cookie" not in self._key_headers:
            return False
        if has_authorization and not (authorization_keyed or claims_keyed):
            return False
        # Claims whose token is gone (jwt with forward_token = false) are the
        # only trace of who asked: keying on the missing header would merge everyone.
        if has_claims and not (claims_keyed or (has_authorization and authorization_keyed)):
            return False
        return True

    def _entry_key(self, scope: _Scope, headers: Headers, vary: tuple[str, ...]) -> tuple:
        return scope.base + (_values(headers, vary),)

    def _lookup(self, scope: _Scope, request: Request) -> StoredResponse | None:
        marker = self._markers.get(scope.url)
        if marker is None:
            return None
        vary, generation = marker
        entry = self._store.get(self._entry_key(scope, request.headers, vary))
        if entry is None or entry.generation != generation:
            return None
        # SECURITY: an authenticated request outside the key gets only what a
        # response said any user may get.
        if scope.shared_only and not entry.shared:
            return None
        return entry

    def _put(self, scope: _Scope, headers: Headers, vary: tuple[str, ...], entry: StoredResponse) -> None:
        marker = self._markers.get(scope.url)
        if marker is None or marker[0] != vary:
            marker = (vary, next(self._generations))
            self._markers[scope.url] = marker
        entry = dataclasses.replace(entry, generation=marker[1])
        try:
            self._store[self._entry_key(scope, headers, vary)] = entry
        except ValueError:  # bigger than max_bytes on its own (headers included)
            return
        while len(self._store) > self.max_entries:
            self._store.popitem()

    def _invalidate(self, request: Request, response: Response) -> None:
        """Forget the URL an unsafe request changed (RFC 9111 §4.4)."""
        host = request.host.lower()
        for target in invalidated_targets(host, request.target, response.headers):
            for method in ("GET", "HEAD"):
                self._markers.pop((method, host, target), None)

    # -- using an entry -------------------------------------------------------

    def _serve(self, entry: StoredResponse, method: str, headers: Headers, now: float) -> Response:
        """A hit: a new Response from the entry, or a 304 if the client's ETag matches."""
        if_none_match = headers.get("If-None-Match")
        if if_none_match and entry.etag and entry.status == 200 and etag_matches(if_none_match, entry.etag):
            kept = [(k, v) for k, v in entry.headers if k.lower() in NOT_MODIFIED_HEADERS]
            response = Response(304, b"", kept)
        else:
            body = b"" if method == "HEAD" else entry.body
            response = Response(entry.status, body, list(entry.headers), reason=entry.reason)
        response.headers["Age"] = str(int(entry.age(now)))
        return _mark(response, "HIT")

    # -- going upstream -------------------------------------------------------

    async def _lead(self, scope: _Scope, request: Request, call_next: CallNext,
                    stale: StoredResponse | None) -> Response:
        """Fetch for ``request``, letting later requests with the same key wait for it."""
        key = scope.flight
        if key is None or key in self._flights:
            response, _ = await self._fetch(scope, request, call_next, stale)
            return response
        flight = self._flights[key] = _Flight()
        try:
            response, flight.stored = await self._fetch(scope, request, call_next, stale)
            return response
        finally:
            del self._flights[key]
            flight.done.set()

    def _refresh_in_background(self, scope: _Scope, request: Request, entry: StoredResponse,
                               call_next: CallNext) -> None:
        # Refreshes asked with credentials outside the key share one slot: only
        # a public or s-maxage answer to them is stored, and no miss waits on it.
        key = scope.base + ("shared-only refresh",) if scope.flight is None else scope.flight
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
        task = asyncio.create_task(self._refresh(key, flight, scope, copy, call_next, entry))
        # The loop keeps only a weak reference to tasks: hold one until it is done.
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, key: tuple, flight: _Flight, scope: _Scope, request: Request,
                       call_next: CallNext, entry: StoredResponse) -> None:
        try:
            response, flight.stored = await self._fetch(scope, request, call_next, entry)
            await response.aclose()
        except Exception:
            self._log.warning("refreshing %s %s in the background failed",
                              request.method, request.target, exc_info=True)
        finally:
            del self._flights[key]
            flight.done.set()

    async def _fetch(self, scope: _Scope, request: Request, call_next: CallNext,
                     stale: StoredResponse | None) -> tuple[Response, bool]:
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
        method, asked = request.method, request.headers.copy()
        try:
            response = await call_next(request)
        finally:
            for name in added:
                request.headers.popall(name, None)
                asked.popall(name, None)
        # SECURITY: a plugin further in that found the request authenticated
        # (claims put on it on the way in) makes it so for what is stored.
        shared_only = scope.shared_only or (not scope.authenticated and "claims" in request.state)
        now = self.clock()
        if response.status == 304 and added and stale is not None:
            await response.aclose()
            return self._revalidated(scope, method, asked, shared_only, stale, response, now)
        if not (self.heuristic or "Cache-Control" in response.headers or "Expires" in response.headers):
            return _mark(response, "MISS"), False  # nothing says it may be stored (admit agrees)
        entry = self._rules.admit(shared_only, response.status, response.reason,
                            response.headers.items(), now)
        if entry is None:
            return _mark(response, "MISS"), False
        declared = response.headers.get("Content-Length", "")
        if request.method != "HEAD" and declared.isdigit() and int(declared) > self.max_body:
            return _mark(response, "MISS"), False
        body = await _read_upto(response, self.max_body)
        if body is None:
            return _mark(response, "MISS"), False
        self._put(scope, asked, vary_names(response.headers.getall("Vary", ())),
                  dataclasses.replace(entry, body=body))
        return _mark(response, "MISS"), True

    def _revalidated(self, scope: _Scope, method: str, asked: Headers, shared_only: bool,
                     stale: StoredResponse, response: Response, now: float) -> tuple[Response, bool]:
        """Update ``stale`` with a 304's headers (RFC 9111 §4.3.4), store and serve it."""
        headers = updated_headers(stale.headers, response.headers.items())
        entry = self._rules.admit(shared_only, stale.status, stale.reason, headers, now)
        if entry is None:
            # The 304 changed its mind (no-store, a Set-Cookie for this client):
            # this client gets the updated answer, and the old copy is dropped.
            vary = vary_names(v for k, v in stale.headers if k.lower() == "vary")
            self._store.pop(self._entry_key(scope, asked, vary), None)
            body = b"" if method == "HEAD" else stale.body
            return _mark(Response(stale.status, body, headers, reason=stale.reason), "HIT"), False
        entry = dataclasses.replace(entry, body=stale.body)
        self._put(scope, asked, vary_names(v for k, v in headers if k.lower() == "vary"), entry)
        return self._serve(entry, method, asked, now), True


def _mark(response: Response, value: str) -> Response:
    response.headers["X-Cache"] = value
    return response


def _values(headers: Headers, names: Iterable[str]) -> tuple[tuple[str, ...], ...]:
    """The values of each named header, every field line apart (none when absent)."""
    return tuple(tuple(v.strip() for v in headers.getall(name, ())) for name in names)


def _claim(claims: Any, name: str) -> str | None:
    """One claim as a key part: None when absent, else its JSON (so 1 and "1" differ)."""
    if not isinstance(claims, Mapping) or name not in claims:
        return None
    try:
        return json.dumps(claims[name], sort_keys=True, separators=(",", ":"), default=repr)
    except (TypeError, ValueError):
        return repr(claims[name])


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
