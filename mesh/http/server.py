"""HTTP/1.1 listeners: our own asyncio protocol on llhttp (httptools), serving mesh `Request`s.

A `Listener` accepts connections; each is one `_Connection`, an
``asyncio.Protocol`` that parses requests with llhttp in its strict default
mode (no leniency flags), refuses what a proxy must not pass on, builds a
`Request`, awaits the handler and writes its `Response` back, streaming
bodies with flow control both ways. Requests on a connection are served one
at a time and in order (keep-alive, pipelining). A WebSocket handshake is
checked here; once the handler's upstream answered it with a 101, the 101
goes to the client and the two connections become one byte tunnel
(`mesh.http.websocket.Tunnel`). Interim responses (103 Early Hints, ...) that
arrive before the final one are written to HTTP/1.1 clients as they come.

Limits that keep a slow or hostile client from holding a connection
(`ServerLimits`): a header timeout (from the connection, or from a later
request's first bytes, to the end of its head), an idle timeout between
keep-alive requests, a body timeout between chunks of a request body and
while a client does not read what we write, and caps on the request head
(414, 431). A timeout is one deadline per connection, set on state changes
and checked by one sweep per listener a few times a second: no timer and no
``asyncio.timeout()`` per request.

Errors are our own short plain-text bodies (`mesh.chain.short_error`): no
library banner, no echo of the request.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import http_parser
from multidict import CIMultiDict

from mesh.chain import short_error
from mesh.errors import ClientTimeout
from mesh.http import websocket
from mesh.http.exchange import BODY, HEAD, IDLE, LINGERING, WRITE, Exchange, Reframed, RequestBody
from mesh.http.framing import HIGH_WATER, LOW_WATER
from mesh.http.paths import BadPath, split_target
from mesh.http.respond import ResponseWriter
from mesh.messages import Request, Response, new_request_id

try:
    import httptools
except ImportError:  # pragma: no cover - a dependency; check_parser() says so at start
    httptools = None  # type: ignore[assignment]

__all__ = ["ClientGone", "Listener", "ServerLimits", "check_parser"]

log = logging.getLogger("mesh.server")

# The handler gets the Request and the connection (whose ``.transport`` gives the peer certificate).
RequestHandler = Callable[[Request, Any], Awaitable[Response]]

_LINGER = 2.0  # seconds to read and drop what a client still sends after the response that ends it
_monotonic = time.monotonic  # deadlines, in seconds


# SECURITY: two of these in one request are two readings of it (aiohttp refuses the same list).
_SINGLETONS = ("Host", "Content-Length", "Transfer-Encoding", "Content-Type", "Content-Location",
               "Content-Range", "ETag", "Max-Forwards", "Server", "User-Agent")
_SCHEMES = frozenset({"http", "https", "ws", "wss"})
_UNDERSCORE = ord("_")  # `int in bytes` is a memchr; `b"_" in bytes` first fails to read b"_" as an int
# RFC 3986 §3.2.2-3: an IP-literal or a reg-name (unreserved, %-escapes, sub-delims), then an optional
# port. No userinfo ("a@b"), no whitespace, nothing a later parser could split differently.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?\Z")


@dataclass(frozen=True)
class ServerLimits:
    """Per-listener limits (sizes in bytes, times in seconds).

    ``body_timeout`` bounds both the wait for the next chunk of a request
    body and the wait for a client to read what we write to it. Request
    bodies up to ``request_buffer`` bytes are read in full before the
    handler runs; a body still streaming after ``body_grace`` seconds of
    waiting for it must keep ``request_min_rate`` bytes per second (408
    otherwise). Header names with ``_`` are dropped unless
    ``underscores_in_headers`` (spellings of ``x-mesh-*`` always are).
    """

    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 60.0
    drain_timeout: float = 10.0
    underscores_in_headers: bool = False
    request_buffer: int = 0  # bodies up to this size are read in full before the handler runs
    request_min_rate: int = 0  # bytes/s a request body must keep once body_grace has passed (0: none)
    body_grace: float = 10.0


class ClientGone(ClientTimeout):
    """The client went away, or broke its framing, before the end of its request body.

    A `ClientTimeout`, so the chain answers it as one (408, no error log):
    nobody is left to read the answer anyway.
    """


def check_parser() -> None:
    """Refuse to serve unless both HTTP parsers in the process are C ones.

    The listeners parse with llhttp (httptools, a C extension with no Python
    fallback). aiohttp stays in the process (the WebSocket client, plugins),
    and its pure-Python parser (``AIOHTTP_NO_EXTENSIONS``) accepts
    request-smuggling inputs (bare LF, obs-fold, conflicting lengths in
    some versions) that llhttp rejects.
    """
    if getattr(http_parser, "HttpRequestParserC", None) is not http_parser.HttpRequestParser:
        raise RuntimeError(
            "aiohttp is running without its C HTTP parser (AIOHTTP_NO_EXTENSIONS set, or built "
            "without extensions); the sidecar will not serve on the pure-Python parser"
        )
    if httptools is None or not hasattr(httptools, "HttpRequestParser"):
        raise RuntimeError("httptools (llhttp) is not installed; the sidecar has no HTTP parser to serve with")


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the status is in ``_Connection.refusal``."""




class _Connection(ResponseWriter, asyncio.Protocol):
    """One client connection: llhttp parses, the handler serves requests in order, one at a time.

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
        if self.listener.stopping:
            transport.close()  # accepted just as the listener stopped

    def data_received(self, data: bytes) -> None:
        buffer = self.ws_buffer
        if buffer is not None:
            # After a WebSocket handshake, until the tunnel takes over this connection (or it is refused).
            buffer += data
            if len(buffer) > HIGH_WATER:
                self._pause()
            return
        parser = self.parser
        if parser is None:
            return  # refused or lingering: what the client still sends is dropped
        # One search per read, not one per header: may a head in these bytes have a name with '_'?
        # (A head that began in an earlier read keeps that read's answer.)
        self.underscored = _UNDERSCORE in data or (self.underscored and self.in_head)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._after_upgrade(data[exc.args[0]:])
            return
        except httptools.HttpParserError as exc:
            refusal, self.refusal = self.refusal, None
            if refusal is None:
                if isinstance(exc, httptools.HttpParserCallbackError):
                    log.error("%s listener: parsing a request failed", self.listener.name,
                              exc_info=exc.__context__ or exc)
                    refusal = (500, "internal error")
                else:
                    log.debug("%s listener: malformed request: %s", self.listener.name, exc)
                    refusal = (400, "malformed request")
            self._refuse(*refusal)
            return
        if self.in_head:
            if self.deadline_kind == IDLE:
                # A request began and its head is still coming (most heads come whole, in one read).
                self.arm(HEAD, self.limits.header_timeout)
            # llhttp hands us a header only once its line ends: bound a head that never ends by
            # counting the reads it spans (from the one after it began: that one may hold more).
            if self.head_pending < 0:
                self.head_pending = 0
            else:
                self.head_pending += len(data)
                if self.head_pending > self.max_head:
                    self._refuse(431, "request headers too large")

    # (No eof_received: as in nginx, a client's EOF means it left. The transport closes and
    # connection_lost cancels the work in flight; a half-closed client gets no answer.)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener._closed(self)
        if self.receiving is not None and self.receiving.body is not None:
            self.receiving.body.fail(ClientGone("the client closed the connection before the end of its body"))
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_exception(ConnectionResetError("the client closed the connection"))
        if self.wakeup is not None and not self.wakeup.done():
            self.wakeup.set_result(None)  # the idle serving task ends
        if self.task is not None and self.handling:
            self.task.cancel()  # nobody is waiting for this answer: stop the work behind it

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # llhttp callbacks (no on_message_begin: one callback fewer per request; on_url starts a head)

    def on_url(self, url: bytes) -> None:
        if not self.in_head:
            self.in_head = True
            self.head_pending = -1
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.max_head:
            self._stop(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        raw = self.raw_headers
        raw.append((name, value))
        # llhttp has no limit of its own on a head's size: count as we go.
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.max_head:
            self._stop(431, "request headers too large")
        if len(raw) > self.max_headers:
            self._stop(431, "too many request headers")

    def on_headers_complete(self) -> None:
        url, raw = self.url, self.raw_headers
        self.in_head = False
        self.url = b""
        self.raw_headers = []
        self.head_size = 0
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._stop(400, "unsupported HTTP version")
        method = parser.get_method().decode("ascii")
        if method == "CONNECT":
            self._stop(405, "CONNECT tunnels are not supported; call http://<service>/")
        target = url.decode("latin-1")  # llhttp admits ASCII only in a request-target
        authority = None
        if target[0] == "/":
            try:
                path, query = split_target(target)
            except BadPath as exc:
                self._stop(400, str(exc))
        elif target == "*" and method == "OPTIONS":
            path, query = "*", ""  # asterisk-form: for the app to answer (RFC 9112 §3.2.4)
        else:
            # Absolute-form (RFC 9112 §3.2.2): what a client sends through a proxy (HTTP_PROXY),
            # accepted by every server. The authority replaces any Host header.
            scheme, sep, rest = target.partition("://")
            if not sep or scheme.lower() not in _SCHEMES:
                self._stop(400, "bad request-target")
            authority, target = _split_absolute(rest)
            if not authority or not _HOST.match(authority):
                self._stop(400, "bad request-target")
            try:
                path, query = split_target(target)
            except BadPath as exc:
                self._stop(400, str(exc))
        if self.underscored:
            raw = self._without_underscores(raw)
        headers = CIMultiDict([(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in raw])
        if len(raw) > 1 and len({n.lower() for n, _ in raw}) < len(raw):
            for name in _SINGLETONS:
                if len(headers.getall(name, ())) > 1:
                    self._stop(400, f"more than one {name} header")
        if authority is not None:
            headers["Host"] = authority
        else:
            # SECURITY: RFC 9112 §3.2: no Host, or an invalid one, is 400; which host a request
            # names must never be a matter of interpretation (two Hosts were refused above).
            host = headers.get("Host")
            if host is None:
                if version == "1.1":
                    self._stop(400, "no Host header")
            elif not _HOST.match(host):
                self._stop(400, "invalid Host header")
        exchange = Exchange(method, version, parser.should_keep_alive())
        length = headers.get("Content-Length")
        chunked = "Transfer-Encoding" in headers  # llhttp admits only a final "chunked" in a request
        body = None
        if chunked or (length is not None and int(length) > 0):
            body = exchange.body = RequestBody(self, exchange)
        expect = headers.get("Expect")
        if expect is not None and expect.lower() == "100-continue":
            del headers["Expect"]  # we answer it; the app sees a plain request
            if body is not None and version == "1.1":
                body.expect_continue = True
        if parser.should_upgrade():
            exchange.upgrade = True
            if headers.get("Upgrade", "").strip().lower() == "websocket":
                key = headers.get("Sec-WebSocket-Key")
                if (method != "GET" or body is not None or not websocket.valid_key(key)
                        or headers.get("Sec-WebSocket-Version", "").strip() != "13"):
                    self._stop(400, "bad WebSocket handshake")
                exchange.websocket_key = key
            elif body is not None:
                exchange.framing = (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" if chunked else
                                    b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % int(length))  # type: ignore[arg-type]
        exchange.request = Request(
            method, path, query=query, headers=headers, body=b"" if body is None else body,
            client=self.client, scheme=self.scheme, id=new_request_id(), version=version)
        self.last = exchange if exchange.upgrade else None
        # llhttp ends an upgrade request at its head: its body, if any, comes through _after_upgrade.
        self.receiving = exchange if body is not None and not exchange.upgrade else None
        self._dispatch(exchange)

    def on_body(self, chunk: bytes) -> None:
        body = self.receiving.body  # type: ignore[union-attr]
        assert body is not None  # llhttp calls on_body only for a request it framed with a body
        if body.closed:
            return
        body.chunks.append(chunk)
        body.buffered += len(chunk)
        body.received += len(chunk)
        if body.buffered > body.high_water:
            self._pause()
        body.wake()

    def on_message_complete(self) -> None:
        exchange = self.receiving
        if exchange is not None:
            self.receiving = None
            exchange.body.complete = True  # type: ignore[union-attr]
            exchange.body.wake()  # type: ignore[union-attr]

    # parsing helpers

    def _without_underscores(self, raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """Drop header names with '_' (unless allowed); never a spelling of a header the mesh sets.

        SECURITY: CGI and WSGI stacks read ``X_Mesh_Peer`` and ``X-Mesh-Peer`` as the same
        ``HTTP_X_MESH_PEER``: a client could forge what the mesh vouches for. nginx drops them too.
        """
        allow = self.limits.underscores_in_headers
        kept = []
        for name, value in raw:
            if _UNDERSCORE in name:
                if not allow or name.replace(b"_", b"-").lower().startswith(b"x-mesh-"):
                    log.debug("%s listener: dropped header %r (underscore)", self.listener.name, name)
                    continue
            kept.append((name, value))
        return kept

    def _stop(self, status: int, reason: str) -> None:
        """From a parser callback: stop parsing and answer ``status``."""
        self.refusal = (status, reason)
        raise _Refused(reason)

    def _refuse(self, status: int, reason: str) -> None:
        """Parse no more: answer with a short error in this request's turn, then close."""
        log.debug("%s listener: refused a request: %d %s", self.listener.name, status, reason)
        self.parser = None
        self.in_head = False
        self._pause()
        exchange = self.receiving
        if exchange is not None:
            self.receiving = None
            if exchange in self.queue:
                self.queue.remove(exchange)  # its framing broke before its turn: no handler sees it
            else:
                # The handler already has it: whatever it answers, this request gets the 400.
                exchange.bad_body = True
                exchange.body.fail(ClientGone("malformed request body"))  # type: ignore[union-attr]
        refusal = Exchange("GET", "1.1", False)
        refusal.refusal = (status, reason)
        self._dispatch(refusal)

    def _after_upgrade(self, rest: bytes) -> None:
        """llhttp stopped at the end of an Upgrade request's head; ``rest`` is what followed it."""
        exchange = self.last
        if self.parser is None or exchange is None or not exchange.upgrade:
            return
        if exchange.websocket_key is not None:
            # SECURITY: what follows a WebSocket handshake is frames, never HTTP: kept for the
            # WebSocket, dropped with the connection if the upgrade is refused.
            self.parser = None
            self.ws_buffer = bytearray(rest)
            return
        if exchange.body is not None:
            # Another protocol (h2c, ...): served as a plain request, but llhttp left its body
            # unparsed. SECURITY: never parse that body as requests. A fresh parser, primed with a
            # head of the same framing, reads the body into this request, then the requests after it.
            self.parser = httptools.HttpRequestParser(Reframed(self))
            self.parser.feed_data(exchange.framing)
            self.receiving = exchange
        if rest:
            self.data_received(rest)

    # serving

    def _dispatch(self, exchange: Exchange) -> None:
        self.queue.append(exchange)
        if self.busy:
            self._pause()  # one request at a time: hold the next ones (and the socket) until it is done
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
                await waiter  # _dispatch, or connection_lost
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
            return await self._respond(exchange, response)
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

    # flow control and deadlines

    def _pause(self) -> None:
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

    def arm(self, kind: int, seconds: float) -> None:
        self.deadline = _monotonic() + seconds
        self.deadline_kind = kind

    def disarm(self, kind: int) -> None:
        if self.deadline_kind == kind:
            self.deadline = 0.0
            self.deadline_kind = 0

    def timed_out(self) -> None:
        """The deadline passed (called by the listener's sweep)."""
        kind = self.deadline_kind
        self.deadline = 0.0
        self.deadline_kind = 0
        if kind == BODY:
            body = self.body_waiting
            if body is not None:
                limits = self.limits
                if body.slow:
                    body.fail(ClientTimeout(f"the request body came slower than "
                                            f"{limits.request_min_rate} bytes/s"))
                else:
                    body.fail(ClientTimeout(f"no request body data for {limits.body_timeout:g}s"))
        elif kind == WRITE:
            log.debug("%s listener: a client read nothing for %gs: closing", self.listener.name,
                      self.limits.body_timeout)
            self.transport.abort()
        else:
            if kind == HEAD:
                log.debug("%s listener: no complete request head in %gs: closing", self.listener.name,
                          self.limits.header_timeout)
            self.transport.close()

    def shutdown(self) -> None:
        """The listener stops: close now if idle, else after the response in flight."""
        if not self.busy:
            self.transport.close()
        elif self.websocket and self.task is not None:
            self.task.cancel()  # its tunnel closes both connections (a tunnel has no end of its own)

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self._abort()

    # WebSocket

# What a handler gets as its second argument: ``.transport`` has the peer certificate.
Connection = _Connection


def _split_absolute(rest: str) -> tuple[str, str]:
    """``svc:80/p?q`` (an absolute-form target after ``http://``) -> (``svc:80``, ``/p?q``)."""
    end = len(rest)
    for sep in "/?":
        i = rest.find(sep)
        if 0 <= i < end:
            end = i
    target = rest[end:]
    if not target.startswith("/"):
        target = "/" + target
    return rest[:end], target


class Listener:
    """One listening socket serving mesh requests to ``handler``.

    ``handler(request, conn)`` gets the mesh `Request` (path already
    normalized) and the connection it came on (``conn.transport`` gives the
    peer certificate); it returns the `Response` to send.
    """

    def __init__(self, handler: RequestHandler, *, name: str, host: str = "127.0.0.1",
                 port: int = 0, tls: ssl.SSLContext | None = None,
                 limits: ServerLimits | None = None) -> None:
        self.handler = handler
        self.name = name
        self.host = host
        self.port = port
        self.tls = tls
        self.scheme = "https" if tls is not None else "http"
        self.limits = limits or ServerLimits()
        self.stopping = False
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_Connection] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None
        limits = self.limits
        # Deadlines are checked this often: a timeout fires at most a tick late.
        self._tick = max(0.05, min(0.5, limits.header_timeout / 4, limits.idle_timeout / 4,
                                   limits.body_timeout / 4))

    async def start(self) -> None:
        check_parser()
        limits = self.limits
        self.loop = asyncio.get_running_loop()
        self.stopping = False
        self._server = await self.loop.create_server(
            lambda: _Connection(self), self.host, self.port, ssl=self.tls, reuse_address=True,
            backlog=1024, ssl_handshake_timeout=limits.header_timeout if self.tls else None)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, close idle connections, let requests in flight finish (up to the drain timeout)."""
        server = self._server
        if server is None:
            return
        self._server = None
        self.stopping = True
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
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _opened(self, conn: _Connection) -> None:
        self._connections.add(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._tick, self._sweep)

    def _closed(self, conn: _Connection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    def _sweep(self) -> None:
        """Act on every connection whose deadline passed; runs while there are connections."""
        now = _monotonic()
        for conn in list(self._connections):
            if conn.deadline and conn.deadline <= now:
                try:
                    conn.timed_out()
                except Exception:
                    log.exception("%s listener: a connection's timeout failed", self.name)
                    conn.abort()
        self._sweeper = self.loop.call_later(self._tick, self._sweep) if self._connections else None
