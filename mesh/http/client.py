"""Pooled HTTP/1.1 connections from a sidecar to its app and to peer sidecars.

A lean client on asyncio protocols and the llhttp parser (httptools): a
request is one write of its head (plus its body when it is small), and a
response whose body arrived with its head comes back as ``bytes``, its
connection already back in the pool. Larger bodies stream in both
directions with flow control, so memory stays bounded whatever the size.

Connections are pooled per `Endpoint`: address *and* TLS settings, so a
connection made for one identity is never reused for another. A pooled
connection that sees bytes while idle is retired, never read as the
answer to the next request.

**Sending again.** A request on a pooled connection that the server closes
before any byte of an answer (the keep-alive race: it closed the idle
connection as we reused it) is sent once more on a fresh connection, but
only as RFC 9112 §9.3.1.1 allows: an idempotent method (GET HEAD OPTIONS
TRACE PUT DELETE) and a body we still hold. A POST may have reached the app
and acted; it gets the 502. Nothing is sent again after a timeout, and a
second try gets what is left of the request's one deadline: a timeout
fires once, at its value.

**What comes back is checked.** A status outside 100–599, a response head
over `Limits.max_head_bytes` or `Limits.max_headers` (refused as soon as it
passes the cap, never buffered to its end), or a 101 nobody asked for is a
502. Interim responses (1xx) go to the request's ``informational``
callback as they arrive, except 100 Continue (the listener answers
``Expect`` itself). A body that breaks off raises `UpstreamError` from its
iterator, so the listener aborts its client's response instead of
completing it: a connection that ends before the last chunk or before the
``Content-Length``, or a close-delimited body ended by a reset rather than
a clean FIN. Between two chunks a body may be quiet for ``idle_timeout``
seconds (per request: the sidecar gives the service's or route's
``stream_idle_timeout``); past it, the stream is cut.

**Upgrades.** A request carrying ``Upgrade`` (a WebSocket handshake, with
exactly the headers the chain produced) goes out on a connection of its
own. A 101 that answers it (``Upgrade: websocket`` and the right
``Sec-WebSocket-Accept`` for the key sent) comes back as a `Response`
whose ``_upgrade`` is a `Tunnel`; any other answer is an ordinary response.

Failures raise `UpstreamError`; two kinds are told apart, for retries and
outlier detection: `ConnectFailed` (no connection was made, so nothing
was sent) and `UpstreamTimeout` (no response head within the timeout).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import httptools

from mesh.errors import UpstreamError
from mesh.http.framing import HIGH_WATER, LOW_WATER, NO_BODY_STATUS, encode_head
from mesh.http.headers import HOP_BY_HOP
from mesh.http.websocket import Tunnel, check_switch
from mesh.messages import Body, Response

__all__ = ["ConnectFailed", "Endpoint", "IDEMPOTENT", "Informational", "Limits", "Pool", "UpstreamTimeout"]

log = logging.getLogger("mesh.upstream")

_INLINE_BODY = 16 * 1024  # bodies up to this size go out in the same write as the head
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# RFC 9110 §9.2.2: a request with one of these may be sent again with the same effect.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

# Called with each interim (1xx) response as it arrives: status, reason, headers (hop-by-hop removed).
Informational = Callable[[int, str, list[tuple[str, str]]], None]


class ConnectFailed(UpstreamError):
    """No connection to the upstream (refused, unreachable, TLS or identity refused): nothing was sent."""


class UpstreamTimeout(UpstreamError):
    """The request went out and no response head came back in time (504)."""


class Endpoint(NamedTuple):
    """Where to connect, and how: the key of a connection pool.

    With ``tls``, ``peer`` is who must answer: the pool's ``verify_peer``
    checks it against the certificate after the handshake.
    """

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    peer: str | None = None


@dataclass(frozen=True)
class Limits:
    """Pool, timeout and size settings (seconds, bytes).

    ``response_timeout`` bounds the wait for a response head and
    ``stream_idle_timeout`` the quiet between two chunks of a body (and of
    a tunnel; 0: no bound) when a request does not give its own. A
    response head is refused (502) past ``max_head_bytes`` or ``max_headers``.
    """

    max_idle_per_endpoint: int = 128
    idle_timeout: float = 30.0
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    stream_idle_timeout: float = 300.0
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the reason is in ``_Connection.refusal``."""


def _decode(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
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


class _Connection(asyncio.Protocol):
    """One upstream connection, parsing responses as they arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: Limits) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.max_head = limits.max_head_bytes
        self.max_headers = limits.max_headers
        self.closed = False
        self.idle = False  # in the pool: no request is waiting for what arrives
        self.reusable = True
        self.upgrade = False  # the request asks to switch protocols: a 101 may answer it
        self.idle_timeout = 0.0  # ... and the tunnel it makes goes quiet for at most this long
        self.tunnel: Tunnel | None = None
        self.informational: Informational | None = None
        self.refusal: str | None = None
        self.idle_since = 0.0
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._reset_message()

    def _reset_message(self) -> None:
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0  # bytes of the head parsed so far
        self.pending = 0  # bytes read while the head is incomplete
        self.started = False  # some of an answer came (an interim response, or part of a head)
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: BaseException | None = None
        self.until_eof = False
        self.head_only = False  # a HEAD request: no body follows the head
        self.waiter: asyncio.Future[None] | None = None
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
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("upstream closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("upstream closed the connection")
        if self._write_paused:
            self._drain = self.loop.create_future()
            await self._drain

    # httptools callbacks

    def on_status(self, status: bytes) -> None:
        self.reason += status
        self.head_size += len(status)

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self.headers
        headers.append((name, value))
        # llhttp has no limit of its own on a head's size: count as we go.
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            self._refuse(f"the response head from upstream passed {self.max_head} bytes")
        if len(headers) > self.max_headers:
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
            names = {n.lower() for n, _ in self.headers}
            self.until_eof = b"content-length" not in names and b"transfer-encoding" not in names
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0 or self.head_only:
            return  # the end of an interim response, or of what llhttp took for a HEAD's body
        self.complete = True
        # Ask now: llhttp forgets once the next message begins.
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # helpers

    def _refuse(self, reason: str) -> None:
        """From a parser callback: stop parsing; the request fails with 502 and ``reason``."""
        self.refusal = reason
        raise _Refused(reason)

    def _interim(self, status: int) -> None:
        """An interim response (1xx) is complete: pass it on, then wait for the final one."""
        self.started = True
        informational = self.informational
        if status != 100 and informational is not None:
            try:
                informational(status, self.reason.decode("latin-1"), _decode(self.headers))
            except Exception:
                log.exception("passing on an interim %d response failed", status)
        self.headers = []
        self.reason = b""
        self.head_size = 0
        self.pending = 0

    def _keeps_alive(self, version: str) -> bool:
        """Whether a response without a body leaves the connection open (RFC 9112 §9.3)."""
        tokens: set[bytes] = set()
        for name, value in self.headers:
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

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self.closed = True
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # mark retrieved: the sender may be gone
        self._wake()
        if self.transport is not None:
            self.transport.close()

    def time_out(self, timeout: float) -> None:
        """No response head within ``timeout`` seconds: fail the wait for it."""
        if not self.head.done():
            self.head.set_exception(UpstreamTimeout(504, f"upstream did not answer within {timeout:.3g}s"))

    def take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.reading_paused and self.buffered < LOW_WATER and self.transport:
            self.reading_paused = False
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.closed = True
        if self.tunnel is not None:
            self.tunnel.close()
        elif self.transport is not None:
            self.transport.close()


class _BodyStream:
    """The rest of a response body, read as the consumer asks for it."""

    __slots__ = ("_conn", "_pool", "_endpoint", "_timeout", "_done")

    def __init__(self, conn: _Connection, pool: Pool, endpoint: Endpoint, timeout: float) -> None:
        self._conn = conn
        self._pool = pool
        self._endpoint = endpoint
        self._timeout = timeout
        self._done = False

    def __aiter__(self) -> _BodyStream:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        while True:
            if conn.chunks:
                return conn.take()
            if conn.complete:
                self._finish()
                raise StopAsyncIteration
            if conn.error is not None:
                self._done = True
                raise conn.error
            conn.waiter = conn.loop.create_future()
            try:
                async with asyncio.timeout(self._timeout or None):
                    await conn.waiter
            except TimeoutError:
                self._done = True
                conn.close()
                raise UpstreamError(504, f"upstream sent nothing of the response body for "
                                         f"{self._timeout:g}s") from None
            finally:
                conn.waiter = None

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._pool._release(self._endpoint, self._conn)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._conn.close()


def _may_send_again(exc: UpstreamError, conn: _Connection, method: str, body: Body) -> bool:
    """Whether a request that failed on a reused connection may go out again (RFC 9112 §9.3.1.1).

    Only when the server closed the connection before any byte of an answer (the keep-alive race),
    the method is idempotent and the body is still in hand; never after a timeout, which would
    give the request its timeout twice.
    """
    return (not isinstance(exc, UpstreamTimeout) and not conn.started and conn.status == 0
            and method in IDEMPOTENT and isinstance(body, bytes))


class Pool:
    """Keep-alive connections to many endpoints, and the request/response exchange over them."""

    def __init__(self, limits: Limits | None = None,
                 verify_peer: Callable[[Endpoint, asyncio.BaseTransport], str | None] | None = None) -> None:
        self.limits = limits or Limits()
        self.verify_peer = verify_peer
        self._idle: dict[Endpoint, deque[_Connection]] = {}
        self._closing = False

    async def _connect(self, endpoint: Endpoint, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        limits = self.limits
        try:
            async with asyncio.timeout(min(timeout, limits.connect_timeout)):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, limits), endpoint.host, endpoint.port,
                    ssl=endpoint.tls,
                    server_hostname=endpoint.peer if endpoint.tls else None,
                    ssl_handshake_timeout=limits.connect_timeout if endpoint.tls else None,
                )
        except TimeoutError:
            raise ConnectFailed(504, f"timed out connecting to {endpoint.host}:{endpoint.port}") from None
        except ssl.SSLError as exc:
            raise ConnectFailed(502, f"TLS handshake with {endpoint.host}:{endpoint.port} failed: "
                                     f"{exc.reason or exc}") from None
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConnectFailed(502, f"cannot connect to {endpoint.host}:{endpoint.port}: {reason.lower()}") from None
        if endpoint.tls is not None and self.verify_peer is not None:
            assert conn.transport is not None
            problem = self.verify_peer(endpoint, conn.transport)
            if problem:
                conn.close()
                raise ConnectFailed(502, problem)
        return conn

    def _acquire_idle(self, endpoint: Endpoint) -> _Connection | None:
        idle = self._idle.get(endpoint)
        if not idle:
            return None
        expiry = time.monotonic() - self.limits.idle_timeout
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if conn.idle_since < expiry:
                conn.close()
                continue
            conn.idle = False
            return conn
        return None

    def _release(self, endpoint: Endpoint, conn: _Connection) -> None:
        if (conn.closed or self._closing or conn.error is not None or not conn.keep_alive
                or conn.until_eof or not conn.reusable):
            conn.close()
            return
        idle = self._idle.setdefault(endpoint, deque())
        if len(idle) >= self.limits.max_idle_per_endpoint:
            conn.close()
            return
        conn._reset_message()  # llhttp itself is ready for the next message on this connection
        conn.idle = True
        conn.idle_since = time.monotonic()
        idle.append(conn)

    async def request(
        self,
        endpoint: Endpoint,
        method: str,
        target: str,
        headers: Any,
        body: Body = b"",
        *,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        informational: Informational | None = None,
    ) -> Response:
        """Send one request and return its response once the head has arrived.

        ``headers`` is sent as given (the caller removes hop-by-hop headers,
        except a WebSocket ``Upgrade``); framing headers are set here from
        ``body``: ``Content-Length`` for bytes, chunked for a stream without
        a length. ``timeout`` bounds everything until the response head,
        connecting included (default `Limits.response_timeout`), once;
        ``idle_timeout`` the quiet between body chunks (or in a tunnel)
        after it (default `Limits.stream_idle_timeout`). ``informational``
        gets each interim response but 100 Continue as it arrives. Raises
        `UpstreamError` (502 or 504) when no response arrives:
        `ConnectFailed` when nothing was sent, `UpstreamTimeout` when the
        head did not come in time.
        """
        if isinstance(body, bytes):
            if body or method in _BODY_METHODS or "Content-Length" in headers:
                headers["Content-Length"] = str(len(body))
        elif "Content-Length" not in headers:
            headers["Transfer-Encoding"] = "chunked"
        head = encode_head(f"{method} {target} HTTP/1.1", headers.items())
        limits = self.limits
        if timeout is None:
            timeout = limits.response_timeout
        idle = limits.stream_idle_timeout if idle_timeout is None else idle_timeout
        if "Upgrade" in headers:
            return await self._switch_protocols(endpoint, method, head, headers, body, timeout, idle, informational)
        conn = self._acquire_idle(endpoint)
        if conn is not None:
            loop = conn.loop
            deadline = loop.time() + timeout
            try:
                await self._exchange(conn, method, head, body, deadline, timeout, idle, informational)
                return self._response(conn, endpoint, idle)
            except UpstreamError as exc:
                if not _may_send_again(exc, conn, method, body):
                    raise
        else:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
        conn = await self._connect(endpoint, deadline - loop.time())
        await self._exchange(conn, method, head, body, deadline, timeout, idle, informational)
        return self._response(conn, endpoint, idle)

    async def _exchange(self, conn: _Connection, method: str, head: bytes, body: Body, deadline: float,
                        timeout: float, idle: float, informational: Informational | None) -> None:
        """Send the request on ``conn`` and wait for its response head until ``deadline`` (loop time)."""
        conn.head_only = method == "HEAD"
        conn.informational = informational
        transport = conn.transport
        assert transport is not None
        try:
            try:
                if isinstance(body, bytes):
                    transport.write(head + body if len(body) <= _INLINE_BODY else head)
                    if len(body) > _INLINE_BODY:
                        transport.write(body)
                else:
                    transport.write(head)
                    await self._send_stream(conn, body, b"chunked" in head.lower(), idle)
            except (ConnectionError, UpstreamError) as exc:
                # The upstream may have answered early (413, 401) and closed: use its answer.
                if not conn.head.done() or conn.head.exception() is not None:
                    reason = exc.reason if isinstance(exc, UpstreamError) else "upstream closed the connection"
                    raise UpstreamError(502, reason) from None
                conn.closed = True
            if not conn.head.done():
                # A plain timer, not asyncio.timeout(): this wait is on every request's path.
                timer = conn.loop.call_at(deadline, conn.time_out, timeout)
                try:
                    await conn.head
                finally:
                    timer.cancel()
            conn.head.result()
        except BaseException:
            # Half a request went out (or none came back): this connection is done for.
            conn.close()
            raise

    async def _send_stream(self, conn: _Connection, body: AsyncIterable[bytes], chunked: bool,
                           idle: float) -> None:
        transport = conn.transport
        assert transport is not None
        async for chunk in body:
            if conn.closed:
                raise ConnectionResetError("upstream closed the connection")
            if not chunk:
                continue
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            if conn._write_paused:
                try:
                    async with asyncio.timeout(idle or None):
                        await conn.drain()
                except TimeoutError:
                    raise UpstreamError(504, f"upstream read nothing of the request body for {idle:g}s") from None
        if chunked:
            transport.write(b"0\r\n\r\n")

    def _response(self, conn: _Connection, endpoint: Endpoint, idle: float) -> Response:
        headers = _decode(conn.headers)
        reason = conn.reason.decode("latin-1")
        status = conn.status
        body: Body
        if conn.complete:
            if conn.head_only:
                if conn.chunks:
                    conn.keep_alive = False  # bytes after a HEAD response's head: a broken upstream
                body = b""
            else:
                body = b"".join(conn.chunks)
            conn.chunks.clear()
            conn.buffered = 0
            self._release(endpoint, conn)
        else:
            body = _BodyStream(conn, self, endpoint, idle)
        return Response(status, body, headers, reason=reason)

    async def _switch_protocols(self, endpoint: Endpoint, method: str, head: bytes, headers: Any, body: Body,
                                timeout: float, idle: float, informational: Informational | None) -> Response:
        """An Upgrade request, on a connection of its own: a `Tunnel` on a valid 101, else the answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = await self._connect(endpoint, timeout)
        conn.upgrade = True
        conn.idle_timeout = idle
        conn.reusable = False  # whatever the answer, this connection asked to become something else
        await self._exchange(conn, method, head, body, deadline, timeout, idle, informational)
        if conn.status != 101:
            return self._response(conn, endpoint, idle)
        tunnel = conn.tunnel
        problem = check_switch(conn.headers, headers.get("Sec-WebSocket-Key"))
        if tunnel is None or conn.error is not None:
            problem = problem or "upstream switched protocols and closed"
        if problem:
            conn.close()
            raise UpstreamError(502, problem)
        response = Response(101, b"", _decode(conn.headers), reason=conn.reason.decode("latin-1"))
        response._upgrade = tunnel
        return response

    def close_idle(self) -> None:
        """Close every kept-alive connection; the pool stays open for new ones."""
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()

    async def close(self) -> None:
        """Close every idle connection; connections in use close when released."""
        self._closing = True
        self.close_idle()
