"""HTTP/1.1 listeners: our own asyncio protocol on llhttp (httptools), serving mesh `Request`s.

A `Listener` accepts connections; each is one `_Connection`, an
``asyncio.Protocol`` that parses requests with llhttp in its strict default
mode (no leniency flags), refuses what a proxy must not pass on, builds a
`Request` (`mesh.http.receive`), awaits the handler and writes its
`Response` back (`mesh.http.respond`), streaming bodies with flow control
both ways. Requests on a connection are served one at a time and in order
(keep-alive, pipelining). A WebSocket handshake is checked here; once the
handler's upstream answered it with a 101, the 101 goes to the client and
the two connections become one byte tunnel (`mesh.http.websocket.Tunnel`).
A proxy's listener (``proxy=True``) takes CONNECT requests too: once the
handler answers one with a 2xx carrying a tunnel to the host it names, the
connection becomes the same kind of tunnel.
Interim responses (103 Early Hints, ...) that arrive before the final one
are written to HTTP/1.1 clients as they come.

Limits keep a slow or hostile client from holding a connection
(`ServerLimits`, `mesh.http.limits`): header, idle and body timeouts, a
minimum body rate and caps on the request head. A timeout is one deadline
per connection, set on state changes and checked by one sweep per listener
a few times a second: no timer and no ``asyncio.timeout()`` per request.

Errors are our own short plain-text bodies (`mesh.chain.short_error`): no
library banner, no echo of the request.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from time import monotonic
from typing import Any

from mesh.chain import short_error
from mesh.errors import ClientTimeout
from mesh.http.exchange import ClientGone, Exchange, RequestBody
from mesh.http.framing import LOW_WATER
from mesh.http.limits import HEAD, IDLE, LINGERING, Deadline, ServerLimits, Sweep
from mesh.http.receive import RequestReader
from mesh.http.respond import ResponseWriter
from mesh.messages import Request, Response

try:
    import httptools
except ImportError:  # pragma: no cover - a dependency; check_parser() says so at start
    httptools = None  # type: ignore[assignment]

__all__ = ["ClientGone", "Listener", "ServerLimits", "check_parser"]

log = logging.getLogger("mesh.server")

# The handler gets the Request and the connection (whose ``.transport`` gives the peer certificate).
RequestHandler = Callable[[Request, Any], Awaitable[Response]]
RequestDone = Callable[[Request, Response, float, float, int, int], None]

_LINGER = 2.0  # seconds to read and drop what a client still sends after the response that ends it
_LAST_CALL = 2.0  # seconds a connection without a request yet has for its head once its listener stops


def check_parser() -> None:
    """Refuse to serve unless every HTTP parser in the process is a C one.

    The listeners parse with llhttp (httptools, a C extension with no Python
    fallback). The sidecar itself never imports aiohttp, but a plugin may, and
    its pure-Python parser (``AIOHTTP_NO_EXTENSIONS``) accepts request-smuggling
    inputs (bare LF, obs-fold, conflicting lengths in some versions) that
    llhttp rejects: listeners start after the plugins, so this sees theirs.
    """
    http_parser = sys.modules.get("aiohttp.http_parser")
    if http_parser is not None and \
            getattr(http_parser, "HttpRequestParserC", None) is not http_parser.HttpRequestParser:
        raise RuntimeError(
            "aiohttp is running without its C HTTP parser (AIOHTTP_NO_EXTENSIONS set, or built "
            "without extensions); the sidecar will not serve on the pure-Python parser"
        )
    if httptools is None or not hasattr(httptools, "HttpRequestParser"):
        raise RuntimeError("httptools (llhttp) is not installed; the sidecar has no HTTP parser to serve with")


class _Connection(Deadline, ResponseWriter, RequestReader, asyncio.Protocol):
    """One client connection: llhttp parses, the handler serves requests in order, one at a time.

    Its parts are mixins over this one state: `RequestReader` reads,
    `ResponseWriter` answers, `Deadline` holds its one timeout.

    Parsing runs ahead of serving: a pipelined request is parsed while the
    one before it is served, then waits in ``queue`` with reading paused. One
    serving task per connection takes them in turn; after each response the
    connection is kept, or closed (lingering a moment when the client may
    still be sending, so the kernel does not reset the response).
    """

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.limits = listener.limits
        self.handler = listener.handler
        self.max_head = listener.limits.max_header_bytes
        self.max_headers = listener.limits.max_headers
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: Any = None  # None once we stop parsing: refused, lingering, or past an Upgrade
        self.client = ""
        self.scheme = listener.scheme
        # What the handler learned of the peer, for the connection's later requests (a TLS peer's
        # certificate does not change on a connection): empty until the handler sets it.
        self.peer: tuple[Any, ...] = ()
        self.closed = False
        self.deadline = 0.0  # time.monotonic(); 0: none
        self.deadline_kind = 0
        # the message being parsed
        self.in_head = False
        self.url = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.underscored = False  # a header name in the head being parsed may have '_'
        self.head_size = 0
        self.head_pending = 0
        self.refusal: tuple[int, str] | None = None
        self.receiving: Exchange | None = None  # whose body llhttp is delivering
        self.last: Exchange | None = None
        # serving
        self.queue: deque[Exchange] = deque()
        self.task: asyncio.Task[None] | None = None  # the serving task, from the first request on
        self.wakeup: asyncio.Future[None] | None = None  # what that task waits on between requests
        self.busy = False  # a request is being served (or waits its turn)
        self.fresh = True  # no request has arrived on it yet
        self.handling = False  # ... and its handler is running
        self.body_waiting: RequestBody | None = None
        self.reading_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        # bytes after a WebSocket handshake head, until the tunnel takes them (or the upgrade is refused)
        self.ws_buffer: bytearray | None = None
        self.websocket = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)  # SECURITY: strict llhttp: no leniencies set
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else ""
        self.arm(HEAD, self.limits.header_timeout)  # also for a connection that never sends a byte
        self.listener._opened(self)

    # (No eof_received: as in nginx, a client's EOF means it left. The transport closes and
    # connection_lost cancels the work in flight; a half-closed client gets no answer.)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener._closed(self)
        if self.receiving is not None and self.receiving.body is not None:
            self.receiving.body.fail(ClientGone("the client closed the connection before the end of its body"))
        self.drain_lost("the client closed the connection")
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)  # the idle serving task ends
        if self.task is not None and self.handling:
            self.task.cancel()  # nobody is waiting for this answer: stop the work behind it

    # serving

    def dispatch(self, exchange: Exchange) -> None:
        self.fresh = False
        self.queue.append(exchange)
        if self.busy:
            self.pause()  # one request at a time: hold the next ones (and the socket) until it is done
            return
        self.busy = True
        self.deadline = 0.0
        self.deadline_kind = 0
        wakeup = self.wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)
        else:
            self.task = self.loop.create_task(self._serve())

    async def _serve(self) -> None:
        """Serve queued requests in order, then wait for the next: one task for the connection's life.

        (Cheaper than a task per request; the task waits on a future between requests.)
        """
        try:
            while True:
                exchange = self.queue.popleft()
                if self.reading_paused:
                    self.maybe_resume()
                keep = await self._run(exchange)
                if not keep or self.closed:
                    self._hang_up()
                    return
                if self.queue:
                    continue
                self.busy = False
                if self.listener.stopping:
                    self.transport.close()
                    return
                if self.in_head:
                    self.arm(HEAD, self.limits.header_timeout)
                else:
                    self.arm(IDLE, self.limits.idle_timeout)
                waiter = self.wakeup = self.loop.create_future()
                await waiter  # dispatch, or connection_lost
                self.wakeup = None
                if self.closed:
                    return
        except asyncio.CancelledError:
            self._abort()  # the client left, or stop() gave up waiting
        except Exception:
            log.exception("%s listener: serving a connection failed", self.listener.name)
            self._abort()
        finally:
            self.busy = False

    async def _run(self, exchange: Exchange) -> bool:
        """Serve one request; True to keep the connection for the next."""
        if exchange.refusal is not None:
            return await self._respond(exchange, short_error(*exchange.refusal))
        request = exchange.request
        assert request is not None
        try:
            body = exchange.body
            limit = self.limits.request_buffer
            if (body is not None and limit and not exchange.upgrade
                    and int(request.headers.get("Content-Length", 0)) <= limit):
                # Small bodies arrive in full before the app is involved: a slow client
                # holds a sidecar connection, never one of the app's workers.
                try:
                    data = await body.fill(limit)
                except ClientTimeout as exc:
                    return await self._respond(exchange, short_error(408, str(exc), request.id))
                if data is not None:
                    request.body = data
            if exchange.version == "1.1":
                request._interim = self._interim  # HTTP/1.0 clients know no interim responses
            self.handling = True
            try:
                response = await self.handler(request, self)
                if not isinstance(response, Response):
                    raise TypeError(f"the handler returned {type(response).__name__}, not a Response")
            except Exception as exc:
                log.error("request %s: the %s listener's handler raised", request.id, self.listener.name,
                          exc_info=exc)
                response = short_error(500, "internal error", request.id)
            finally:
                self.handling = False
            if exchange.bad_body:
                await response.aclose()
                response = short_error(400, "malformed request body", request.id)
            done = self.listener.on_done
            answered = monotonic() if done is not None else 0.0
            keep = await self._respond(exchange, response)
            if done is not None:
                body = exchange.body
                done(request, response, exchange.started, answered, body.received if body is not None else 0,
                     exchange.sent)
            return keep
        finally:
            if not isinstance(request.body, bytes):
                await request.aclose()

    def _hang_up(self) -> None:
        """Close after the last response, lingering if the client may still be sending.

        Closing a socket with unread input makes the kernel answer with a
        reset, which can destroy our response before the client reads it. So
        when the client was cut off mid-request, we send FIN (where TLS
        allows it), read and drop its bytes for a moment, then close.
        """
        transport = self.transport
        if self.closed or transport.is_closing():
            return
        unread = self.parser is None or self.in_head or self.queue or self.receiving is not None
        if not unread:
            transport.close()
            return
        self.parser = None
        self.ws_buffer = None
        self.receiving = None
        self.queue.clear()
        if transport.can_write_eof():
            transport.write_eof()
        self.arm(LINGERING, _LINGER)
        self._resume()

    def _abort(self) -> None:
        """Cut the connection, unless it is closing already (what it is sending may be a last word)."""
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.abort()

    # flow control

    def pause(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def maybe_resume(self) -> None:
        """Resume reading unless something still holds it: a waiting request, a full body buffer, a refusal."""
        if self.queue or self.parser is None:
            return
        exchange = self.receiving
        if exchange is not None and exchange.body.buffered > LOW_WATER:  # type: ignore[union-attr]
            return
        self._resume()

    def shutdown(self) -> None:
        """The listener stops: close now if idle between requests, else after the response in flight.

        A connection that has not brought its first request yet is served once: its client
        reached a listening socket and is sending it (on a socket other sidecars share, the
        kernel may have queued it here a moment ago); it has `_LAST_CALL` seconds for its head.
        """
        if self.fresh:
            if not self.deadline or self.deadline > monotonic() + _LAST_CALL:
                self.arm(HEAD, _LAST_CALL)
            return
        if not self.busy:
            self.transport.close()
        elif self.websocket and self.task is not None:
            self.task.cancel()  # its tunnel closes both connections (a tunnel has no end of its own)

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self._abort()


# What a handler gets as its second argument: ``.transport`` has the peer certificate.
Connection = _Connection


class Listener:
    """One listening socket serving mesh requests to ``handler``.

    ``handler(request, conn)`` gets the mesh `Request` (path already
    normalized) and the connection it came on (``conn.transport`` gives the
    peer certificate); it returns the `Response` to send. ``on_done(request,
    response, started, answered, received, sent)``, if given, is called once
    the response is written (or its body broke off): ``started`` and
    ``answered`` are the `time.monotonic` values when the request's head had
    arrived and when the handler returned, ``received`` and ``sent`` the
    body bytes each way. It must not raise. With ``proxy`` the listener is a
    forward proxy's (an app's ``HTTP_PROXY``): CONNECT requests reach the
    handler (`mesh.http.receive`); elsewhere they get 405.

    With ``sock`` it serves a socket that is already listening (made by
    whoever started this process, and maybe shared with other processes)
    instead of binding ``host``:``port``; `stop` then closes only this
    process's hold on it: connections the kernel queues on it meanwhile stay
    for the others.
    """

    def __init__(self, handler: RequestHandler, *, name: str, host: str = "127.0.0.1",
                 port: int = 0, tls: ssl.SSLContext | None = None,
                 limits: ServerLimits | None = None, on_done: RequestDone | None = None,
                 proxy: bool = False, sock: socket.socket | None = None) -> None:
        self.handler = handler
        self.on_done = on_done
        self.proxy = proxy
        self.name = name
        self.host = host
        self.port = port
        self.tls = tls
        self.sock = sock
        if sock is not None:
            self.host, self.port = sock.getsockname()[:2]
        self.scheme = "https" if tls is not None else "http"
        self.limits = limits or ServerLimits()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_Connection] = set()
        self._all_closed: asyncio.Event | None = None
        self._sweep = Sweep(name, self.limits, self._connections)

    async def start(self) -> None:
        check_parser()
        limits = self.limits
        self.loop = asyncio.get_running_loop()
        self.stopping = False
        handshake = limits.header_timeout if self.tls else None
        if self.sock is not None:
            self._server = await self.loop.create_server(
                lambda: _Connection(self), sock=self.sock, ssl=self.tls, backlog=1024,
                ssl_handshake_timeout=handshake)
            return
        self._server = await self.loop.create_server(
            lambda: _Connection(self), self.host, self.port, ssl=self.tls, reuse_address=True,
            backlog=1024, ssl_handshake_timeout=handshake)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, close idle connections, let requests in flight finish (up to the drain timeout)."""
        server = self._server
        if server is None:
            return
        self._server = None
        self.stopping = True
        # Stop accepting, then let what was accepted in the loop's last rounds reach connection_made
        # (a round or two later) before the socket closes: it is served and drained, not dropped.
        for listening in server.sockets:
            self.loop.remove_reader(listening.fileno())
        for _ in range(3):
            await asyncio.sleep(0)
        server.close()
        self._all_closed = asyncio.Event()
        for conn in list(self._connections):
            conn.shutdown()
        if self._connections:
            try:
                async with asyncio.timeout(self.limits.drain_timeout):
                    await self._all_closed.wait()
            except TimeoutError:
                log.warning("%s listener: %d connection(s) still busy after %gs: closing them", self.name,
                            len(self._connections), self.limits.drain_timeout)
                for conn in list(self._connections):
                    conn.abort()
                try:
                    async with asyncio.timeout(1.0):
                        await self._all_closed.wait()
                except TimeoutError:
                    pass
        try:
            async with asyncio.timeout(1.0):
                await server.wait_closed()
        except TimeoutError:
            pass
        self._sweep.cancel()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _opened(self, conn: _Connection) -> None:
        self._connections.add(conn)
        self._sweep.start(self.loop)

    def _closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()
