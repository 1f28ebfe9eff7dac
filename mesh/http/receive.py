"""Reading requests on a listener's connection: llhttp's callbacks, the checks a proxy owes, the `Request`.

`RequestReader` is the half of a listener connection (`mesh.http.server`)
that reads: it feeds what arrives to llhttp in its strict default mode (no
leniency flags), bounds a head as it comes (414, 431), refuses what a proxy
must not pass on (bad or doubled Host, doubled framing headers, CONNECT but
on a proxy's listener, unknown versions, bad request-targets, header names
with ``_``), builds the `Request` for each head and hands it to the
connection in order (`Exchange`), and delivers request bodies with flow
control. After an Upgrade request's head, what follows is kept for a
WebSocket, or parsed as that request's body, never as further requests.

On a proxy's listener (``Listener(proxy=True)``, the app's ``HTTP_PROXY``) a
CONNECT names its tunnel's end in authority form (``host:port``): its
`Request` has that as its ``path`` and its ``Host``, no body, and what
follows its head is kept for the tunnel, as after a WebSocket handshake.
There an absolute-form target's scheme (``http``, ``https``, ``ws``,
``wss``) becomes the request's ``scheme``.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from time import monotonic
from typing import TYPE_CHECKING, Any, NoReturn

from multidict import CIMultiDict

from mesh.http import websocket
from mesh.http.exchange import ClientGone, Exchange, Reframed, RequestBody
from mesh.http.framing import HIGH_WATER, Refused
from mesh.http.limits import HEAD, IDLE, ServerLimits
from mesh.http.paths import BadPath, split_target
from mesh.messages import Request, new_request_id

try:
    import httptools
except ImportError:  # pragma: no cover - a dependency; mesh.http.server.check_parser() says so at start
    httptools = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from mesh.http.server import Listener

__all__ = ["RequestReader"]

log = logging.getLogger("mesh.server")


# SECURITY: two of these in one request are two readings of it (aiohttp refuses the same list).
_SINGLETONS = ("Host", "Content-Length", "Transfer-Encoding", "Content-Type", "Content-Location",
               "Content-Range", "ETag", "Max-Forwards", "Server", "User-Agent")
_SCHEMES = frozenset({"http", "https", "ws", "wss"})
_UNDERSCORE = ord("_")  # `int in bytes` is a memchr; `b"_" in bytes` first fails to read b"_" as an int
# RFC 3986 §3.2.2-3: an IP-literal or a reg-name (unreserved, %-escapes, sub-delims), then an optional
# port. No userinfo ("a@b"), no whitespace, nothing a later parser could split differently.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]{0,5})?\Z")
# A CONNECT's authority-form target (RFC 9110 §9.3.6): a host and a port, both required.
_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+):[0-9]{1,5}\Z")


class RequestReader:
    """What a listener connection does to read requests; the connection supplies the state below."""

    listener: Listener
    limits: ServerLimits
    parser: Any  # None once we stop parsing: refused, lingering, or past an Upgrade
    client: str
    scheme: str
    deadline_kind: int
    # the message being parsed
    in_head: bool
    url: bytes
    raw_headers: list[tuple[bytes, bytes]]
    head_size: int
    max_head: int
    max_headers: int
    underscored: bool  # a header name in the head being parsed may have '_'
    head_pending: int
    refusal: tuple[int, str] | None
    receiving: Exchange | None  # whose body llhttp is delivering
    last: Exchange | None
    queue: deque[Exchange]
    # bytes after a WebSocket handshake head, until the tunnel takes them (or the upgrade is refused)
    ws_buffer: bytearray | None

    def arm(self, kind: int, seconds: float) -> None:
        raise NotImplementedError

    def pause(self) -> None:
        raise NotImplementedError

    def dispatch(self, exchange: Exchange) -> None:
        raise NotImplementedError

    def data_received(self, data: bytes) -> None:
        buffer = self.ws_buffer
        if buffer is not None:
            # After a WebSocket handshake, until the tunnel takes over this connection (or it is refused).
            buffer += data
            if len(buffer) > HIGH_WATER:
                self.pause()
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
        target = url.decode("latin-1")  # llhttp admits ASCII only in a request-target
        authority = None
        scheme = self.scheme
        if method == "CONNECT":
            if not self.listener.proxy:
                self._stop(405, "CONNECT tunnels are not supported; call http://<service>/")
            if not _AUTHORITY.match(target):
                self._stop(400, "bad CONNECT target: expected host:port")
            path, query, authority = target, "", target
        elif target[0] == "/":
            try:
                path, query = split_target(target)
            except BadPath as exc:
                self._stop(400, str(exc))
        elif target == "*" and method == "OPTIONS":
            path, query = "*", ""  # asterisk-form: for the app to answer (RFC 9112 §3.2.4)
        else:
            # Absolute-form (RFC 9112 §3.2.2): what a client sends through a proxy (HTTP_PROXY),
            # accepted by every server. The authority replaces any Host header.
            given, sep, rest = target.partition("://")
            if not sep or given.lower() not in _SCHEMES:
                self._stop(400, "bad request-target")
            authority, target = _split_absolute(rest)
            if not authority or not _HOST.match(authority):
                self._stop(400, "bad request-target")
            if self.listener.proxy:
                scheme = given.lower()
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
        length = headers.get("Content-Length")
        chunked = "Transfer-Encoding" in headers  # llhttp admits only a final "chunked" in a request
        connect = method == "CONNECT"
        if connect and (chunked or length is not None):
            # SECURITY: llhttp reads no body after a CONNECT head; a server that did would differ.
            self._stop(400, "a CONNECT request has no body")
        exchange = Exchange(method, version, parser.should_keep_alive() and not connect)
        exchange.started = monotonic()
        body = None
        if chunked or (length is not None and int(length) > 0):
            body = exchange.body = RequestBody(self, exchange)  # type: ignore[arg-type]  # self is the Connection
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
            client=self.client, scheme=scheme, id=new_request_id(), version=version)
        self.last = exchange if exchange.upgrade else None
        # llhttp ends an upgrade request at its head: its body, if any, comes through _after_upgrade.
        self.receiving = exchange if body is not None and not exchange.upgrade else None
        self.dispatch(exchange)

    def on_body(self, chunk: bytes) -> None:
        body = self.receiving.body  # type: ignore[union-attr]
        assert body is not None  # llhttp calls on_body only for a request it framed with a body
        body.feed(chunk)

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

    def _stop(self, status: int, reason: str) -> NoReturn:
        """From a parser callback: stop parsing and answer ``status``."""
        self.refusal = (status, reason)
        raise Refused(reason)

    def _refuse(self, status: int, reason: str) -> None:
        """Parse no more: answer with a short error in this request's turn, then close."""
        log.debug("%s listener: refused a request: %d %s", self.listener.name, status, reason)
        self.parser = None
        self.in_head = False
        self.pause()
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
        self.dispatch(refusal)

    def _after_upgrade(self, rest: bytes) -> None:
        """llhttp stopped at the end of an Upgrade request's head; ``rest`` is what followed it."""
        exchange = self.last
        if self.parser is None or exchange is None or not exchange.upgrade:
            return
        if exchange.websocket_key is not None or exchange.method == "CONNECT":
            # SECURITY: what follows a WebSocket handshake or a CONNECT is the tunnel's, never HTTP:
            # kept for the tunnel, dropped with the connection if it is refused.
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
