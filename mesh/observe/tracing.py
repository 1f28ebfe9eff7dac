"""Traces: a span of the sidecar's own for every request, W3C trace context in and out, OTLP/HTTP export.

`Tracer.begin` reads the request's ``traceparent`` (W3C Trace Context, level 1):

- a valid one makes our span its child: same trace id, its span id as our parent, its sampled flag;
- an absent or invalid one starts a new trace: a random 128-bit trace id, sampled with the share
  ``[mesh.tracing] sample`` (1.0 when unset); ``tracestate`` belongs to the old trace and is dropped.

Either way the header is replaced by our span (``00-<trace id>-<our span id>-<flags>``), so that the app,
and the next sidecar when the app calls another service, see the sidecar's span as their parent. That
path runs on every request: it is a regular expression and two random numbers, nothing of the SDK.

`Tracer.end` hands a sampled span to the OpenTelemetry SDK (a batch processor and the OTLP/HTTP protobuf
exporter, which sends from a thread of its own) when ``[mesh.tracing] otlp`` names a collector; without
it, it does nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from multidict import CIMultiDict
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from mesh.config.model import Tracing

__all__ = ["CLOSE_TIMEOUT", "Span", "Tracer", "format_traceparent", "parse_traceparent"]

log = logging.getLogger("mesh.tracing")

# How long `Tracer.close` waits for the last spans to reach the collector.
CLOSE_TIMEOUT = 5.0

# version-traceid-parentid-flags, lowercase hex only. What follows the flags is allowed only for versions
# after 00, and must start with '-' (the spec's rule for parsing a version it does not know yet).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


class Span:
    """One request's span as the sidecar sees it: ids as lowercase hex, start as `time.time_ns()`."""

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "start_ns")

    def __init__(self, trace_id: str, span_id: str, parent_id: str | None, sampled: bool, start_ns: int) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.start_ns = start_ns

    @property
    def traceparent(self) -> str:
        """This span as a ``traceparent`` value: what the app receives."""
        return format_traceparent(self.trace_id, self.span_id, self.sampled)

    def __repr__(self) -> str:
        return (f"Span(trace_id={self.trace_id!r}, span_id={self.span_id!r}, parent_id={self.parent_id!r}, "
                f"sampled={self.sampled})")


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """``(trace id, parent span id, sampled)`` of a ``traceparent`` value, or None when it is not valid.

    Version 00 is exactly 55 characters; ``ff`` is never valid; a later version is read as far as this
    version goes (its flags' sampled bit only), provided the flags are followed by the end or a '-'.
    All-zero ids are invalid, as are upper-case hex digits.
    """
    match = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def format_traceparent(trace_id: str, span_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


def _new_trace_id() -> str:
    return f"{random.getrandbits(128) or 1:032x}"


def _new_ids() -> str:
    """A trace id and a span id, 48 hex digits, neither all zeros."""
    ids = f"{random.getrandbits(192):048x}"
    if ids[:32] == _ZERO_TRACE or ids[32:] == _ZERO_SPAN:  # about never: 2**-64
        return _new_trace_id() + _new_span_id()
    return ids


def _new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


class Tracer:
    """Spans of one sidecar, for the service it fronts; exports them when ``config.otlp`` is set."""

    def __init__(self, service: str, config: Tracing | None) -> None:
        self.service = service
        self.sample = 1.0 if config is None else config.sample
        self.endpoint = None if config is None else config.otlp
        self._processor: BatchSpanProcessor | None = None
        self._sdk: _Sdk | None = None
        if self.endpoint is not None:
            self._sdk = _Sdk(service)
            self._processor = self._sdk.processor(self.endpoint)

    def begin(self, headers: CIMultiDict[str]) -> Span:
        """Our span for a request with these headers; sets its ``traceparent`` to that span."""
        values = headers.getall("traceparent", ())
        parent = parse_traceparent(values[0]) if len(values) == 1 else None  # two: invalid
        if parent is None:
            ids = _new_ids()  # one call for both ids: this runs on every request
            trace_id, span_id, parent_id = ids[:32], ids[32:], None
            sampled = self.sample >= 1 or random.random() < self.sample
            if "tracestate" in headers:  # it belongs to the trace the caller started, not to ours
                del headers["tracestate"]
        else:
            trace_id, parent_id, sampled = parent
            span_id = _new_span_id()
        headers["traceparent"] = format_traceparent(trace_id, span_id, sampled)
        return Span(trace_id, span_id, parent_id, sampled, time.time_ns())

    def end(self, span: Span, *, name: str, status: int, attributes: dict[str, str | int | float]) -> None:
        """Finish ``span``: queued for export when export is configured and the span is sampled."""
        if self._processor is None or not span.sampled:
            return
        assert self._sdk is not None
        self._processor.on_end(self._sdk.readable(span, name, status, attributes, time.time_ns()))

    def child(self, span: Span, *, name: str, start_ns: int, end_ns: int, failed: bool,
              attributes: dict[str, str | int | float]) -> None:
        """Export a span inside ``span`` (a plugin's call), with an id of its own."""
        if self._processor is None or not span.sampled:
            return
        assert self._sdk is not None
        self._processor.on_end(self._sdk.child(span, _new_span_id(), name, failed, attributes, start_ns, end_ns))

    async def close(self) -> None:
        """Send what is queued and stop the exporter, waiting at most `CLOSE_TIMEOUT` seconds."""
        processor, self._processor = self._processor, None
        if processor is None:
            return
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def shut() -> None:
            try:
                processor.shutdown()  # exports what is queued, then stops the exporter
            finally:
                try:
                    loop.call_soon_threadsafe(finished)
                except RuntimeError:  # the loop has closed: nobody waits any more
                    pass

        # A thread of its own, not the loop's executor: a collector that does not answer must not hold
        # the loop's shutdown (or the process's exit) past the timeout.
        threading.Thread(target=shut, name="mesh-tracing-close", daemon=True).start()
        try:
            await asyncio.wait_for(done, CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("tracing: spans not sent to %s within %gs, dropped", self.endpoint, CLOSE_TIMEOUT)
            processor.span_exporter.shutdown()  # ends the exporter's retries


class _Sdk:
    """The OpenTelemetry SDK's side, imported only when spans are exported."""

    def __init__(self, service: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        self.resource = Resource.create({"service.name": service})
        self.scope = InstrumentationScope("mesh")
        self.context = SpanContext
        self.span = ReadableSpan
        self.kind = SpanKind.SERVER
        self.internal = SpanKind.INTERNAL
        self.flags = TraceFlags(TraceFlags.SAMPLED)
        self.ok = Status(StatusCode.UNSET)
        self.error = Status(StatusCode.ERROR)

    def processor(self, endpoint: str) -> BatchSpanProcessor:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        return BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=CLOSE_TIMEOUT))

    def readable(self, span: Span, name: str, status: int, attributes: dict[str, str | int | float],
                 end_ns: int) -> ReadableSpan:
        trace_id = int(span.trace_id, 16)
        context = self.context(trace_id, int(span.span_id, 16), is_remote=False, trace_flags=self.flags)
        parent = None if span.parent_id is None else self.context(
            trace_id, int(span.parent_id, 16), is_remote=True, trace_flags=self.flags)
        return self.span(name=name, context=context, parent=parent, resource=self.resource,
                         attributes=dict(attributes), kind=self.kind,
                         status=self.error if status >= 500 else self.ok, start_time=span.start_ns,
                         end_time=end_ns, instrumentation_scope=self.scope)

    def child(self, span: Span, span_id: str, name: str, failed: bool, attributes: dict[str, str | int | float],
              start_ns: int, end_ns: int) -> ReadableSpan:
        trace_id = int(span.trace_id, 16)
        context = self.context(trace_id, int(span_id, 16), is_remote=False, trace_flags=self.flags)
        parent = self.context(trace_id, int(span.span_id, 16), is_remote=False, trace_flags=self.flags)
        return self.span(name=name, context=context, parent=parent, resource=self.resource,
                         attributes=dict(attributes), kind=self.internal,
                         status=self.error if failed else self.ok, start_time=start_ns,
                         end_time=end_ns, instrumentation_scope=self.scope)
