"""WebSockets through the sidecar: the handshake it checks (RFC 6455 §4), and the tunnel after it.

After a 101 the sidecar carries the connection as a byte tunnel
(`Tunnel`): frames, close codes and reasons, pings,
extensions and subprotocols are the two ends' business, and pass as sent.
What a proxy must still check is the handshake itself: that a client's
request is one (a key of 16 bytes, version 13), and that the upstream's
101 answers *that* request (its ``Sec-WebSocket-Accept``), so a
connection turns into raw bytes only when both ends agreed to it.

A CONNECT (an app's HTTPS through its sidecar, `mesh.sidecar.egress`) is
carried by the same `Tunnel`: `open_tunnel` makes its upstream side, a TCP
connection to the host the CONNECT named.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import time
from collections.abc import Callable

from mesh.http.framing import HIGH_WATER

__all__ = ["GUID", "Tunnel", "accept", "check_switch", "open_tunnel", "valid_key"]

log = logging.getLogger("mesh.websocket")

_CLOSE_GRACE = 5.0  # seconds a closing tunnel may take to flush before it is cut
_monotonic = time.monotonic

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def valid_key(key: str | None) -> bool:
    """Whether ``key`` is a client's ``Sec-WebSocket-Key``: 16 bytes in base64."""
    if not key:
        return False
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def accept(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value that answers ``key``."""
    return base64.b64encode(hashlib.sha1(key.strip().encode("ascii") + GUID).digest()).decode("ascii")


def check_switch(raw: list[tuple[bytes, bytes]], key: str | None) -> str | None:
    """What is wrong with a 101 that answers a WebSocket handshake with ``key``, or None.

    SECURITY: the connection becomes raw bytes both ways only when the upstream really took
    the handshake (RFC 6455 §4.1): a 101 that does not answer *this* key could come from a
    server that never meant to switch, and what follows would pass unparsed.
    """
    upgrade = answer = b""
    tokens: set[bytes] = set()
    for name, value in raw:
        lower = name.lower()
        if lower == b"upgrade":
            upgrade = value.strip().lower()
        elif lower == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
        elif lower == b"sec-websocket-accept":
            answer = value.strip()
    if upgrade != b"websocket" or b"upgrade" not in tokens:
        return "upstream switched to a protocol other than WebSocket"
    if key is None or answer != accept(key).encode("ascii"):
        return "upstream's 101 does not answer the WebSocket handshake (Sec-WebSocket-Accept)"
    return None


class _Side(asyncio.Protocol):
    """One connection of a `Tunnel`: what it receives is written to the other side."""

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport,
                 on_lost: Callable[[Exception | None], None] | None = None) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.on_lost = on_lost
        self.other: _Side | None = None
        self.pending: bytearray | None = None  # input before the other side is there
        self.eof = False  # its input ended
        self.lost = False
        # A half-close passes on only where both transports can keep the other direction open.
        self.half_close = transport.can_write_eof() and transport.get_extra_info("sslcontext") is None

    def data_received(self, data: bytes) -> None:
        self.tunnel.last = _monotonic()
        other = self.other
        if other is not None:
            other.transport.write(data)
            return
        pending = self.pending
        if pending is None:
            pending = self.pending = bytearray()
        pending += data
        if len(pending) > HIGH_WATER:
            self.transport.pause_reading()  # until the listener's side is there to take it

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is None:
            return self.half_close  # passed on when the other side comes
        if other.eof or not (self.half_close and other.half_close):
            other.transport.close()  # both directions are done, or one cannot stay open alone
            return False
        other.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        # This side's write buffer is full: stop reading what would go into it.
        other = self.other
        if other is not None and not other.eof and not other.lost:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None and not other.eof and not other.lost:
            other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        other = self.other
        if other is not None and not other.lost:
            if exc is None:
                other.transport.close()  # what is still buffered goes out first
            else:
                other.transport.abort()  # a reset passes on as one
        if self.on_lost is not None:
            self.on_lost(exc)
        self.tunnel._lost()


class Tunnel:
    """Two connections spliced after a 101: bytes both ways, as they come, and nothing else.

    The upstream connection is taken over the moment its 101 has been
    parsed (what came with or after it waits here); the listener hands
    over its client's connection with `splice` once it has sent the 101 on.
    From then on each side's input is written to the other as it arrives,
    with no task and no copy beyond the transports' own buffers: when one
    side's write buffer fills, reading from the other pauses until it
    drains. An EOF passes on as a half-close where both transports allow
    it (plain TCP, not TLS: then the other side closes), a close as a close
    once what is buffered went out, a reset as a reset.

    The tunnel ends when both connections are closed (``done``), after
    ``idle_timeout`` seconds without a byte either way, or on `close` (a
    refused upgrade, the listener stopping). Its one timer is per tunnel,
    checked lazily: none per chunk.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, upstream: asyncio.Transport, rest: bytes,
                 idle_timeout: float) -> None:
        self.loop = loop
        self.idle_timeout = idle_timeout
        self.last = _monotonic()
        self.done: asyncio.Future[None] = loop.create_future()  # set once both connections are closed
        self.ended = False
        self.closing = False
        self.upstream = _Side(self, upstream)
        self.client: _Side | None = None
        if rest:
            self.upstream.pending = bytearray(rest)
        upstream.set_protocol(self.upstream)
        self._timer: asyncio.TimerHandle | None = None
        if idle_timeout > 0:
            self._timer = loop.call_later(idle_timeout, self._check)

    def splice(self, transport: asyncio.Transport, pending: bytes,
               on_lost: Callable[[Exception | None], None] | None = None, write_paused: bool = False) -> None:
        """Join the client's ``transport`` (after the 101 went to it) to the upstream.

        ``pending``: what the client sent after its handshake; ``on_lost``: called when the
        client's connection is lost (the listener's own bookkeeping); ``write_paused``: the
        client's write buffer is full already.
        """
        upstream = self.upstream
        client = self.client = _Side(self, transport, on_lost)
        client.other, upstream.other = upstream, client
        transport.set_protocol(client)
        self.last = _monotonic()
        if pending and not upstream.lost:
            upstream.transport.write(pending)
        if upstream.pending:
            transport.write(bytes(upstream.pending))
        upstream.pending = None
        if upstream.lost:
            transport.close()
        elif upstream.eof:
            if upstream.half_close and client.half_close:
                transport.write_eof()
            else:
                transport.close()
        elif write_paused:
            upstream.transport.pause_reading()
        else:
            upstream.transport.resume_reading()
        if not transport.is_closing():
            transport.resume_reading()

    def close(self) -> None:
        """End the tunnel: both connections close (cut if they have not within a few seconds)."""
        if self.ended or self.closing:
            return
        self.closing = True
        for side in (self.upstream, self.client):
            if side is not None and not side.lost:
                side.transport.close()
        self._arm(_CLOSE_GRACE)

    def _arm(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, self._check)

    def _check(self) -> None:
        self._timer = None
        if self.ended:
            return
        if self.closing:
            for side in (self.upstream, self.client):
                if side is not None and not side.lost:
                    side.transport.abort()
            return
        if self.idle_timeout <= 0:
            return
        left = self.last + self.idle_timeout - _monotonic()
        if left > 0:
            self._arm(left)
            return
        log.debug("a tunnel was quiet for %gs: closing it", self.idle_timeout)
        self.close()

    def _lost(self) -> None:
        client = self.client
        if self.upstream.lost and (client is None or client.lost) and not self.ended:
            self.ended = True
            if not self.done.done():
                self.done.set_result(None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None


class _Opening(asyncio.Protocol):
    """A connection on its way to becoming a tunnel's upstream side: what arrives meanwhile, kept."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.eof = False
        self.lost: tuple[Exception | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()  # the tunnel resumes it

    def eof_received(self) -> bool:
        self.eof = True
        return True  # the tunnel decides whether the other direction stays open

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)


async def open_tunnel(host: str, port: int, *, connect_timeout: float, idle_timeout: float) -> Tunnel:
    """A `Tunnel` whose upstream side is a new TCP connection to ``host``:``port`` (a CONNECT's).

    Raises TimeoutError after ``connect_timeout`` seconds, OSError when the connection is refused or
    unreachable. Whatever the host sends or does before the client's side is spliced in waits in
    the tunnel, as after a 101.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(connect_timeout):
        transport, opening = await loop.create_connection(_Opening, host, port)
    tunnel = Tunnel(loop, transport, bytes(opening.data), idle_timeout)
    if opening.eof and not tunnel.upstream.eof_received():
        transport.close()  # its other direction cannot stay open alone
    if opening.lost is not None:
        tunnel.upstream.connection_lost(opening.lost[0])
    return tunnel
