"""Pooled HTTP/1.1 connections from a sidecar to its app and to peer sidecars.

A lean client on asyncio protocols and the llhttp parser (httptools): a
request is one write of its head (plus its body when it is small), and a
response whose body arrived with its head comes back as ``bytes``, its
connection already back in the pool. Larger bodies stream in both
directions with flow control, so memory stays bounded whatever the size.

Connections are pooled per `Endpoint`: address *and* TLS settings, so a
connection made for one identity is never reused for another. A
connection taken from the pool that turns out to be closed by the server
(the keep-alive race) is retried once on a fresh connection when the
request can be replayed.

Failures raise `UpstreamError`; two kinds are told apart, for retries and
outlier detection: `ConnectFailed` (no connection was made, so nothing
was sent) and `UpstreamTimeout` (no response head within the timeout).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import httptools

from .errors import UpstreamError
from .headers import HOP_BY_HOP
from .messages import Body, Response

__all__ = ["ConnectFailed", "Endpoint", "Limits", "Pool", "UpstreamTimeout"]

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
_INLINE_BODY = 16 * 1024  # bodies up to this size go out in the same write as the head
_NO_BODY_STATUS = frozenset({204, 304})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


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
    """Pool and timeout settings (seconds)."""

    max_idle_per_endpoint: int = 128
    idle_timeout: float = 30.0
    connect_timeout: float = 5.0
    response_timeout: float = 60.0
    body_timeout: float = 60.0


class _Connection(asyncio.Protocol):
    """One upstream connection, parsing responses as they arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._reset_message()

    def _reset_message(self) -> None:
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
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
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError(502, "upstream switched protocols unexpectedly"))
        except httptools.HttpParserError as exc:
            if self.head_only and self.head.done():
                return  # bytes after a HEAD response's head: the connection is closed anyway
            self._fail(UpstreamError(502, f"malformed response from upstream ({type(exc).__name__})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.until_eof and self.head.done() and not self.complete:
            self.on_message_complete()
        elif not self.complete:
            self._fail(UpstreamError(502, "upstream closed the connection"))
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

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): wait for the real one.
            self.headers = []
            self.reason = b""
            return
        self.status = status
        if not self.head_only and status not in _NO_BODY_STATUS:
            names = {n.lower() for n, _ in self.headers}
            self.until_eof = b"content-length" not in names and b"transfer-encoding" not in names
        if not self.head.done():
            self.head.set_result(None)
        if self.head_only:
            self.complete = True
            self.closed = True  # llhttp would wait for a body; never reuse this connection
            if self.transport is not None:
                self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:
            return  # end of an interim response
        self.complete = True
        # Ask now: llhttp forgets once the next message begins.
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # helpers

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
        if self.reading_paused and self.buffered < _LOW_WATER and self.transport:
            self.reading_paused = False
            self.transport.resume_reading()
        return chunk

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
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
                async with asyncio.timeout(self._timeout):
                    await conn.waiter
            except TimeoutError:
                self._done = True
                conn.close()
                raise UpstreamError(504, "upstream stopped sending the response body") from None
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


def _encode_head(method: str, target: str, headers: Any) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    head = "\r\n".join(lines)
    # SECURITY: a CR or LF inside a name or value would split the request (header injection).
    if head.count("\n") != len(lines) or head.count("\r") != len(lines) or "\x00" in head:
        raise ValueError("header names and values may not contain CR, LF or NUL")
    # Values came from the server's parser as UTF-8 with surrogate escapes: send the original bytes.
    return head.encode("utf-8", "surrogateescape")


class Pool:
    """Keep-alive connections to many endpoints, and the request/response exchange over them."""

    def __init__(self, limits: Limits | None = None,
                 verify_peer: Callable[[Endpoint, asyncio.BaseTransport], str | None] | None = None) -> None:
        self.limits = limits or Limits()
        self.verify_peer = verify_peer
        self._idle: dict[Endpoint, deque[_Connection]] = {}
        self._closing = False

    async def _connect(self, endpoint: Endpoint, timeout: float | None = None) -> _Connection:
        loop = asyncio.get_running_loop()
        limit = self.limits.connect_timeout if timeout is None else min(timeout, self.limits.connect_timeout)
        try:
            async with asyncio.timeout(limit):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), endpoint.host, endpoint.port,
                    ssl=endpoint.tls,
                    server_hostname=endpoint.peer if endpoint.tls else None,
                    ssl_handshake_timeout=self.limits.connect_timeout if endpoint.tls else None,
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
            conn.reused = True
            return conn
        return None

    def _release(self, endpoint: Endpoint, conn: _Connection) -> None:
        if (conn.closed or self._closing or conn.error is not None
                or not conn.keep_alive or conn.until_eof):
            conn.close()
            return
        idle = self._idle.setdefault(endpoint, deque())
        if len(idle) >= self.limits.max_idle_per_endpoint:
            conn.close()
            return
        conn._reset_message()  # llhttp itself is ready for the next message on this connection
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
    ) -> Response:
        """Send one request and return its response once the head has arrived.

        ``headers`` is sent as given (the caller removes hop-by-hop headers);
        framing headers are set here from ``body``: ``Content-Length`` for
        bytes, chunked for a stream without a length. ``timeout`` bounds the
        wait for the response head (default `Limits.response_timeout`) and,
        when shorter, the connect timeout. Raises `UpstreamError` (502 or
        504) when no response arrives: `ConnectFailed` when nothing was
        sent, `UpstreamTimeout` when the head did not come in time.
        """
        if isinstance(body, bytes):
            if body or method in _BODY_METHODS or "Content-Length" in headers:
                headers["Content-Length"] = str(len(body))
        elif "Content-Length" not in headers:
            headers["Transfer-Encoding"] = "chunked"
        head = _encode_head(method, target, headers)
        timeout = self.limits.response_timeout if timeout is None else timeout
        conn = self._acquire_idle(endpoint)
        if conn is not None:
            try:
                return await self._exchange(conn, endpoint, method, head, body, timeout)
            except UpstreamError:
                # The keep-alive race: the server closed the pooled connection as we reused it.
                if not (conn.closed and conn.status == 0 and isinstance(body, bytes)):
                    raise
        conn = await self._connect(endpoint, timeout)
        return await self._exchange(conn, endpoint, method, head, body, timeout)

    async def _exchange(self, conn: _Connection, endpoint: Endpoint, method: str,
                        head: bytes, body: Body, timeout: float) -> Response:
        conn.head_only = method == "HEAD"
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
                    await self._send_stream(conn, body, chunked=b"chunked" in head.lower())
            except (ConnectionError, UpstreamError) as exc:
                # The upstream may have answered early (413, 401) and closed: use its answer.
                if not conn.head.done() or conn.head.exception() is not None:
                    reason = exc.reason if isinstance(exc, UpstreamError) else "upstream closed the connection"
                    raise UpstreamError(502, reason) from None
                conn.closed = True
            if not conn.head.done():
                # A plain timer, not asyncio.timeout(): this wait is on every request's path.
                timer = conn.loop.call_later(timeout, conn.time_out, timeout)
                try:
                    await conn.head
                finally:
                    timer.cancel()
            conn.head.result()
        except BaseException:
            # Half a request went out (or none came back): this connection is done for.
            conn.close()
            raise
        return self._response(conn, endpoint)

    async def _send_stream(self, conn: _Connection, body: AsyncIterable[bytes], chunked: bool) -> None:
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
                async with asyncio.timeout(self.limits.body_timeout):
                    await conn.drain()
        if chunked:
            transport.write(b"0\r\n\r\n")

    def _response(self, conn: _Connection, endpoint: Endpoint) -> Response:
        headers: list[tuple[str, str]] = []
        connection_tokens: set[str] = set()
        for raw_name, raw_value in conn.headers:
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
        reason = conn.reason.decode("latin-1")
        status = conn.status
        body: Body
        if conn.complete:
            body = b"".join(conn.chunks)
            conn.chunks.clear()
            conn.buffered = 0
            self._release(endpoint, conn)
        else:
            body = _BodyStream(conn, self, endpoint, self.limits.body_timeout)
        return Response(status, body, headers, reason=reason)

    async def close(self) -> None:
        """Close every idle connection; connections in use close when released."""
        self._closing = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
        self._idle.clear()


class Upgraded(NamedTuple):
    """An open upstream WebSocket and the session that owns it (closed with it)."""

    ws: Any
    session: Any


_WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                           "sec-websocket-protocol", "host", "content-length"})


async def connect_websocket(endpoint: Endpoint, target: str, headers: Any,
                            timeout: float) -> Response:
    """Open a WebSocket to ``endpoint``; a 101 `Response` carrying it, or the refusal."""
    import aiohttp

    scheme = "wss" if endpoint.tls else "ws"
    url = f"{scheme}://{endpoint.host}:{endpoint.port}{target}"
    protocols = [p.strip() for p in headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    forward = {k: v for k, v in headers.items() if k.lower() not in _WS_HANDSHAKE}
    forward["Host"] = headers.get("Host", endpoint.host)
    session = aiohttp.ClientSession(auto_decompress=False)
    try:
        ws = await session.ws_connect(
            url, headers=forward, protocols=protocols, ssl=endpoint.tls or False,
            server_hostname=endpoint.peer if endpoint.tls else None,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=timeout),
            autoping=True, max_msg_size=0)
    except aiohttp.WSServerHandshakeError as exc:
        await session.close()
        return Response(exc.status, f"{exc.status} upstream refused the WebSocket upgrade\n")
    except (aiohttp.ClientError, OSError) as exc:
        await session.close()
        raise UpstreamError(502, f"cannot open a WebSocket upstream: {type(exc).__name__}") from None
    response = Response(101)
    response._upgrade = Upgraded(ws, session)
    return response
