"""One request on a listener's connection: its state, and its body as it arrives.

`Exchange` follows a request from its parsed head to the end of its
response; `RequestBody` hands its body to the handler chunk by chunk with
flow control (`mesh.http.framing.BodyBuffer`), a minimum rate and
``Expect: 100-continue``; `Reframed` parses the body of an upgrade request
llhttp stopped at. The connection (`mesh.http.server`) owns the socket and
its one deadline (`mesh.http.limits`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mesh.errors import ClientTimeout
from mesh.http.framing import HIGH_WATER, BodyBuffer
from mesh.http.limits import BODY
from mesh.messages import Request

if TYPE_CHECKING:
    from mesh.http.receive import RequestReader
    from mesh.http.server import Connection

__all__ = ["CONTINUE", "ClientGone", "Exchange", "Reframed", "RequestBody"]

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_monotonic = time.monotonic


class ClientGone(ClientTimeout):
    """The client went away, or broke its framing, before the end of its request body.

    A `ClientTimeout`, so the chain answers it as one (408, no error log):
    nobody is left to read the answer anyway.
    """


class Exchange:
    """One request on a connection, from its parsed head to the end of its response."""

    __slots__ = ("request", "method", "version", "keep_alive", "body", "refusal", "websocket_key",
                 "upgrade", "framing", "responding", "bad_body", "started", "sent")

    def __init__(self, method: str, version: str, keep_alive: bool) -> None:
        self.request: Request | None = None
        self.method = method  # as the client sent it: HEAD decides the framing, whatever plugins do
        self.version = version
        self.keep_alive = keep_alive
        self.body: RequestBody | None = None
        self.refusal: tuple[int, str] | None = None  # answer with this short error, then close
        self.websocket_key: str | None = None  # a valid WebSocket handshake
        self.upgrade = False  # llhttp stopped after this head (Connection: upgrade)
        self.framing = b""  # for an upgrade with a body: a head with the same framing (see _after_upgrade)
        self.responding = False
        self.bad_body = False  # the body broke llhttp's framing: 400, whatever the handler said
        self.started = 0.0  # loop time when its head had arrived
        self.sent = 0  # bytes of response body written

    @property
    def request_id(self) -> str | None:
        return self.request.id if self.request is not None else None


class RequestBody(BodyBuffer):
    """A request body as it arrives: an async iterator of chunks, with flow control.

    llhttp's chunks are buffered; reading from the socket pauses while more
    than the high-water mark waits, and resumes below the low one. Waiting
    longer than the body timeout for the next chunk raises `ClientTimeout`
    (the chain answers 408, the connection closes), and so does a client
    slower than the listener's minimum rate: past a grace period, the time
    spent waiting for it may not exceed ``received / request_min_rate`` (the
    time the handler spends elsewhere is not the client's). A client that
    leaves or breaks framing mid-body raises `ClientGone`. ``Expect:
    100-continue`` is answered when the body is first waited for, so a
    request refused without reading its body never has it sent.
    """

    __slots__ = ("_conn", "_exchange", "expect_continue", "waited", "slow")

    def __init__(self, conn: Connection, exchange: Exchange) -> None:
        BodyBuffer.__init__(self)  # (cheaper than super(): one of these per request with a body)
        self._conn = conn
        self._exchange = exchange
        self.expect_continue = False
        self.waited = 0.0  # seconds spent waiting for the client
        self.slow = False  # the current wait is bounded by the minimum rate, not the body timeout

    async def fill(self, limit: int) -> bytes | None:
        """Read the whole body if it is at most ``limit`` bytes: its bytes, else None (it streams on).

        What was read stays queued for the iterator when the body turns out larger.
        """
        self.high_water = max(HIGH_WATER, limit + 1)  # read on while it may still fit
        try:
            while True:
                if self.error is not None:
                    raise self.error
                if self.buffered > limit or self.discarded:
                    return None
                if self.complete:
                    break
                await self.wait_chunk()
        finally:
            self.high_water = HIGH_WATER
        return self.take_all()

    def pause_sender(self) -> None:
        self._conn.pause()

    def resume_sender(self) -> None:
        conn = self._conn
        if conn.reading_paused:
            conn.maybe_resume()

    async def wait_chunk(self) -> None:
        """Wait for the next chunk, bounded by the body timeout and the minimum rate."""
        conn = self._conn
        if self.expect_continue:
            self.expect_continue = False
            if not self._exchange.responding and not conn.closed:
                conn.transport.write(CONTINUE)
        if conn.reading_paused:
            conn.maybe_resume()
        limits = conn.limits
        timeout = limits.body_timeout
        self.slow = False
        if limits.request_min_rate:
            allowed = limits.body_grace + self.received / limits.request_min_rate - self.waited
            if allowed < timeout:
                timeout = max(allowed, 0.0)
                self.slow = True
        waiter = self.waiter = conn.loop.create_future()
        conn.body_waiting = self
        conn.arm(BODY, timeout)
        started = _monotonic()
        try:
            await waiter
        finally:
            self.waited += _monotonic() - started
            self.waiter = None
            conn.body_waiting = None
            conn.disarm(BODY)

    def fail(self, exc: BaseException) -> None:
        if self.error is None and not self.complete:
            self.error = exc
            self.wake()

    async def aclose(self) -> None:
        """Drop what is buffered and what still arrives (the connection closes after the response)."""
        self.discarded = True
        self.chunks.clear()
        self.buffered = 0


class Reframed:
    """Parser callbacks after an Upgrade request that carries a body (see `mesh.http.receive`).

    The fresh parser is first fed a synthetic head with the request's own
    framing; its callbacks are swallowed here. Then the body goes to the
    request, and later requests parse as on any connection.
    """

    __slots__ = ("conn", "priming")

    def __init__(self, conn: RequestReader) -> None:
        self.conn = conn
        self.priming = True

    def on_url(self, url: bytes) -> None:
        if not self.priming:
            self.conn.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.priming:
            self.conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.priming:
            self.priming = False
        else:
            self.conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self.conn.on_body(body)

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()
