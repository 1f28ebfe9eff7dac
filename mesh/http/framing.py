"""What HTTP/1.1 framing the listeners and the upstream client share.

Both sides of the sidecar speak the same wire, so one module holds what they
do alike:

- a message head, put on the wire one way (`encode_head`): with the check
  that no name, value or reason splits it;
- a body as it arrives (`BodyBuffer`): chunks buffered in memory, reading
  from the sender paused above `HIGH_WATER` and resumed at `LOW_WATER`, and
  read back as an async iterator;
- a body as it leaves (`write_body`): chunked or as is, never past its
  Content-Length, waiting whenever the peer's side is full (`WriteFlow`).

Each side keeps what is its own: the listener's deadlines and refusals, the
client's pool and its timeouts, behind the few hooks named below. And each
keeps its own llhttp callbacks, ``on_header`` and the client's ``on_body``
included though they look alike: a method that runs for every header or
chunk of every message stays with one class, where CPython can specialize
its attribute accesses. Run on both sides' objects, it loses that: sharing
``on_header`` cost 4,000 instructions per proxied request (callgrind), more
than all the rest of this module saves.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterable, Collection, Sequence
from email.utils import formatdate

__all__ = ["HIGH_WATER", "LOW_WATER", "NO_BODY_STATUS", "BodyBuffer", "Refused", "WriteFlow",
           "date_line", "encode_head", "write_body"]

HIGH_WATER = 256 * 1024  # buffered body bytes above which reading from the sender pauses
LOW_WATER = 64 * 1024  # ... and at or below which it resumes
NO_BODY_STATUS = frozenset({204, 304})

# Date header: formatting it costs more than a whole head, so once a second.
_date_second = 0
_date_line = ""


def date_line() -> str:
    """``Date: <now>`` (RFC 9110 §6.6.1), formatted at most once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = "Date: " + formatdate(now, usegmt=True)
    return _date_line


def encode_head(first: str, items: Collection[tuple[str, str]], extra: Sequence[str] = ()) -> bytes:
    """A message head: the ``first`` line, ``items`` (name, value) as given, then ``extra`` lines.

    Raises ValueError when a line would hold CR, LF or NUL. Values came from
    our parsers as UTF-8 with surrogate escapes: the original bytes go out.
    """
    head = first + "\r\n"
    if items:
        head += "\r\n".join(map(": ".join, items)) + "\r\n"
    if extra:
        head += "\r\n".join(extra) + "\r\n"
    lines = 1 + len(items) + len(extra)
    # SECURITY: a CR or LF inside a line would split the message (header injection, smuggling).
    if head.count("\n") != lines or head.count("\r") != lines or "\x00" in head:
        raise ValueError("a header name or value, or the first line, holds CR, LF or NUL")
    return (head + "\r\n").encode("utf-8", "surrogateescape")


class Refused(Exception):
    """Raised from a parser callback to stop parsing; the connection keeps why in ``refusal``."""


class BodyBuffer:
    """A body as llhttp delivers it: buffered chunks with flow control, read as an async iterator.

    `feed` (the listener's ``on_body``; the client's does the same on its
    own) queues a chunk and asks the sender to pause once more than
    ``high_water`` bytes wait; `take` hands one back and lets the sender
    resume at `LOW_WATER`. Iterating yields the chunks, raises ``error`` if
    one was set before the end, and stops once the body is ``complete`` or
    ``discarded``. The holder supplies the hooks: how to pause and resume
    the sender and how to wait for the next chunk (with its own timeout),
    and calls `wake` when a wait should end.
    """

    __slots__ = ("chunks", "buffered", "received", "complete", "error", "discarded", "high_water", "waiter")

    def __init__(self) -> None:
        self.chunks: deque[bytes] = deque()
        self.buffered = 0  # bytes waiting in ``chunks``
        self.received = 0  # bytes fed in all
        self.complete = False
        self.error: BaseException | None = None
        self.discarded = False  # nobody will read: what still arrives is dropped
        self.high_water = HIGH_WATER
        self.waiter: asyncio.Future[None] | None = None

    def feed(self, chunk: bytes) -> None:
        if self.discarded:
            return
        self.chunks.append(chunk)
        size = len(chunk)
        self.buffered += size
        self.received += size
        if self.buffered > self.high_water:
            self.pause_sender()
        self.wake()

    def take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.buffered <= LOW_WATER:
            self.resume_sender()
        return chunk

    def take_all(self) -> bytes:
        """Everything buffered, as one ``bytes``."""
        data = b"".join(self.chunks)
        self.chunks.clear()
        self.buffered = 0
        return data

    def __aiter__(self) -> BodyBuffer:
        return self

    async def next_chunk(self) -> bytes:
        """The next chunk; StopAsyncIteration at the end of the body, ``error`` if it broke off."""
        while True:
            if self.chunks:
                return self.take()
            if self.error is not None:
                raise self.error
            if self.complete or self.discarded:
                raise StopAsyncIteration
            await self.wait_chunk()

    __anext__ = next_chunk

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_sender(self) -> None:
        raise NotImplementedError

    def resume_sender(self) -> None:
        """Called at or below `LOW_WATER`: resume reading from the sender if it was paused."""
        raise NotImplementedError

    async def wait_chunk(self) -> None:
        """Wait until `wake` (a chunk, the end, an error), or raise when waiting is over."""
        raise NotImplementedError


class WriteFlow:
    """The sending side's flow control: asyncio pauses and resumes writing, `drain` waits in between.

    The connection holds ``write_paused``, ``drain_waiter`` (the future
    `drain` awaits) and ``closed``, and supplies `drain` with its own bound
    on how long a peer may read nothing.
    """

    closed: bool
    write_paused: bool
    drain_waiter: asyncio.Future[None] | None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def drain_lost(self, reason: str) -> None:
        """The connection is lost: a wait in `drain` raises ConnectionResetError(``reason``)."""
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError(reason))

    async def drain(self) -> None:
        """Wait until the peer has read enough of what was written (raise once the connection closed)."""
        raise NotImplementedError


async def write_body(transport: asyncio.Transport, conn: WriteFlow, chunks: AsyncIterable[bytes], chunked: bool,
                     length: int | None) -> int:
    """Write a streamed body after its head: in chunks, or as is and exactly ``length`` bytes if given.

    Returns the body's size (chunk framing not counted).

    Waits on ``conn.drain()`` whenever the peer's side is full. Raises
    ConnectionResetError once the connection closed and ValueError when the
    body does not match its Content-Length: the caller cuts the connection,
    since the head is out.
    """
    sent = 0
    async for chunk in chunks:
        if conn.closed:
            raise ConnectionResetError("the connection closed")
        if not chunk:
            continue  # an empty chunk would end a chunked body
        if chunked:
            sent += len(chunk)
            transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            sent += len(chunk)
            # SECURITY: never more than the Content-Length we sent: the rest would be a next message.
            if length is not None and sent > length:
                raise ValueError("the body is longer than its Content-Length")
            transport.write(chunk)
        if conn.write_paused:
            await conn.drain()
    if chunked:
        transport.write(b"0\r\n\r\n")
    elif length is not None and sent != length:
        raise ValueError("the body is shorter than its Content-Length")
    return sent
