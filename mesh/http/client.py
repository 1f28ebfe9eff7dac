"""Pooled HTTP/1.1 connections from a sidecar to its app and to peer sidecars.

A lean client on asyncio protocols and the llhttp parser (httptools; each
connection is a `mesh.http.upstream.UpstreamConnection`): a request is one
write of its head (plus its body when it is small), and a response whose
body arrived with its head comes back as ``bytes``, its connection already
back in the pool. Larger bodies stream in both
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
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from mesh.errors import UpstreamError
from mesh.http.framing import encode_head, write_body
from mesh.http.upstream import Informational, UpstreamConnection, UpstreamTimeout, decode_headers
from mesh.http.websocket import check_switch
from mesh.messages import Body, Response

__all__ = ["ConnectFailed", "Endpoint", "IDEMPOTENT", "Informational", "Limits", "Pool", "UpstreamTimeout"]

_INLINE_BODY = 16 * 1024  # bodies up to this size go out in the same write as the head
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

# RFC 9110 §9.2.2: a request with one of these may be sent again with the same effect.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class ConnectFailed(UpstreamError):
    """No connection to the upstream (refused, unreachable, TLS or identity refused): nothing was sent."""


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


class _BodyStream:
    """The rest of a response body, read as the consumer asks for it; then its connection goes back to the pool."""

    __slots__ = ("_conn", "_pool", "_endpoint", "_done")

    def __init__(self, conn: UpstreamConnection, pool: Pool, endpoint: Endpoint) -> None:
        self._conn = conn
        self._pool = pool
        self._endpoint = endpoint
        self._done = False

    def __aiter__(self) -> _BodyStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._conn.next_chunk()
        except StopAsyncIteration:
            if not self._done:
                self._done = True
                self._pool._release(self._endpoint, self._conn)
            raise
        except UpstreamError:
            self._done = True  # the connection is closed already
            raise

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._conn.close()


def _may_send_again(exc: UpstreamError, conn: UpstreamConnection, method: str, body: Body) -> bool:
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
        self._idle: dict[Endpoint, deque[UpstreamConnection]] = {}
        self._closing = False

    async def _connect(self, endpoint: Endpoint, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        limits = self.limits
        try:
            async with asyncio.timeout(min(timeout, limits.connect_timeout)):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(loop, limits), endpoint.host, endpoint.port,
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

    def _acquire_idle(self, endpoint: Endpoint) -> UpstreamConnection | None:
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

    def _release(self, endpoint: Endpoint, conn: UpstreamConnection) -> None:
        if (conn.closed or self._closing or conn.error is not None or not conn.keep_alive
                or conn.until_eof or not conn.reusable):
            conn.close()
            return
        idle = self._idle.setdefault(endpoint, deque())
        if len(idle) >= self.limits.max_idle_per_endpoint:
            conn.close()
            return
        conn.reset_message()  # llhttp itself is ready for the next message on this connection
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
        length: int | None = None  # of a streamed body: exactly this many bytes go out, else chunked
        if isinstance(body, bytes):
            if body or method in _BODY_METHODS or "Content-Length" in headers:
                headers["Content-Length"] = str(len(body))
        else:
            given = headers.get("Content-Length")
            if given is not None and given.isdigit() and given.isascii():
                length = int(given)
            else:
                if given is not None:
                    del headers["Content-Length"]  # not a length: send the stream chunked instead
                headers["Transfer-Encoding"] = "chunked"
        head = encode_head(f"{method} {target} HTTP/1.1", headers.items())
        limits = self.limits
        if timeout is None:
            timeout = limits.response_timeout
        idle = limits.stream_idle_timeout if idle_timeout is None else idle_timeout
        if "Upgrade" in headers:
            return await self._switch_protocols(endpoint, method, head, headers, body, length, timeout, idle,
                                              informational)
        conn = self._acquire_idle(endpoint)
        if conn is not None:
            loop = conn.loop
            deadline = loop.time() + timeout
            try:
                await self._exchange(conn, method, head, body, length, deadline, timeout, idle, informational)
                return self._response(conn, endpoint)
            except UpstreamError as exc:
                if not _may_send_again(exc, conn, method, body):
                    raise
        else:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
        conn = await self._connect(endpoint, deadline - loop.time())
        await self._exchange(conn, method, head, body, length, deadline, timeout, idle, informational)
        return self._response(conn, endpoint)

    async def _exchange(self, conn: UpstreamConnection, method: str, head: bytes, body: Body, length: int | None,
                        deadline: float, timeout: float, idle: float, informational: Informational | None) -> None:
        """Send the request on ``conn`` and wait for its response head until ``deadline`` (loop time)."""
        conn.head_only = method == "HEAD"
        conn.informational = informational
        conn.idle_timeout = idle
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
                    try:
                        await write_body(transport, conn, body, length is None, length)
                    except ValueError as exc:
                        # SECURITY: a body longer or shorter than the Content-Length sent would leave the
                        # upstream reading our next request as part of this one, or this one's rest as
                        # the next: the connection goes (the BaseException branch below), never reused.
                        raise UpstreamError(502, f"the request {exc}") from None
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

    def _response(self, conn: UpstreamConnection, endpoint: Endpoint) -> Response:
        headers = decode_headers(conn.raw_headers)
        reason = conn.reason.decode("latin-1")
        status = conn.status
        body: Body
        if conn.complete:
            if conn.head_only:
                if conn.chunks:
                    conn.keep_alive = False  # bytes after a HEAD response's head: a broken upstream
                conn.take_all()
                body = b""
            else:
                body = conn.take_all()
            self._release(endpoint, conn)
        else:
            body = _BodyStream(conn, self, endpoint)
        return Response(status, body, headers, reason=reason)

    async def _switch_protocols(self, endpoint: Endpoint, method: str, head: bytes, headers: Any, body: Body,
                                length: int | None, timeout: float, idle: float,
                                informational: Informational | None) -> Response:
        """An Upgrade request, on a connection of its own: a `Tunnel` on a valid 101, else the answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        conn = await self._connect(endpoint, timeout)
        conn.upgrade = True
        conn.reusable = False  # whatever the answer, this connection asked to become something else
        await self._exchange(conn, method, head, body, length, deadline, timeout, idle, informational)
        if conn.status != 101:
            return self._response(conn, endpoint)
        tunnel = conn.tunnel
        problem = check_switch(conn.raw_headers, headers.get("Sec-WebSocket-Key"))
        if tunnel is None or conn.error is not None:
            problem = problem or "upstream switched protocols and closed"
        if problem:
            conn.close()
            raise UpstreamError(502, problem)
        response = Response(101, b"", decode_headers(conn.raw_headers), reason=conn.reason.decode("latin-1"))
        response._upgrade = tunnel
        return response

    def idle(self) -> dict[Endpoint, int]:
        """How many connections are kept alive for reuse, by endpoint (for ``/metrics``)."""
        return {endpoint: len(conns) for endpoint, conns in self._idle.items() if conns}

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
