"""One connection from the sidecar to an upstream: llhttp parsing the responses that come back.

`UpstreamConnection` is the ``asyncio.Protocol`` the pool (`mesh.http.client`)
sends requests on. It parses each response as it arrives: the head (bounded
in size and header count, refused past either), interim responses (passed to
the request's ``informational`` callback), then the body, buffered with flow
control (`mesh.http.framing.BodyBuffer`) until the pool or the consumer of
a streamed body takes it. It checks what no upstream may send: a status
outside 100–599, a 101 nobody asked for, a second response nobody asked
for, bytes on an idle connection. A 101 that answers an Upgrade request
hands the connection to a `mesh.http.websocket.Tunnel`.

A failure fails the wait for the head, or the body's next read, with
`UpstreamError` (502, or 504 for `UpstreamTimeout` and a quiet body); a body
that ended stays ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import httptools

from mesh.errors import UpstreamError
from mesh.http.framing import HIGH_WATER, NO_BODY_STATUS, BodyBuffer, Refused, WriteFlow
from mesh.http.headers import HOP_BY_HOP
from mesh.http.websocket import Tunnel

if TYPE_CHECKING:
    from mesh.http.client import Limits

__all__ = ["Informational", "UpstreamConnection", "UpstreamTimeout", "decode_headers"]

log = logging.getLogger("mesh.upstream")

# Called with each interim (1xx) response as it arrives: status, reason, headers (hop-by-hop removed).
Informational = Callable[[int, str, list[tuple[str, str]]], None]


class UpstreamTimeout(UpstreamError):
    """The request went out and no response head came back in time (504)."""


def decode_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Header pairs as received, less hop-by-hop headers and those ``Connection`` names."""
    headers: list[tuple[str, str]] = []
    connection_tokens: set[str] = set()
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("utf-8", "surrogateescape")
        lower = name.lower()
        if lower == "connection":
            connection_tokens.update(t.strip().lower() for t in value.split(","))
        if lower in HOP_BY_HOP:
            continue
        headers.append((name, value))
    if connection_tokens:
        headers = [(n, v) for n, v in headers if n.lower() not in connection_tokens]
    return headers


class UpstreamConnection(BodyBuffer, WriteFlow, asyncio.Protocol):
    """One upstream connection, parsing responses as they arrive; the body of the current one is buffered here."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        BodyBuffer.__init__(self)
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.max_head = limits.max_head_bytes
        self.max_headers = limits.max_headers
        self.closed = False
        self.idle = False  # in the pool: no request is waiting for what arrives
        self.reusable = True
        self.upgrade = False  # the request asks to switch protocols: a 101 may answer it
        # The quiet allowed while the request body goes out, between chunks of the response body,
        # and in the tunnel a 101 makes (0: no bound).
        self.idle_timeout = 0.0
        self.tunnel: Tunnel | None = None
        self.informational: Informational | None = None
        self.refusal: str | None = None
        self.idle_since = 0.0
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.reset_message()

    def reset_message(self) -> None:
        """Ready for the next response (llhttp itself is, once the last one completed)."""
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.status = 0
        self.reason = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0  # bytes of the head parsed so far
        self.pending = 0  # bytes read while the head is incomplete
        self.started = False  # some of an answer came (an interim response, or part of a head)
        self.chunks = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error = None
        self.until_eof = False
        self.head_only = False  # a HEAD request: no body follows the head
        self.waiter = None
        self.reading_paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # SECURITY: nobody asked for these bytes: they must never pass for the next request's answer.
            self._fail(UpstreamError(502, "upstream sent bytes on an idle connection"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._switch(data[exc.args[0]:])
            return
        except httptools.HttpParserError as exc:
            refusal, self.refusal = self.refusal, None
            if refusal is None and self.head_only and self.complete:
                self.reusable = False  # bytes after a HEAD response's head: a broken upstream
                return
            self._fail(UpstreamError(502, refusal or f"malformed response from upstream ({type(exc).__name__})"))
            return
        if self.status == 0:
            # The head is still coming (most come whole, in one read). llhttp hands over a header
            # only once its line ends: bound one that never ends by counting the reads it spans.
            self.started = True
            self.pending += len(data)
            if self.pending > self.max_head:
                self._fail(UpstreamError(502, f"the response head from upstream passed {self.max_head} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            if self.until_eof and exc is None and self.error is None:
                self.on_message_complete()  # a close-delimited body ends with a clean FIN...
            else:
                # ... but a reset, or an end before the framing said, leaves it broken: never complete.
                self._fail(UpstreamError(502, "upstream reset the connection" if exc is not None
                                         else "upstream closed the connection"))
        self.drain_lost("upstream closed the connection")

    async def drain(self) -> None:
        """Wait until the upstream has read enough of the request body, for at most ``idle_timeout``."""
        if self.closed:
            raise ConnectionResetError("upstream closed the connection")
        if self.write_paused:
            waiter = self.drain_waiter = self.loop.create_future()
            try:
                await self._await_quiet(waiter, "read nothing of the request body")
            finally:
                self.drain_waiter = None

    # httptools callbacks

    def on_status(self, status: bytes) -> None:
        self.reason += status
        self.head_size += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        raw = self.raw_headers
        raw.append((name, value))
        # llhttp has no limit of its own on a head's size: count as we go.
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            self._refuse(f"the response head from upstream passed {self.max_head} bytes")
        if len(raw) > self.max_headers:
            self._refuse(f"the response head from upstream has more than {self.max_headers} headers")

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            if status == 101 and self.upgrade:
                self.status = status
                self.head.set_result(None)  # what follows is another protocol's: see _switch
                return
            if status == 101:
                self._refuse("upstream switched protocols unexpectedly")
            if status < 100:
                self._refuse(f"upstream answered with status {status}")
            self._interim(status)
            return
        if status > 599:
            self._refuse(f"upstream answered with status {status}")
        if self.status:
            self._refuse("upstream sent a response nobody asked for")
        self.status = status
        if self.head_only:
            # llhttp would now wait for the body a GET would get. Nothing follows a HEAD
            # response's head: the message is complete, and a fresh parser reads the next one.
            self.complete = True
            self.keep_alive = self._keeps_alive(parser.get_http_version())
            self.parser = httptools.HttpResponseParser(self)
        elif status not in NO_BODY_STATUS:
            names = {n.lower() for n, _ in self.raw_headers}
            self.until_eof = b"content-length" not in names and b"transfer-encoding" not in names
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, chunk: bytes) -> None:
        # BodyBuffer.feed for this class alone (see mesh.http.framing: a callback per chunk is not shared).
        self.chunks.append(chunk)
        self.buffered += len(chunk)
        if self.buffered > HIGH_WATER:
            self.pause_sender()
        self.wake()

    def on_message_complete(self) -> None:
        if self.status == 0 or self.head_only:
            return  # the end of an interim response, or of what llhttp took for a HEAD's body
        self.complete = True
        # Ask now: llhttp forgets once the next message begins.
        self.keep_alive = self.parser.should_keep_alive()
        self.wake()

    # BodyBuffer's hooks

    def pause_sender(self) -> None:
        if not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_sender(self) -> None:
        if self.reading_paused and self.transport:
            self.reading_paused = False
            self.transport.resume_reading()

    async def wait_chunk(self) -> None:
        """Wait for more of the body, for at most ``idle_timeout`` seconds; past it, the stream is cut."""
        waiter = self.waiter = self.loop.create_future()
        try:
            await self._await_quiet(waiter, "sent nothing of the response body")
        except UpstreamError:
            self.close()
            raise
        finally:
            self.waiter = None

    # helpers

    async def _await_quiet(self, waiter: asyncio.Future[None], what: str) -> None:
        """Await ``waiter`` for at most ``idle_timeout`` seconds (0: no bound); past it, a 504 saying ``what``."""
        try:
            async with asyncio.timeout(self.idle_timeout or None):
                await waiter
        except TimeoutError:
            raise UpstreamError(504, f"upstream {what} for {self.idle_timeout:g}s") from None

    def _refuse(self, reason: str) -> NoReturn:
        """From a parser callback: stop parsing; the request fails with 502 and ``reason``."""
        self.refusal = reason
        raise Refused(reason)

    def _interim(self, status: int) -> None:
        """An interim response (1xx) is complete: pass it on, then wait for the final one."""
        self.started = True
        informational = self.informational
        if status != 100 and informational is not None:
            try:
                informational(status, self.reason.decode("latin-1"), decode_headers(self.raw_headers))
            except Exception:
                log.exception("passing on an interim %d response failed", status)
        self.raw_headers = []
        self.reason = b""
        self.head_size = 0
        self.pending = 0

    def _keeps_alive(self, version: str) -> bool:
        """Whether a response without a body leaves the connection open (RFC 9112 §9.3)."""
        tokens: set[bytes] = set()
        for name, value in self.raw_headers:
            if name.lower() == b"connection":
                tokens.update(t.strip().lower() for t in value.split(b","))
        if version == "1.1":
            return b"close" not in tokens
        return b"keep-alive" in tokens

    def _switch(self, rest: bytes) -> None:
        """llhttp stopped after a 101's head; ``rest`` is what followed it: a tunnel takes over."""
        if self.status != 101 or self.transport is None:
            self._fail(UpstreamError(502, "upstream switched protocols unexpectedly"))
            return
        self.tunnel = Tunnel(self.loop, self.transport, rest, self.idle_timeout)

    def _fail(self, exc: BaseException) -> None:
        if not self.complete:
            self.error = exc  # a body that ended stays ended; the connection closes all the same
        self.closed = True
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # mark retrieved: the sender may be gone
        self.wake()
        if self.transport is not None:
            self.transport.close()

    def time_out(self, timeout: float) -> None:
        """No response head within ``timeout`` seconds: fail the wait for it."""
        if not self.head.done():
            self.head.set_exception(UpstreamTimeout(504, f"upstream did not answer within {timeout:.3g}s"))

    def close(self) -> None:
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.close()
        elif self.transport is not None:
            self.transport.close()
