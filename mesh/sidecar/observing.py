"""What a sidecar records of each request: metrics, an access log line, and the plugins' own numbers.

The listeners call `Observer.done` once a response is written (their
``on_done``). It counts the request: one tuple of plain numbers appended to
its label set's pending list, which `Requests.fold` adds up in bulk every
`FOLD_EVERY` requests and when ``/metrics`` is scraped. While there is an
access log it also makes the request's line (`mesh.observe.accesslog`: a
struct of the line's values, the fields its label set shares made once);
every `FLUSH_ROWS` lines and every half second (the access log's timer),
`Observer.settle` hands them to the access log, which writes them in one
go. The chains report each plugin
call to `Observer.record` (a `mesh.chain.Meter`), which adds to plain
numbers (`mesh.observe.metrics`). A span's export and the tap's record are
made as the request ends, while they are on.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from math import fsum
from time import monotonic, perf_counter, time, time_ns
from typing import Any

from mesh.chain import ANSWERED_BY, PLUGIN_CALLS
from mesh.keys import AVOID, BACKEND, LOG_FIELDS
from mesh.messages import Request, Response
from mesh.observe.accesslog import (
    FLUSH_ROWS,
    AccessLog,
    line_type,
    plugin_label,
    rfc3339,
    rfc3339_milli,
    shared_fields,
)
from mesh.observe.metrics import LATENCY_BUCKETS, Metrics, PluginMetrics, cumulative, status_class
from mesh.observe.tap import Tap, body_fields, headers_of
from mesh.observe.tracing import Span, Tracer

__all__ = ["ROUTE", "SPAN", "UPSTREAM_STARTED", "Observer", "plugin_label", "route_label"]

log = logging.getLogger("mesh.sidecar")

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

# request.state, between the layers and the observer
ROUTE = "mesh.route"  # the [[routes]] entry that allowed the call: "from->to"
UPSTREAM_STARTED = "mesh.upstream_started"  # time.monotonic() when the call to the app or the peer began
SPAN = "mesh.span"  # this sidecar's span (`mesh.observe.tracing.Span`)
_BODIES = "mesh.tap.bodies"  # while a tap wants bodies: the two `_Capture`s of a request

_ROUTES: dict[tuple[str | None, str], str] = {}


def route_label(source: str | None, target: str) -> str:
    """The ``route`` label of a call from ``source`` to ``target``: ``web->orders`` (made once per pair)."""
    label = _ROUTES.get((source, target))
    if label is None:
        label = _ROUTES[(source, target)] = f"{source or 'outside'}->{target}"
    return label


# One row of `Requests` per label set: the duration's buckets and +Inf, the upstream duration's, then these.
_UPSTREAM_SUM, _SUM, _BYTES_IN, _BYTES_OUT = -4, -3, -2, -1
_UPSTREAM = len(LATENCY_BUCKETS) + 1  # where the upstream duration's buckets start
NO_UPSTREAM = -1.0  # a pending request's upstream duration when it had no upstream call
FOLD_EVERY = 256  # pending requests of a label set added to its row at once
_STATUS_CLASSES = {status: status_class(status) for status in range(100, 600)}
_SLOTS = 4096  # (direction, route, peer, method, status) combinations `Observer._slot` remembers
# What requests of one (direction, route, peer, method, status) share: their label set's pending list, the
# label set, and their access log lines' shared fields (`shared_fields`; None without an access log).
_Slot = tuple[list[tuple[float, float, int, int]], tuple[str, ...], Any]


class Requests:
    """The request counters: one row per (direction, route, peer, method, status_class).

    A request appends its numbers to its label set's ``pending`` list (one
    dict lookup and one append); every `FOLD_EVERY` requests of a label set,
    and when ``/metrics`` is scraped, `fold` adds them to the row in bulk, in
    C (bucket by `bisect`, count, sum). ``mesh_requests_total``, the duration
    histogram, the byte counters and the upstream duration's histogram (by
    direction and route) are derived from the rows when scraped.
    """

    name = "mesh_requests"
    labelnames = ("direction", "route", "peer", "method", "status_class")

    def __init__(self, service: str) -> None:
        self.service = service
        self.bounds = LATENCY_BUCKETS
        self.rows: dict[tuple[str, ...], list[float]] = {}
        # Per label set: (duration, upstream duration or NO_UPSTREAM, bytes in, bytes out) of each request.
        self.pending: dict[tuple[str, ...], list[tuple[float, float, int, int]]] = {}

    def row(self, key: tuple[str, ...]) -> list[float]:
        row = self.rows[key] = [0.0] * (2 * (len(self.bounds) + 1) + 4)
        return row

    def begin(self, key: tuple[str, ...]) -> list[tuple[float, float, int, int]]:
        self.row(key)
        found = self.pending[key] = []
        return found

    def fold(self, key: tuple[str, ...]) -> None:
        """Add the label set's pending requests to its row."""
        pending = self.pending[key]
        if not pending:
            return
        durations, upstreams, received, sent = zip(*pending, strict=True)
        pending.clear()
        row = self.rows[key]
        self._buckets(row, 0, sorted(durations), 0)
        row[_SUM] += fsum(durations)
        row[_BYTES_IN] += sum(received)
        row[_BYTES_OUT] += sum(sent)
        none = upstreams.count(NO_UPSTREAM)
        if none < len(upstreams):
            self._buckets(row, _UPSTREAM, sorted(upstreams), none)  # NO_UPSTREAM sorts first: skipped
            row[_UPSTREAM_SUM] += fsum(upstreams) - none * NO_UPSTREAM

    def _buckets(self, row: list[float], at: int, ordered: list[float], skip: int) -> None:
        """Count sorted values, but the first ``skip``, into the buckets starting at ``row[at]`` and +Inf."""
        below = skip
        for index, bound in enumerate(self.bounds, at):
            upto = bisect_right(ordered, bound)
            row[index] += upto - below
            below = upto
        row[at + len(self.bounds)] += len(ordered) - below

    def families(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily  # at a scrape, not at start

        labels = ("service", *self.labelnames)
        count = CounterMetricFamily("mesh_requests", "Requests answered, by where they came from and how they ended",
                                    labels=labels)
        duration = HistogramMetricFamily("mesh_request_duration_seconds",
                                         "From a request's head to the end of its response", labels=labels)
        received = CounterMetricFamily("mesh_request_bytes", "Request body bytes received", labels=labels)
        sent = CounterMetricFamily("mesh_response_bytes", "Response body bytes sent", labels=labels)
        upstream = HistogramMetricFamily("mesh_upstream_duration_seconds",
                                         "From sending a request to the app or a peer to its response head",
                                         labels=("service", "direction", "route"))
        upstreams: dict[tuple[str, str], list[float]] = {}
        for key in list(self.pending):
            self.fold(key)
        for key, row in list(self.rows.items()):
            values = (self.service, *key)
            buckets = cumulative(self.bounds, row[:_UPSTREAM])
            count.add_metric(values, buckets[-1][1])
            duration.add_metric(values, buckets, row[_SUM])
            received.add_metric(values, row[_BYTES_IN])
            sent.add_metric(values, row[_BYTES_OUT])
            if any(row[_UPSTREAM:_UPSTREAM_SUM]):
                total = upstreams.setdefault((key[0], key[1]), [0.0] * (_UPSTREAM + 1))
                for index, item in enumerate(row[_UPSTREAM:_UPSTREAM_SUM]):
                    total[index] += item
                total[-1] += row[_UPSTREAM_SUM]
        for (direction, route), total in upstreams.items():
            upstream.add_metric((self.service, direction, route), cumulative(self.bounds, total[:-1]), total[-1])
        return (count, duration, received, sent, upstream)


class Observer:
    """One sidecar's metrics and access log."""

    def __init__(self, service: str, services: frozenset[str] = frozenset(), instance: str = "",
                 access_log: AccessLog | None = None, tracer: Tracer | None = None) -> None:
        self.service = service
        self.services = services  # the peers a label may name; others (development mode's header) are "other"
        self.instance = instance
        self.metrics = m = Metrics(service=service)
        self.access_log = access_log if access_log is not None and access_log.enabled else None
        self.requests = Requests(service)
        self._pending = self.requests.pending
        m.register(self.requests)
        self.retries = m.counter("retries", "Tries after the first, on calls to other services", ["route"])
        self.plugin_calls = m.counter("plugin_calls", "Calls of each plugin", ["plugin"])
        self.plugin_time = m.histogram("plugin_duration_seconds",
                                       "Time in each plugin, the layers inside it excluded", ["plugin"])
        self.plugin_answers = m.counter("plugin_answers", "Requests a plugin answered itself, by status",
                                        ["plugin", "status"])
        self.plugin_errors = m.counter("plugin_exceptions", "Exceptions a plugin raised", ["plugin"])
        self._labels: dict[str, str] = {}
        self._slots: dict[tuple[Any, ...], _Slot] = {}
        # The lines `done` made since `settle` last handed them to the access log, and the plugins' own
        # fields of some of them, by index.
        self._lines: list[Any] = []
        self._fields: dict[int, dict[Any, Any]] = {}
        self._line: Callable[..., Any] = self._first_line
        self._wall = time() - monotonic()  # what turns a monotonic time into a time of day
        self._stamps: dict[int, str] = {}  # the time of day of each millisecond met since `settle`, as text
        if self.access_log is not None:
            self.access_log.collect = self.settle
        self._tracer = tracer if tracer is not None and tracer.endpoint else None
        self._export = self._tracer.end if self._tracer is not None else None
        self.tap = Tap()

    @property
    def per_request(self) -> bool:
        """Whether the chains note each plugin call on its request (`mesh.chain.Meter`)."""
        return self.tap.active or self._tracer is not None

    # the chains' meter

    def _label(self, name: str) -> str:
        label = self._labels.get(name)
        if label is None:
            label = self._labels[name] = plugin_label(name)
        return label

    def record(self, name: str, own: float, answered: int | None, failed: bool) -> None:
        label = self._label(name)
        key = (label,)
        self.plugin_calls.add(key)
        self.plugin_time.add(key, own)
        if answered is not None:
            self.plugin_answers.add((label, str(answered)))
        if failed:
            self.plugin_errors.add(key)

    def plugin_metrics(self, name: str) -> PluginMetrics:
        """``ctx.metrics`` for the plugin called ``name`` in a chain."""
        label = plugin_label(name)
        return PluginMetrics(self.metrics, label.split(":")[-1].split(".")[0].lower(), label)

    # the listeners' on_done

    def done(self, direction: str, request: Request, response: Response, started: float, answered: float,
             received: int, sent: int) -> None:
        """A response was written: count it (in its label set's pending list; `Requests.fold` adds
        those up in bulk) and, while there is an access log, make its line (`settle` hands the lines
        over).

        Only strings, numbers and structs of them are kept (the plugins' log fields aside): what the
        lists hold is no work for the garbage collector, however long it waits.
        """
        state = request.state  # state.get(...) each time: no bound method made
        method, peer, status = request.method, request.peer, response.status
        route, began, tried = state.get(ROUTE, "none"), state.get(UPSTREAM_STARTED), state.get(AVOID)
        ended = monotonic()
        try:  # all that can fail first: a value a plugin left in the request's state costs no other request
            slot = self._slots.get((direction, route, peer, method, status))
            if slot is None:
                slot = self._slot(direction, route, peer, method, status)
            elapsed = ended - started
            counted = (elapsed, NO_UPSTREAM if began is None else answered - began, received, sent)
            retries = len(tried) if tried else 0
            if self.access_log is not None:
                span, backend, by = state.get(SPAN), state.get(BACKEND), state.get(ANSWERED_BY)
                milli = int((self._wall + started) * 1000)
                line = self._line(
                    self._stamps.get(milli) or self._stamp(milli), request.id,
                    None if span is None else span.trace_id, None if span is None else span.span_id, slot[2],
                    request.path, received, sent, int(elapsed * 1e6) / 1000,
                    None if began is None else int((answered - began) * 1e6) / 1000,
                    None if backend is None else backend.address, retries, None if by is None else self._label(by))
                fields = state.get(LOG_FIELDS)
            if self._export is not None or self.tap.active:
                self._now(direction, request, response, started, answered)
        except Exception:
            log.exception("request %s: cannot count it; its line is left out", request.id)
            return
        pending = slot[0]
        pending.append(counted)
        if len(pending) >= FOLD_EVERY:
            self.requests.fold(slot[1])
        if retries:
            self.retries.add((route,), retries)
        if self.access_log is not None:
            lines = self._lines
            if fields:
                self._fields[len(lines)] = fields
            lines.append(line)
            if len(lines) >= FLUSH_ROWS:
                self.settle()

    def settle(self) -> None:
        """Hand the lines `done` made to the access log, in one batch."""
        self._wall = time() - monotonic()
        self._stamps = {}
        lines, fields = self._lines, self._fields
        if lines and self.access_log is not None:
            self._lines, self._fields = [], {}
            self.access_log.write(lines, fields)

    def _first_line(self, *values: Any) -> Any:
        """The first request's line: the line type is asked for then (its module takes a while to import)."""
        self._line = line_type()
        return self._line(*values)

    def _stamp(self, milli: int) -> str:
        """The time of day of a `time.time` millisecond, as the line's text (made once per millisecond)."""
        text = self._stamps[milli] = rfc3339_milli(milli)
        return text

    def _slot(self, direction: str, route: str, peer: str | None, method: str, status: int) -> _Slot:
        """What requests with these values share: their label set's pending list, the label set, and
        (while there is an access log) their lines' shared fields. Remembered for the first `_SLOTS`
        combinations met (a client's odd method or a development-mode peer must not grow it forever)."""
        # A label's values stay bounded, whatever a header says.
        key = (direction, route, "other" if peer is not None and peer not in self.services else peer or "",
               method if method in _METHODS else "other", _STATUS_CLASSES.get(status) or status_class(status))
        pending = self._pending.get(key)
        if pending is None:
            pending = self.requests.begin(key)
        shared = (shared_fields(self.service, self.instance, peer, direction, method, route, status)
                  if self.access_log is not None else None)
        slot = (pending, key, shared)
        if len(self._slots) < _SLOTS:
            self._slots[(direction, route, peer, method, status)] = slot
        return slot

    def _now(self, direction: str, request: Request, response: Response, started: float,
             answered: float) -> None:
        """What cannot wait for `settle`, while it is on: the span's export, the tap's record."""
        elapsed = monotonic() - started
        get = request.state.get
        route = get(ROUTE, "none")
        upstream_began = get(UPSTREAM_STARTED)
        upstream = answered - upstream_began if upstream_began is not None else None
        span = get(SPAN)
        if self._export is not None and span is not None:
            method, status = request.method, response.status
            self._export(span, name=f"{method} {route}", status=status, attributes={
                "http.request.method": method, "url.path": request.path, "http.response.status_code": status,
                "mesh.direction": direction, "mesh.peer": request.peer or "", "mesh.route": route})
            calls = get(PLUGIN_CALLS)
            if calls and span.sampled:
                self._plugin_spans(span, calls)
        if self.tap.active:
            self.tap.publish(self._tap_record(direction, request, response, elapsed, upstream, route, span))

    # tracing and the tap, only while they are on

    def _plugin_spans(self, span: Span, calls: list[tuple[str, float, float, float, int | None, bool]]) -> None:
        assert self._tracer is not None
        now, clock = time_ns(), perf_counter()
        for name, began, elapsed, own, answered, failed in calls:
            start = now - int((clock - began) * 1e9)
            self._tracer.child(span, name=f"plugin {self._label(name)}", start_ns=start,
                               end_ns=start + int(elapsed * 1e9), failed=failed, attributes={
                                   "mesh.plugin": self._label(name), "mesh.plugin.own_ms": round(own * 1000, 3),
                                   **({"mesh.plugin.answered": answered} if answered is not None else {})})

    def _tap_record(self, direction: str, request: Request, response: Response, elapsed: float,
                    upstream: float | None, route: str, span: Span | None) -> dict[str, Any]:
        state = request.state
        by = state.get(ANSWERED_BY)
        secrets = self.tap.secrets
        record: dict[str, Any] = {
            "time": rfc3339(time() - elapsed), "service": self.service, "instance": self.instance,
            "request_id": request.id, "trace_id": span.trace_id if span is not None else None,
            "direction": direction, "peer": request.peer, "method": request.method, "path": request.path,
            "query": request.query, "route": route, "status": response.status,
            "duration_ms": round(elapsed * 1000, 3),
            "upstream_duration_ms": None if upstream is None else round(upstream * 1000, 3),
            "answered_by": None if by is None else self._label(by),
            "plugins": [{"name": self._label(name), "own_ms": round(own * 1000, 3), "answered": answered,
                         "failed": failed} for name, _, _, own, answered, failed in state.get(PLUGIN_CALLS, ())],
            "request_headers": headers_of(request.headers.items(), secrets),
            "response_headers": headers_of(response.headers.items(), secrets),
        }
        limit = self.tap.bodies
        if limit:
            captured = state.get(_BODIES)
            if captured is not None:
                record.update(captured[0].fields("request", limit))
                record.update(captured[1].fields("response", limit))
            else:
                for prefix, message in (("request", request), ("response", response)):
                    if isinstance(message.body, bytes):
                        record.update(body_fields(prefix, message.body, limit))
        return record

    async def tapped(self, chain: Callable[[Request], Awaitable[Response]], request: Request) -> Response:
        """``chain(request)``, keeping the first bytes of both bodies for the tap (while it wants bodies)."""
        limit = self.tap.bodies
        captures = request.state[_BODIES] = (_Capture(limit), _Capture(limit))
        request.body = captures[0].watch(request.body)
        response = await chain(request)
        if response.status != 101:
            response.body = captures[1].watch(response.body)
        return response


class _Capture:
    """The first ``limit`` bytes of a body as it passes."""

    __slots__ = ("limit", "data", "more")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.more = False

    def keep(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.more = True
        if room > 0:
            self.data += chunk[:room]

    def watch(self, body: bytes | Any) -> Any:
        if isinstance(body, bytes):
            self.keep(body)
            return body
        return self._through(body)

    async def _through(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in body:
                self.keep(chunk)
                yield chunk
        finally:
            close = getattr(body, "aclose", None)
            if close is not None:
                await close()

    def fields(self, prefix: str, limit: int) -> dict[str, Any]:
        return body_fields(prefix, bytes(self.data), limit, self.more)
