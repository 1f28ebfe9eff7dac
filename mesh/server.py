"""HTTP listeners: aiohttp's low-level server, hardened and turned into mesh `Request`s.

This is the only module that touches ``aiohttp.web``. A `Listener` parses
each request with aiohttp's C parser (llhttp), refuses what a proxy must
not pass on (oversized headers, ambiguous paths), builds a `Request`, calls
its handler, and writes the `Response` back, streaming its body.

Limits that keep a slow or hostile client from holding a connection:
a header timeout (from the first byte of a request to its last header),
an idle timeout between keep-alive requests, a body timeout between chunks
of a request body and of a response the client is slow to read, and a cap
on the total size of request headers (431).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, http_exceptions, http_parser, web, web_response
from multidict import CIMultiDict

from .chain import short_error
from .errors import ClientTimeout
from .messages import Request, Response, new_request_id
from .paths import BadPath, split_target

__all__ = ["Listener", "ServerLimits", "check_parser"]

log = logging.getLogger("mesh.server")

RequestHandler = Callable[[Request, web.BaseRequest], Awaitable[Response]]

# aiohttp names itself in a Server header on every response that has none.
web_response.SERVER_SOFTWARE = "mesh"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class ServerLimits:
    """Per-listener limits (sizes in bytes, times in seconds)."""

    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    body_timeout: float = 60.0
    drain_timeout: float = 10.0


def check_parser() -> None:
    """Refuse to serve on aiohttp's pure-Python parser.

    It accepts request-smuggling inputs (bare LF, obs-fold, conflicting
    lengths in some versions) that the C parser rejects.
    """
    if getattr(http_parser, "HttpRequestParserC", None) is not http_parser.HttpRequestParser:
        raise RuntimeError(
            "aiohttp is running without its C HTTP parser (AIOHTTP_NO_EXTENSIONS set, or built "
            "without extensions); the sidecar will not serve on the pure-Python parser"
        )


def _error_page(status: int, reason: str) -> web.Response:
    short = short_error(status, reason)
    resp = web.Response(status=status, body=short.body, headers=short.headers)  # type: ignore[arg-type]
    resp.force_close()
    return resp


class _Protocol(web.RequestHandler):
    """aiohttp's connection handler, plus a header timeout and our own error pages."""

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = manager.limits.header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if not self.busy and self._header_timer is None:
            self._arm_header_timer()
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.request_started()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self._header_timeout, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self.busy and self.transport is not None:
            log.info("closing a connection that sent no complete request head in %ss",
                     self._header_timeout)
            self.transport.close()

    def request_started(self) -> None:
        self.busy = True
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def request_finished(self) -> None:
        self.busy = False

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None) -> web.StreamResponse:
        # Our own short body: never aiohttp's page, never an echo of the request bytes.
        if isinstance(exc, http_exceptions.LineTooLong):
            if "status line" in str(exc).lower() or "request line" in str(exc).lower():
                return _error_page(414, "request line too long")
            return _error_page(431, "request headers too large")
        if isinstance(exc, http_exceptions.BadHttpMessage) and "too many headers" in str(exc).lower():
            return _error_page(431, "too many request headers")
        if status >= 500:
            log.error("error handling a request", exc_info=exc)
            return _error_page(500, "internal error")
        log.debug("bad request: %s", exc)
        return _error_page(status, "malformed request")


class _Server(web.Server):
    def __init__(self, handler: Any, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits

    def __call__(self) -> _Protocol:  # type: ignore[override]
        return _Protocol(self, loop=self._loop, **self._kwargs)


async def _request_body(raw: web.BaseRequest, timeout: float) -> AsyncIterator[bytes]:
    content = raw.content
    while True:
        try:
            async with asyncio.timeout(timeout):
                chunk = await content.readany()
        except TimeoutError:
            raise ClientTimeout(f"no request body data for {timeout:g}s") from None
        if not chunk:
            return
        yield chunk


class Listener:
    """One listening socket serving mesh requests to ``handler``.

    ``handler(request, raw)`` gets the mesh `Request` (path already
    normalized) and aiohttp's request (for the peer certificate and the
    transport); it returns the `Response` to send.
    """

    def __init__(self, handler: RequestHandler, *, name: str, host: str = "127.0.0.1",
                 port: int = 0, tls: ssl.SSLContext | None = None,
                 limits: ServerLimits | None = None, absolute_form: bool = False) -> None:
        self.handler = handler
        self.name = name
        self.host = host
        self.port = port
        self.tls = tls
        self.limits = limits or ServerLimits()
        self.absolute_form = absolute_form
        self._server: _Server | None = None
        self._sockets: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        check_parser()
        limits = self.limits
        self._server = _Server(
            self._handle, limits,
            keepalive_timeout=limits.idle_timeout,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
            access_log=None,
            lingering_time=2.0,
            auto_decompress=False,
            handler_cancellation=True,
        )
        loop = asyncio.get_running_loop()
        self._sockets = await loop.create_server(
            self._server, self.host, self.port, ssl=self.tls, reuse_address=True, backlog=1024,
            ssl_handshake_timeout=limits.header_timeout if self.tls else None)
        self.port = self._sockets.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the drain timeout), close."""
        if self._sockets is not None:
            self._sockets.close()
        if self._server is not None:
            self._server.pre_shutdown()  # idle keep-alive connections close now, busy ones after
            await self._server.shutdown(self.limits.drain_timeout)
        if self._sockets is not None:
            await self._sockets.wait_closed()
        self._sockets = None
        self._server = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _handle(self, raw: web.BaseRequest) -> web.StreamResponse:
        protocol: _Protocol = raw.protocol  # type: ignore[assignment]
        protocol.request_started()
        try:
            return await self._serve(raw)
        finally:
            protocol.request_finished()

    async def _serve(self, raw: web.BaseRequest) -> web.StreamResponse:
        limits = self.limits
        size = 0
        for name, value in raw.raw_headers:
            size += len(name) + len(value) + 4
        if size > limits.max_header_bytes:
            return _error_page(431, "request headers too large")
        target = raw.raw_path
        authority = None
        if raw.method == "CONNECT":
            return _error_page(405, "CONNECT tunnels are not supported; call http://<service>/")
        if not target.startswith("/"):
            if self.absolute_form and target.lower().startswith("http://"):
                rest = target[7:]
                slash = rest.find("/")
                authority, target = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
            elif target == "*" and raw.method == "OPTIONS":
                target = "/"
            else:
                return _error_page(400, "bad request-target")
        try:
            path, query = split_target(target)
        except BadPath as exc:
            return _error_page(400, str(exc))
        headers = CIMultiDict(raw.headers)
        if authority is not None:
            headers["Host"] = authority
        if headers.get("Expect", "").lower() == "100-continue":
            del headers["Expect"]
            if raw.body_exists and raw.transport is not None:
                # Tell the client to send the body now; the app sees a plain request.
                raw.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body: Any = _request_body(raw, limits.body_timeout) if raw.body_exists else b""
        peer = raw.transport.get_extra_info("peername") if raw.transport else None
        request = Request(
            raw.method, path, query=query, headers=headers, body=body,
            client=peer[0] if peer else "", scheme="https" if self.tls else "http",
            id=new_request_id(), version=f"{raw.version.major}.{raw.version.minor}",
        )
        response = await self.handler(request, raw)
        try:
            return await self._send(raw, request, response)
        finally:
            await request.aclose()

    async def _send(self, raw: web.BaseRequest, request: Request, response: Response) -> web.StreamResponse:
        if response.status == 101 and response._upgrade is not None:
            return await _pump_websocket(raw, response)
        body = response.body
        headers = response.headers
        if isinstance(body, bytes):
            if request.method == "HEAD" or response.status in (204, 304):
                resp = web.StreamResponse(status=response.status, reason=response.reason, headers=headers)
                await resp.prepare(raw)
                return resp
            resp = web.Response(status=response.status, reason=response.reason, headers=headers, body=body)
            if response.status == 408:
                # The rest of this request body is not worth waiting for: answer, then hang up.
                resp.force_close()
                await resp.prepare(raw)
                await resp.write_eof()
                raw.protocol.force_close()  # type: ignore[union-attr]
            return resp
        resp = web.StreamResponse(status=response.status, reason=response.reason, headers=headers)
        length = headers.get("Content-Length")
        if length is not None and length.isdigit():
            resp.content_length = int(length)
        await resp.prepare(raw)
        timeout = self.limits.body_timeout
        try:
            async for chunk in response.stream():
                async with asyncio.timeout(timeout):
                    await resp.write(chunk)
        except Exception as exc:
            # Headers are out; the only honest signal left is to cut the connection.
            log.warning("request %s: response body broke off: %s", request.id, exc)
            if raw.transport is not None:
                raw.transport.abort()
            raise asyncio.CancelledError from None
        await resp.write_eof()
        return resp


async def _pump_websocket(raw: web.BaseRequest, response: Response) -> web.StreamResponse:
    upstream = response._upgrade.ws
    ws = web.WebSocketResponse(protocols=[upstream.protocol] if upstream.protocol else (),
                               autoping=True, max_msg_size=0)
    await ws.prepare(raw)

    async def pump(source: Any, sink: Any) -> None:
        async for msg in source:
            if msg.type == WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sink.send_bytes(msg.data)

    tasks = [asyncio.ensure_future(pump(ws, upstream)), asyncio.ensure_future(pump(upstream, ws))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Stop both readers before closing: a close handshake reads from the socket too.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await upstream.close(code=ws.close_code or 1000)
        await ws.close(code=upstream.close_code or 1000)
        await response._upgrade.session.close()
    return ws
