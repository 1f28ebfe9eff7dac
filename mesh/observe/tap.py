"""The live tap: each request a sidecar answers, as one JSON object, to whoever listens.

A sidecar keeps one `Tap`. Listeners (`mesh tap`, the dashboard) subscribe
through the admin API (``GET /tap``) with a `Filter`; while nobody
listens, a request costs one attribute check (``tap.active``). While
someone does, the observer builds one record per request (`record`) and
`Tap.publish` hands it to each subscriber whose filter it passes. A
subscriber's queue is bounded: a listener that reads too slowly loses
records (it is told how many), the sidecar never waits for it.

A record (one line of ``mesh tap --json`` and of ``mesh tap --save FILE``)::

    {"time": "2026-12-02T17:30:01.123Z", "service": "web", "instance": "web-0",
     "request_id": "...", "trace_id": "...", "direction": "inbound", "peer": "api",
     "method": "GET", "path": "/api/x", "query": "a=1", "route": "api->web",
     "status": 200, "duration_ms": 1.2, "upstream_duration_ms": 0.9,
     "answered_by": null, "plugins": [{"name": "jwt", "own_ms": 0.05, "answered": null, "failed": false}],
     "request_headers": [["host", "web"], ...], "response_headers": [["content-type", "text/plain"], ...]}

Credentials (``Authorization``, ``Cookie``, ...) are shown as ``<redacted>``
unless the subscriber asks for them (``secrets``). Bodies are there only when
asked (``bodies=N``: the first N bytes): ``request_body`` and
``response_body`` as text when they are UTF-8, else ``*_body_base64``, and
``*_body_truncated`` when there was more. `read_records` reads a saved file
back, for `mesh.testing.replay`.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import json
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BODY_LIMIT", "CREDENTIALS", "DIRECTIONS", "Filter", "Subscriber", "Tap", "body_bytes", "body_fields",
           "headers_of", "read_records"]

BODY_LIMIT = 64 << 10  # the most of each body a record carries
QUEUE = 1024  # records a subscriber may be behind before it loses some
MAX_SUBSCRIBERS = 16
HEARTBEAT = 5.0  # seconds: an empty line to a quiet subscriber, so a client that left is noticed

DIRECTIONS = frozenset({"inbound", "outbound", "public"})
CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"})
REDACTED = "<redacted>"
_STATUS = re.compile(r"[1-5](?:[0-9]{2}|xx)")


@dataclass(frozen=True)
class Filter:
    """Which records a subscriber wants; every field given must match."""

    path: str | None = None  # a glob over the path: "/api/*"
    peer: str | None = None
    status: str | None = None  # "503" or a class: "5xx"
    direction: str | None = None
    bodies: int = 0  # bytes of each body to include; 0: none
    secrets: bool = False  # credentials as they were, not redacted

    @classmethod
    def parse(cls, query: dict[str, str]) -> Filter:
        """A filter from query parameters; ValueError naming the bad one."""
        known = {"path", "peer", "status", "direction", "bodies", "secrets"}
        unknown = sorted(set(query) - known)
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r}: tap takes {', '.join(sorted(known))}")
        status = query.get("status") or None
        if status is not None:
            status = status.lower()
            if not _STATUS.fullmatch(status):
                raise ValueError(f"status {status!r}: give a status (404) or a class (5xx)")
        direction = query.get("direction") or None
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"direction {direction!r}: one of {', '.join(sorted(DIRECTIONS))}")
        try:
            bodies = int(query.get("bodies") or 0)
        except ValueError:
            raise ValueError(f"bodies {query['bodies']!r}: a number of bytes") from None
        if not 0 <= bodies <= BODY_LIMIT:
            raise ValueError(f"bodies: 0 to {BODY_LIMIT} bytes")
        secrets = (query.get("secrets") or "").lower() in ("1", "true", "yes")
        return cls(query.get("path") or None, query.get("peer") or None, status, direction, bodies, secrets)

    def matches(self, record: dict[str, Any]) -> bool:
        if self.direction is not None and record["direction"] != self.direction:
            return False
        if self.peer is not None and record["peer"] != self.peer:
            return False
        if self.status is not None:
            status = str(record["status"])
            if self.status.endswith("xx") and status[0] != self.status[0] or \
                    not self.status.endswith("xx") and status != self.status:
                return False
        return self.path is None or fnmatch.fnmatchcase(record["path"], self.path)


class Subscriber:
    """One listener: its filter and the records waiting for it."""

    def __init__(self, filter: Filter) -> None:
        self.filter = filter
        self.queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(QUEUE)
        self.dropped = 0

    def offer(self, record: dict[str, Any]) -> None:
        try:
            self.queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1


class Tap:
    """A sidecar's subscribers, and what it gives them (see the module docstring)."""

    def __init__(self) -> None:
        self.subscribers: list[Subscriber] = []
        self.active = False  # someone listens: the observer builds records
        self.bodies = 0  # the most body bytes any subscriber wants
        self.secrets = False  # some subscriber wants credentials as they were

    def subscribe(self, filter: Filter) -> Subscriber:
        """A new subscriber; RuntimeError when `MAX_SUBSCRIBERS` already listen."""
        if len(self.subscribers) >= MAX_SUBSCRIBERS:
            raise RuntimeError(f"{MAX_SUBSCRIBERS} taps already listen to this sidecar")
        subscriber = Subscriber(filter)
        self.subscribers.append(subscriber)
        self._changed()
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)
            self._changed()

    def _changed(self) -> None:
        self.active = bool(self.subscribers)
        self.bodies = max((s.filter.bodies for s in self.subscribers), default=0)
        self.secrets = any(s.filter.secrets for s in self.subscribers)

    def close(self) -> None:
        """End every subscriber's stream (the sidecar stops)."""
        for subscriber in self.subscribers:
            try:
                subscriber.queue.put_nowait(None)
            except asyncio.QueueFull:
                subscriber.queue.get_nowait()
                subscriber.queue.put_nowait(None)

    def publish(self, record: dict[str, Any]) -> None:
        """Give ``record`` (built for the widest subscriber: `bodies`, `secrets`) to each one it matches."""
        for subscriber in self.subscribers:
            wants = subscriber.filter
            if not wants.matches(record):
                continue
            view = record
            if wants.bodies < self.bodies:
                view = _with_bodies(view, wants.bodies)
            if self.secrets and not wants.secrets:
                view = _redacted(view)
            subscriber.offer(view)

    async def stream(self, subscriber: Subscriber, first: dict[str, Any]) -> AsyncIterator[bytes]:
        """``first``, then the subscriber's records as JSON lines, until the client leaves."""
        try:
            yield _line(first)
            while True:
                try:
                    record = await asyncio.wait_for(subscriber.queue.get(), HEARTBEAT)
                except TimeoutError:
                    yield b"\n"
                    continue
                if record is None:
                    return
                if subscriber.dropped:
                    dropped, subscriber.dropped = subscriber.dropped, 0
                    yield _line({"tap": "dropped", "count": dropped})
                yield _line(record)
        finally:
            self.unsubscribe(subscriber)


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def headers_of(items: Iterable[tuple[str, str]], secrets: bool) -> list[list[str]]:
    """Header pairs for a record, lower-cased names; credentials redacted unless ``secrets``."""
    return [[name.lower(), value if secrets or name.lower() not in CREDENTIALS else REDACTED]
            for name, value in items]


def _redacted(record: dict[str, Any]) -> dict[str, Any]:
    record = dict(record)
    for key in ("request_headers", "response_headers"):
        record[key] = [[name, REDACTED if name in CREDENTIALS else value] for name, value in record[key]]
    return record


def body_fields(prefix: str, data: bytes | None, limit: int, more: bool = False) -> dict[str, Any]:
    """``request_body`` (or ``..._base64``) and ``..._truncated`` for the first ``limit`` bytes of ``data``.

    ``more``: there was more than ``data`` (it is already a cut).
    """
    if data is None or limit <= 0:
        return {}
    more = more or len(data) > limit
    data = data[:limit]
    try:
        fields: dict[str, Any] = {f"{prefix}_body": data.decode()}
    except UnicodeDecodeError:
        fields = {f"{prefix}_body_base64": base64.b64encode(data).decode()}
    if more:
        fields[f"{prefix}_body_truncated"] = True
    return fields


def _with_bodies(record: dict[str, Any], limit: int) -> dict[str, Any]:
    """``record`` with its bodies cut to ``limit`` bytes (none at 0)."""
    out = {key: item for key, item in record.items() if "_body" not in key}
    for prefix in ("request", "response"):
        data = body_bytes(record, prefix)
        if data is not None and limit > 0:
            out.update(body_fields(prefix, data, limit, bool(record.get(f"{prefix}_body_truncated"))))
    return out


def body_bytes(record: dict[str, Any], prefix: str) -> bytes | None:
    """The body bytes a record holds for ``prefix`` ("request" or "response"), None if it holds none."""
    text = record.get(f"{prefix}_body")
    if isinstance(text, str):
        return text.encode()
    encoded = record.get(f"{prefix}_body_base64")
    if isinstance(encoded, str):
        return base64.b64decode(encoded)
    return None


def read_records(source: str | Path | Iterable[str]) -> Iterator[dict[str, Any]]:
    """The request records of a ``mesh tap --save`` file (or its lines), skipping the tap's own notes."""
    if isinstance(source, str | Path):
        with open(source, encoding="utf-8") as file:
            yield from read_records(list(file))
        return
    for number, line in enumerate(source, 1):
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"line {number}: not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise ValueError(f"line {number}: not a JSON object")
        if "tap" in record:
            continue
        missing = [key for key in ("method", "path", "status") if key not in record]
        if missing:
            raise ValueError(f"line {number}: no {', '.join(missing)}: not a mesh tap record")
        yield record
