"""Golden metrics of a running mesh, per service and per route, from its sidecars' ``/metrics``.

The dashboard (`mesh.control.dashboard`) scrapes every running sidecar's
public ``/metrics`` (`scrape`) about once a second while someone looks at
it, and `Golden` turns the counters into what a person wants to see:

- per service, of the requests it answered (``direction`` inbound or
  public): how many so far, requests per second, success rate (the share
  not 5xx) and p50/p99 latency over the last `WINDOW` seconds;
- per route (``from->to``, counted by the callee: the inbound requests the
  route let through), the same, and the calls no route allows
  (``mesh_policy_denials_total``: ``denied``, or ``audited`` in audit mode);
- the latest denials and 5xx answers, newest first (`EVENTS` at most).

Counters are kept per sidecar (its instance label, admin port and pid): a
sidecar that starts again starts from zero; one that is gone keeps its
numbers in the totals. The first scrape, and the first after a pause, is a
baseline: what it finds counts in the totals, not in the rates or events.
Quantiles come from the difference of ``mesh_request_duration_seconds``
buckets over the window, interpolated within a bucket as Prometheus'
``histogram_quantile`` does.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mesh.observe.metrics import LATENCY_BUCKETS

__all__ = ["EVENTS", "WINDOW", "Golden", "Reading", "parse", "quantile", "scrape"]

WINDOW = 10.0  # seconds the rates and quantiles are taken over
PAUSE = 5.0  # seconds without a scrape after which the next one is a baseline
EVENTS = 50
ANSWERED = frozenset({"inbound", "public"})  # the directions of the requests a service answers

BOUNDS = (*LATENCY_BUCKETS, math.inf)
_BUCKET = {bound: index for index, bound in enumerate(BOUNDS, start=1)}
_WANTED = ("mesh_requests_total", "mesh_request_duration_seconds_bucket", "mesh_policy_denials_total")
_FAMILIES = ("# HELP mesh_requests_total ", "# TYPE mesh_requests_total ",
             "# HELP mesh_request_duration_seconds ", "# TYPE mesh_request_duration_seconds ",
             "# HELP mesh_policy_denials_total ", "# TYPE mesh_policy_denials_total ")

RequestKey = tuple[str, str, str, str]  # service, direction, route, status_class
DenialKey = tuple[str, str, str, str]  # service (where counted), direction, route, result


@dataclass
class Reading:
    """One sidecar's counters at one scrape.

    ``requests``: per key, the count, then the cumulative count of each
    bucket of `BOUNDS`; ``denials``: per key, the count.
    """

    requests: dict[RequestKey, list[float]] = field(default_factory=dict)
    denials: dict[DenialKey, float] = field(default_factory=dict)


def parse(text: str) -> Reading:
    """The counters `Golden` needs from a sidecar's exposition (other series are skipped unparsed)."""
    lines = [line for line in text.splitlines() if line.startswith(_WANTED) or line.startswith(_FAMILIES)]
    reading = Reading()
    width = len(BOUNDS) + 1
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "mesh_policy_denials_total":
                key = (labels.get("service", ""), labels.get("direction", ""), labels.get("route", ""),
                       labels.get("result", ""))
                reading.denials[key] = reading.denials.get(key, 0.0) + sample.value
                continue
            rkey = (labels.get("service", ""), labels.get("direction", ""), labels.get("route", ""),
                    labels.get("status_class", ""))
            row = reading.requests.get(rkey)
            if row is None:
                row = reading.requests[rkey] = [0.0] * width
            if sample.name == "mesh_requests_total":
                row[0] += sample.value
            else:
                index = _BUCKET.get(float(labels.get("le", "nan")))
                if index is not None:
                    row[index] += sample.value
    return reading


async def scrape(session: aiohttp.ClientSession, address: str, timeout: float = 2.0) -> Reading | None:
    """The `Reading` of the sidecar whose admin listener is ``address`` (host:port); None if none came."""
    try:
        async with session.get(f"http://{address}/metrics", timeout=aiohttp.ClientTimeout(total=timeout)) as answer:
            if answer.status != 200:
                return None
            return parse(await answer.text())
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None


def quantile(q: float, cumulative: list[float]) -> float | None:
    """The ``q`` quantile (seconds) of counts per `BOUNDS` bucket (cumulative); None without any."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    rank = q * total
    below, lower = 0.0, 0.0
    for bound, count in zip(BOUNDS, cumulative, strict=False):
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower  # beyond the last finite bound: the most that can be said
            return lower + (bound - lower) * (rank - below) / (count - below)
        below, lower = count, bound
    return lower


def _add(into: list[float], row: list[float]) -> None:
    for index, value in enumerate(row):
        into[index] += value


def _stats(rows: Iterable[tuple[str, list[float]]], span: float) -> dict[str, Any]:
    """Requests per second, success rate and p50/p99 (ms) of ``(status_class, row)`` over ``span`` seconds."""
    summed = [0.0] * (len(BOUNDS) + 1)
    failed = 0.0
    for status_class, row in rows:
        _add(summed, row)
        if status_class == "5xx":
            failed += row[0]
    count = summed[0]
    p50, p99 = quantile(0.5, summed[1:]), quantile(0.99, summed[1:])
    return {"rps": round(count / span, 3) if span > 0 else 0.0,
            "success": round(1 - failed / count, 4) if count else None,
            "p50_ms": round(p50 * 1000, 3) if p50 is not None else None,
            "p99_ms": round(p99 * 1000, 3) if p99 is not None else None}


class Golden:
    """Rates, success, latency and recent problems from the sidecars' counters (see the module docstring)."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window_seconds = window
        self.totals: dict[RequestKey, float] = {}
        self.denied: dict[DenialKey, float] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENTS)
        # (since, until, request deltas, denial deltas) of each scrape in the window
        self.window: collections.deque[tuple[float, float, dict[RequestKey, list[float]],
                                             dict[DenialKey, float]]] = collections.deque()
        self._readings: dict[Hashable, Reading] = {}
        self._last: float | None = None

    def update(self, readings: dict[Hashable, Reading | None], now: float | None = None,
               wall: float | None = None) -> None:
        """One scrape: each running sidecar's `Reading` by its identity (None: it did not answer this time)."""
        now = time.monotonic() if now is None else now
        baseline = self._last is None or now - self._last > PAUSE
        if baseline:
            self.window.clear()
        requests: dict[RequestKey, list[float]] = {}
        denials: dict[DenialKey, float] = {}
        kept: dict[Hashable, Reading] = {}
        for ident, reading in readings.items():
            before = self._readings.get(ident)
            if reading is None:
                if before is not None:
                    kept[ident] = before  # its numbers wait for the next answer
                continue
            kept[ident] = reading
            for key, row in reading.requests.items():
                old = before.requests.get(key) if before is not None else None
                delta = [max(0.0, v - o) for v, o in zip(row, old, strict=True)] if old is not None else list(row)
                if not any(delta):
                    continue
                self.totals[key] = self.totals.get(key, 0.0) + delta[0]
                _add(requests.setdefault(key, [0.0] * len(row)), delta)
            for dkey, value in reading.denials.items():
                old_value = before.denials.get(dkey, 0.0) if before is not None else 0.0
                change = max(0.0, value - old_value)
                if change:
                    self.denied[dkey] = self.denied.get(dkey, 0.0) + change
                    denials[dkey] = denials.get(dkey, 0.0) + change
        self._readings = kept
        if not baseline and self._last is not None:
            self.window.append((self._last, now, requests, denials))
            self._note(requests, denials, time.time() if wall is None else wall)
        while self.window and self.window[0][1] < now - self.window_seconds:
            self.window.popleft()
        self._last = now

    def _note(self, requests: dict[RequestKey, list[float]], denials: dict[DenialKey, float], wall: float) -> None:
        for (service, direction, route, result), count in sorted(denials.items()):
            self.events.appendleft({"time": wall, "kind": result, "service": service, "direction": direction,
                                    "route": route, "status": None, "count": int(count)})
        for (service, direction, route, status_class), row in sorted(requests.items()):
            if status_class == "5xx" and row[0] > 0:
                self.events.appendleft({"time": wall, "kind": "error", "service": service, "direction": direction,
                                        "route": route, "status": status_class, "count": int(row[0])})

    @property
    def span(self) -> float:
        return self.window[-1][1] - self.window[0][0] if self.window else 0.0

    def services(self) -> dict[str, dict[str, Any]]:
        """Per service: ``requests`` (answered so far, since the dashboard first looked), how many of them
        ``from_outside`` (its public listener, or its keyed front's), and `_stats`."""
        found: dict[str, dict[str, Any]] = {}
        totals: dict[str, list[float]] = {}
        for (service, direction, route, _status), count in self.totals.items():
            if direction in ANSWERED:
                both = totals.setdefault(service, [0.0, 0.0])
                both[0] += count
                # A keyed service's front passes outside callers on as the service itself.
                if direction == "public" or route == f"{service}->{service}":
                    both[1] += count
        for service, (count, outside) in totals.items():
            rows = [(key[3], row) for _, _, deltas, _ in self.window for key, row in deltas.items()
                    if key[0] == service and key[1] in ANSWERED]
            found[service] = {"requests": int(count), "from_outside": int(outside), **_stats(rows, self.span)}
        return found

    def routes(self) -> dict[str, dict[str, Any]]:
        """Per route label (``from->to``): ``allowed`` and `_stats` of the calls it let through (counted by
        the callee), ``denied`` and ``audited`` (calls no route allows). Calls of a keyed service's front to
        its own instances (``svc->svc``) are left out."""
        found: dict[str, dict[str, Any]] = {}

        def entry(route: str) -> dict[str, Any]:
            return found.setdefault(route, {"allowed": 0, "denied": 0, "audited": 0})

        for (_service, direction, route, _status), count in self.totals.items():
            if direction == "inbound" and route != "none":
                entry(route)["allowed"] += int(count)
        for (_service, _direction, route, result), count in self.denied.items():
            if result in ("denied", "audited"):
                entry(route)[result] += int(count)
        for route, numbers in found.items():
            rows = [(key[3], row) for _, _, deltas, _ in self.window for key, row in deltas.items()
                    if key[1] == "inbound" and key[2] == route]
            numbers.update(_stats(rows, self.span))
        return {route: numbers for route, numbers in found.items()
                if route.partition("->")[0] != route.partition("->")[2]}

    def recent(self) -> list[dict[str, Any]]:
        """The latest denials and 5xx answers, newest first."""
        return list(self.events)
