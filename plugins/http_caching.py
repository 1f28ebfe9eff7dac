"""The HTTP caching rules of RFC 9111 for a shared cache, as the ``cache`` plugin applies them.

Not a plugin (nothing here handles requests): parsing ``Cache-Control``,
``Vary`` and HTTP dates; what a shared cache may store and for how long
(§3, §4.2); when a stored response may answer a request (§4.2, §5.2.1); how a
304 updates it (§4.3.4); which URLs an unsafe request invalidates (§4.4).
Where the keys go, who may share an entry and when the app is asked is the
plugin's business (``mesh_plugins.cache``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal
from urllib.parse import urlsplit

from mesh import Headers

__all__ = [
    "BYPASS_HEADERS", "EXPLICIT_STATUSES", "HEURISTIC_FRACTION", "HEURISTIC_STATUSES",
    "NOT_MODIFIED_HEADERS", "NOT_STORED", "SHARED_DIRECTIVES", "UNSAFE_METHODS",
    "StoreRules", "StoredResponse", "cache_control", "delta_seconds", "etag_matches",
    "http_date", "invalidated_targets", "request_directives", "updated_headers", "usable",
    "vary_names",
]

# RFC 9110 §15.1: may be stored with a heuristic lifetime (only with `heuristic = true`).
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
# Response directives that let a shared cache keep the answer to an authenticated request.
SHARED_DIRECTIVES = frozenset({"public", "s-maxage"})
# RFC 9111 §4.2.2: a typical heuristic lifetime is 10% of the time since Last-Modified.
HEURISTIC_FRACTION = 0.1

_DIRECTIVE = re.compile(r"""([!#$%&'*+.^_`|~0-9A-Za-z-]+)(?:\s*=\s*(?:"([^"]*)"|([^,\s]*)))?""")


def cache_control(values: Iterable[str]) -> dict[str, str | None]:
    """Parse ``Cache-Control`` values into ``{directive: argument or None}``; first one wins."""
    directives: dict[str, str | None] = {}
    for value in values:
        for match in _DIRECTIVE.finditer(value):
            argument = match.group(2) if match.group(2) is not None else match.group(3)
            directives.setdefault(match.group(1).lower(), argument)
    return directives


def request_directives(headers: Headers) -> dict[str, str | None]:
    """A request's ``Cache-Control``, or ``no-cache`` for ``Pragma: no-cache`` without one."""
    directives = cache_control(headers.getall("Cache-Control", ()))
    if not directives and "no-cache" in headers.get("Pragma", "").lower():
        directives = {"no-cache": None}  # HTTP/1.0 clients (RFC 9111 §5.4)
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


def vary_names(values: Iterable[str]) -> tuple[str, ...]:
    """The header names ``Vary`` lists, lowercased, sorted, without duplicates."""
    names = {name.strip().lower() for value in values for name in value.split(",")}
    names.discard("")
    return tuple(sorted(names))


@dataclass(frozen=True)
class StoredResponse:
    """One stored response and what decides when it may be used."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float        # the cache's clock when it arrived (or was last revalidated)
    initial_age: float      # the Age it already had then
    lifetime: float         # freshness lifetime, seconds
    stale_window: float     # seconds past `lifetime` it may be served while refreshing
    no_stale: bool          # must-revalidate & co: never served stale, even on max-stale
    revalidate: bool        # response no-cache: validate before every use
    shared: bool            # public or s-maxage: may answer authenticated requests too
    etag: str | None
    last_modified: str | None
    generation: int = 0     # the cache's own bookkeeping: which version of its URL it belongs to

    @property
    def size(self) -> int:
        return 256 + len(self.body) + sum(len(k) + len(v) for k, v in self.headers)

    @property
    def expires(self) -> float:
        """When (on the cache's clock) the response is useless and may be dropped."""
        if self.etag or self.last_modified:
            return math.inf  # still worth a conditional request; LRU drops it under pressure
        return self.stored_at + self.lifetime - self.initial_age + self.stale_window

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.stored_at)


@dataclass(frozen=True)
class StoreRules:
    """What a shared cache may store (RFC 9111 §3), and for how long (§4.2).

    ``ttl`` is the lifetime of a ``public`` response that names none and the
    most a heuristic lifetime gets; ``heuristic`` allows storing responses
    that name no lifetime at all; ``stale_while_revalidate`` is the default
    window past the lifetime. ``wall_clock`` gives POSIX seconds, for a
    response without a ``Date`` header.
    """

    ttl: float
    heuristic: bool
    stale_while_revalidate: float
    wall_clock: Callable[[], float]

    def admit(self, shared_only: bool, status: int, reason: str,
              headers: Iterable[tuple[str, str]], now: float) -> StoredResponse | None:
        """A StoredResponse (without body) for a response a shared cache may store, else None.

        ``shared_only``: the request was authenticated and its identity is not
        in the key, so only a response any user may get can be stored for it.
        """
        headers = list(headers)
        lower = {k.lower(): v for k, v in reversed(headers)}  # first value of each name
        cc = cache_control(v for k, v in headers if k.lower() == "cache-control")
        if status not in HEURISTIC_STATUSES | EXPLICIT_STATUSES:
            return None
        if "no-store" in cc or "private" in cc:
            return None
        # SECURITY: a Set-Cookie starts or changes someone's session: never someone else's.
        if "set-cookie" in lower:
            return None
        if "*" in vary_names(v for k, v in headers if k.lower() == "vary"):
            return None
        shared = bool(SHARED_DIRECTIVES & cc.keys())
        # SECURITY: what answered an authenticated request is someone's own data
        # unless the response says a shared cache may give it to anyone (RFC 9111 §3.5).
        if shared_only and not shared:
            return None
        lifetime = self.lifetime(cc, lower)
        if lifetime is None:
            if "public" in cc:
                lifetime = self.ttl
            elif self.heuristic and status in HEURISTIC_STATUSES:
                lifetime = self.heuristic_lifetime(lower)
            else:
                return None  # nothing says it may be stored
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
        kept = tuple((k, v) for k, v in headers if k.lower() not in NOT_STORED)
        return StoredResponse(status=status, reason=reason, headers=kept, body=b"", stored_at=now,
                              initial_age=initial_age, lifetime=lifetime, stale_window=window,
                              no_stale=no_stale, revalidate=revalidate, shared=shared, etag=etag,
                              last_modified=last_modified)

    def lifetime(self, cc: dict[str, str | None], headers: dict[str, str]) -> float | None:
        """The explicit freshness lifetime (RFC 9111 §4.2.1), or None if there is none."""
        for name in ("s-maxage", "max-age"):
            if name in cc:
                return float(delta_seconds(cc[name]) or 0)  # invalid: stale at once
        if "expires" in headers:
            expires = http_date(headers["expires"])
            if expires is None:
                return 0.0  # "Expires: 0" and other invalid dates mean already expired
            date = http_date(headers.get("date")) or self.wall_clock()
            return max(0.0, expires - date)
        return None

    def heuristic_lifetime(self, headers: dict[str, str]) -> float:
        """RFC 9111 §4.2.2: a fraction of the time since Last-Modified, at most ``ttl``."""
        last_modified = http_date(headers.get("last-modified"))
        if last_modified is None:
            return self.ttl
        date = http_date(headers.get("date")) or self.wall_clock()
        return max(0.0, min(self.ttl, (date - last_modified) * HEURISTIC_FRACTION))


def usable(stored: StoredResponse, directives: dict[str, str | None],
           now: float) -> Literal["fresh", "stale"] | None:
    """``"fresh"`` to serve, ``"stale"`` to serve and refresh, None to go upstream.

    ``directives`` are the request's (RFC 9111 §5.2.1): ``max-age``,
    ``min-fresh`` and ``max-stale`` narrow or widen what it accepts.
    """
    if stored.revalidate:
        return None
    age = stored.age(now)
    if "max-age" in directives:
        limit = delta_seconds(directives["max-age"])
        if limit is None or age > limit:
            return None
    left = stored.lifetime - age
    if "min-fresh" in directives and left < (delta_seconds(directives["min-fresh"]) or 0):
        return None
    if left > 0:
        return "fresh"
    if "max-stale" in directives and not stored.no_stale:
        allowed = directives["max-stale"]
        stale_limit = math.inf if allowed is None else (delta_seconds(allowed) or 0)
        if -left <= stale_limit:
            return "fresh"  # the client accepts it as is: nothing to refresh for it
    if -left <= stored.stale_window and not {"max-age", "min-fresh"} & directives.keys():
        return "stale"
    return None


def updated_headers(stored: Iterable[tuple[str, str]],
                    received: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """A stored response's headers updated with those of a 304 (RFC 9111 §4.3.4)."""
    received = list(received)
    fresh = {k.lower() for k, _ in received if k.lower() not in NOT_STORED}
    fresh.discard("content-length")
    headers = [(k, v) for k, v in stored if k.lower() not in fresh]
    headers += [(k, v) for k, v in received if k.lower() in fresh]
    return headers


def invalidated_targets(host: str, target: str, response_headers: Headers) -> set[str]:
    """The targets on ``host`` (lowercased) an unsafe request changed (RFC 9111 §4.4).

    Its own, and those its response's ``Location`` and ``Content-Location``
    name on the same host.
    """
    targets = {target}
    for name in ("Location", "Content-Location"):
        url = urlsplit(response_headers.get(name, ""))
        if url.path.startswith("/") and (not url.netloc or url.netloc.lower() == host):
            targets.add(f"{url.path}?{url.query}" if url.query else url.path)
    return targets
