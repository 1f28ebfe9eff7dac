"""What keeps a slow or hostile client from holding a listener's connection.

`ServerLimits` are a listener's limits: a header timeout (from the
connection, or from a later request's first bytes, to the end of its head),
an idle timeout between keep-alive requests, a body timeout between chunks
of a request body and while a client does not read what we write, a
minimum rate for slow request bodies, and caps on the request head (414,
431). A timeout is one deadline per connection (`Deadline`), set on state
changes, and the kinds below say what it means when it passes; one `Sweep`
per listener checks them a few times a second: no timer and no
``asyncio.timeout()`` per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mesh.errors import ClientTimeout

if TYPE_CHECKING:
    from mesh.http.exchange import RequestBody
    from mesh.http.server import Listener

__all__ = ["BODY", "HEAD", "IDLE", "LINGERING", "WRITE", "Deadline", "ServerLimits", "Sweep"]

log = logging.getLogger("mesh.server")

# What a connection's deadline means when it passes.
HEAD, IDLE, BODY, WRITE, LINGERING = 1, 2, 3, 4, 5

_monotonic = time.monotonic  # deadlines, in seconds


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


class Deadline:
    """A listener connection's one deadline: what it waits for, and what happens when it passes."""

    listener: Listener
    limits: ServerLimits
    transport: asyncio.Transport
    body_waiting: RequestBody | None
    deadline: float  # time.monotonic(); 0: none
    deadline_kind: int

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

    def abort(self) -> None:
        raise NotImplementedError


class Sweep:
    """A listener's one timer: acts on every connection whose deadline passed, while it has connections.

    It runs every ``tick`` seconds, so a timeout fires at most a tick late.
    """

    def __init__(self, name: str, limits: ServerLimits, connections: Collection[Deadline]) -> None:
        self.name = name
        self.connections = connections
        self.tick = max(0.05, min(0.5, limits.header_timeout / 4, limits.idle_timeout / 4,
                                  limits.body_timeout / 4))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """A connection opened: sweep from now on, unless already sweeping."""
        if self.timer is None:
            self.loop = loop
            self.timer = loop.call_later(self.tick, self.run)

    def run(self) -> None:
        now = _monotonic()
        for conn in list(self.connections):
            if conn.deadline and conn.deadline <= now:
                try:
                    conn.timed_out()
                except Exception:
                    log.exception("%s listener: a connection's timeout failed", self.name)
                    conn.abort()
        self.timer = self.loop.call_later(self.tick, self.run) if self.connections and self.loop else None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
