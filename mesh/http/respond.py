"""Writing responses on a listener's connection: heads, bodies, interim responses, the 101.

`ResponseWriter` is the half of a listener connection (`mesh.http.server`) that
answers: it frames a `Response` for the client (Content-Length or chunked,
no body where HEAD, 204 and 304 have none, ``Connection: close`` where the
connection ends), streams bodies with flow control, aborts a body that
broke off rather than pass it as complete, writes 1xx heads ahead of the
final one, and turns a connection into a byte tunnel after a WebSocket's 101
or a CONNECT's 2xx.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from mesh.chain import short_error
from mesh.http import websocket
from mesh.http.exchange import Exchange
from mesh.http.framing import NO_BODY_STATUS, WriteFlow, date_line, encode_head, write_body
from mesh.http.limits import WRITE
from mesh.messages import Response

if TYPE_CHECKING:
    from mesh.http.limits import ServerLimits
    from mesh.http.server import Listener
    from mesh.http.websocket import Tunnel

__all__ = ["ResponseWriter"]

log = logging.getLogger("mesh.server")

_INLINE_BODY = 64 * 1024  # response bodies up to this size go out in the same write as the head
# A 101's headers the listener writes itself; the app's subprotocol and extensions pass as they are.
_WS_OWN = frozenset({"content-length", "transfer-encoding", "connection", "upgrade", "sec-websocket-accept"})


class ResponseWriter(WriteFlow):
    """What a listener connection does to answer; the connection supplies the state below."""

    listener: Listener
    limits: ServerLimits
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    closed: bool
    handling: bool
    reading_paused: bool
    ws_buffer: bytearray | None
    websocket: bool

    def arm(self, kind: int, seconds: float) -> None:
        raise NotImplementedError

    def disarm(self, kind: int) -> None:
        raise NotImplementedError

    def connection_lost(self, exc: Exception | None) -> None:
        raise NotImplementedError

    def _interim(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        """Write an interim (1xx) response now, ahead of the final one (RFC 9110 §15.2).

        Offered to the handler as ``request._interim`` for HTTP/1.1 clients; the pool calls it
        for each 1xx but 100 Continue (``Expect`` is answered here) while the head is awaited.
        """
        if not self.handling or self.closed:
            return  # the final response is on its way: too late for a hint
        try:
            head = encode_head(f"HTTP/1.1 {status} {reason}", headers)
        except ValueError as exc:
            log.warning("%s listener: dropped an interim %d response: %s", self.listener.name, status, exc)
            return
        self.transport.write(head)

    async def _respond(self, exchange: Exchange, response: Response) -> bool:
        """Write ``response``; True if the connection may carry another request."""
        exchange.responding = True
        status = response.status
        if response._upgrade is not None:
            if status == 101:
                return await self._websocket(exchange, response)
            if exchange.method == "CONNECT" and 200 <= status <= 299:
                return await self._connected(exchange, response)
            response._upgrade.close()  # a plugin turned it down: let it go
        elif exchange.method == "CONNECT" and isinstance(status, int) and 200 <= status <= 299:
            # SECURITY: a 2xx to a CONNECT tells the client its tunnel is open: never without one.
            log.error("request %s: the handler answered a CONNECT with %d and no tunnel", exchange.request_id,
                      status)
            await response.aclose()
            response, status = short_error(500, "internal error", exchange.request_id), 500
        if self.closed:
            await response.aclose()
            return False
        if not isinstance(status, int) or not 200 <= status <= 599:
            rid = exchange.request_id
            log.error("request %s: the handler answered with status %r", rid, status)
            await response.aclose()
            response = short_error(500, "internal error", rid)
            status = 500
        headers = response.headers
        body = response.body
        body_in = exchange.body
        keep = (exchange.keep_alive and status != 408 and not self.listener.stopping
                and (body_in is None or body_in.complete) and exchange.websocket_key is None)
        no_body = exchange.method == "HEAD" or status in NO_BODY_STATUS
        given = headers.get("Content-Length")
        extra: list[str] = []
        # SECURITY: framing is ours: a handler's Transfer-Encoding or Connection never goes out as is.
        drop: set[str] | None = {"transfer-encoding"} if "Transfer-Encoding" in headers else None
        payload = b""
        stream = None
        chunked = False
        length = None
        if isinstance(body, bytes):
            if status == 204:
                if given is not None:
                    drop = (drop or set()) | {"content-length"}
            elif no_body:
                # HEAD and 304 keep the length the handler gave (what a GET would get).
                if given is None and body and exchange.method == "HEAD":
                    extra.append(f"Content-Length: {len(body)}")
            else:
                payload = body
                size = str(len(body))
                if given != size:
                    if given is not None:
                        drop = (drop or set()) | {"content-length"}
                    extra.append("Content-Length: " + size)
        elif no_body:
            await response.aclose()
            if status == 204 and given is not None:
                drop = (drop or set()) | {"content-length"}
        else:
            stream = response
            if given is not None and given.isdigit():
                length = int(given)
            else:
                if given is not None:
                    drop = (drop or set()) | {"content-length"}
                if exchange.version == "1.1":
                    chunked = True
                    extra.append("Transfer-Encoding: chunked")
                else:
                    keep = False  # HTTP/1.0 knows no chunks: the body ends where the connection does
        if "Connection" in headers:
            drop = (drop or set()) | {"connection"}
        if not keep:
            extra.append("Connection: close")
        elif exchange.version == "1.0":
            extra.append("Connection: keep-alive")
        if "Date" not in headers:
            extra.append(date_line())
        if "Server" not in headers:
            extra.append("Server: mesh")
        items = headers.items() if drop is None else [
            (name, value) for name, value in headers.items() if name.lower() not in drop]
        try:
            head = encode_head(f"HTTP/1.1 {status} {response.reason}", items, extra)
        except ValueError as exc:
            rid = exchange.request_id
            log.error("request %s: refused to send the response: %s", rid, exc)
            await response.aclose()
            error = short_error(500, "internal error", rid)
            head = encode_head(f"HTTP/1.1 500 {error.reason}", error.headers.items(),
                                [f"Content-Length: {len(error.body)}", "Connection: close", date_line(),  # type: ignore[arg-type]
                                 "Server: mesh"])
            payload, stream, keep = error.body, None, False  # type: ignore[assignment]
        transport = self.transport
        if stream is None:
            exchange.sent = len(payload)
            if len(payload) <= _INLINE_BODY:
                transport.write(head + payload)
            else:
                transport.write(head)
                transport.write(payload)
            if self.write_paused:
                try:
                    await self.drain()
                except ConnectionError:
                    return False
            return keep
        transport.write(head)
        return await self._stream(exchange, stream, chunked, length) and keep

    async def _stream(self, exchange: Exchange, response: Response, chunked: bool, length: int | None) -> bool:
        """Write a streamed body; False (with the connection aborted) when it broke off."""
        chunks = response.stream()  # an async generator: aclose() ends it
        try:
            exchange.sent = await write_body(self.transport, self, chunks, chunked, length)
        except Exception as exc:
            # The head is out: the only honest signal left is to cut the connection.
            if not self.closed:
                log.warning("request %s: response body broke off: %s", exchange.request_id,
                            exc or type(exc).__name__)
            self.transport.abort()
            return False
        finally:
            try:
                await chunks.aclose()
            except Exception:
                log.debug("closing a response body failed", exc_info=True)
        return True

    async def drain(self) -> None:
        """Wait until the client has read enough of what we wrote (bounded by the body timeout)."""
        if self.closed:
            raise ConnectionResetError("the client closed the connection")
        waiter = self.drain_waiter = self.loop.create_future()
        self.arm(WRITE, self.limits.body_timeout)
        try:
            await waiter
        finally:
            self.drain_waiter = None
            self.disarm(WRITE)

    async def _websocket(self, exchange: Exchange, response: Response) -> bool:
        """Send the upstream's 101 on, then carry the connection as a byte tunnel until it ends.

        The 101 is ours to write (its accept answers this client's key); the app's subprotocol,
        extensions and other headers pass. From then on `mesh.http.websocket.Tunnel` moves bytes both
        ways: frames, pings and close codes with their reasons reach each end as they were sent.
        """
        tunnel = response._upgrade
        key = exchange.websocket_key
        if key is None or self.closed:
            tunnel.close()
            if self.closed:
                return False
            rid = exchange.request_id
            log.error("request %s: the handler opened a WebSocket for a request that is no handshake", rid)
            return await self._respond(exchange, short_error(500, "internal error", rid))
        extra = ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Accept: {websocket.accept(key)}"]
        if "Date" not in response.headers:
            extra.append(date_line())
        if "Server" not in response.headers:
            extra.append("Server: mesh")
        items = [(k, v) for k, v in response.headers.items() if k.lower() not in _WS_OWN]
        try:
            head = encode_head(f"HTTP/1.1 101 {response.reason or 'Switching Protocols'}", items, extra)
        except ValueError as exc:
            rid = exchange.request_id
            log.error("request %s: refused to send the response: %s", rid, exc)
            tunnel.close()
            return await self._respond(exchange, short_error(500, "internal error", rid))
        self.transport.write(head)
        return await self._splice(tunnel)

    async def _connected(self, exchange: Exchange, response: Response) -> bool:
        """Answer a CONNECT with the handler's 2xx, then carry the connection as a byte tunnel until it ends.

        The head has no framing (RFC 9110 §9.3.6: a 2xx to CONNECT has no content); what the
        client sent after its CONNECT goes first through the tunnel the handler opened.
        """
        tunnel = response._upgrade
        if self.closed:
            tunnel.close()
            return False
        self.transport.write(encode_head(f"HTTP/1.1 {response.status} Connection Established", ()))
        return await self._splice(tunnel)

    async def _splice(self, tunnel: Tunnel) -> bool:
        """Hand this connection to ``tunnel`` (its head went out) and wait until the tunnel ends."""
        self.websocket = True
        pending = bytes(self.ws_buffer or b"")  # what the client sent after its handshake or CONNECT
        self.ws_buffer = None
        self.reading_paused = False  # the tunnel resumes reading and does its own flow control now
        # The tunnel becomes this transport's protocol; this connection still hears of its end.
        tunnel.splice(self.transport, pending, self.connection_lost, self.write_paused)
        try:
            await tunnel.done
        finally:
            tunnel.close()  # the listener stops (or the tunnel ended: then nothing to do)
        return False
