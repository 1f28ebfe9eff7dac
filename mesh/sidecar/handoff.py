"""Listening sockets a sidecar is given instead of opening them: inherited, or handed over a unix socket.

Whoever starts a sidecar may open a listener's socket for it (bound and
listening) and give it in one of two ways:

- inherited: the sidecar starts with the socket open as a file descriptor
  (``mesh sidecar --public-fd N``, likewise ``--mesh-fd``, ``--outbound-fd``
  and ``--admin-fd``); `inherited` checks it is a listening TCP socket. The
  process runtime opens a sidecar's mesh, outbound and admin sockets so: its
  app starts beside it, and the app's first calls wait in the outbound
  socket's backlog for the sidecar instead of being refused.
- handed over while it runs (``--public-handoff PATH``): the starter listens
  on the unix socket PATH (`Offer`); the sidecar connects to it as it starts
  (`Receiver`) and serves the socket the starter sends it (SCM_RIGHTS) from
  the moment it arrives. The controller sends an exposed service's public
  socket once the instance's app is ready, so a sidecar never takes outside
  requests before its app can answer them; and a socket made on the host
  reaches a sidecar in a container this way, still accepting the host's
  connections (a socket keeps the network namespace it was made in).

Either way the socket may be shared: several sidecars accept from one
listening socket, the kernel queues connections while none accepts, and a
sidecar that stops closes only its own descriptor (`mesh.http.server.Listener`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["LISTENERS", "Offer", "Receiver", "add_arguments", "inherited", "sockets_from"]

log = logging.getLogger("mesh.handoff")

LISTENERS = ("admin", "mesh", "outbound", "public")  # the listeners that can be given a socket
_MAX_ADDRESS = 100  # bytes of a unix socket's path that bind and connect take everywhere (108 on Linux)


def _peer_pid(conn: socket.socket) -> int:
    """The pid of the process at the other end of a connected unix socket (SO_PEERCRED, Linux)."""
    pid, _, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return int(pid)


def inherited(fd: int) -> socket.socket:
    """The listening TCP socket open as ``fd``; ValueError saying what it is otherwise."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"file descriptor {fd} is not an open socket ({exc.strerror})") from None
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"file descriptor {fd} is not a TCP socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"file descriptor {fd} is a TCP socket that is not listening")
    except BaseException:
        sock.detach()  # not ours to close
        raise
    sock.set_inheritable(False)
    return sock


@contextlib.contextmanager
def _address(path: Path) -> Iterator[str]:
    """What to bind or connect to for the unix socket ``path``: the path itself, or, when it is too long
    for a socket address, the same file through this process's descriptor of its folder (Linux)."""
    if len(os.fsencode(path)) < _MAX_ADDRESS:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


class Offer:
    """The starter's end: a unix socket at ``path`` (its folder made, mode 0700) for one sidecar to
    connect to; `give` sends that sidecar a listening socket."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by an earlier start of the same instance
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _address(path) as address:
                self._sock.bind(address)
            self._sock.listen(1)
            self._sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    async def give(self, listening: socket.socket, name: str, timeout: float, *, peer: int | None = None) -> None:
        """Send ``listening`` (for its listener ``name``) to the sidecar that connected, waiting up to
        ``timeout`` seconds for it to connect; OSError (TimeoutError) if it cannot be sent.

        With ``peer`` (the sidecar's pid), a connection from any other process is hung up on, unanswered:
        where the app runs as the sidecar's user, it could reach the offer too.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                conn, _ = await loop.sock_accept(self._sock)
                # SECURITY: the kernel says who connected (SO_PEERCRED); a socket goes to the sidecar only.
                if peer is None or _peer_pid(conn) == peer:
                    break
                log.warning("%s: a connection from pid %s, not the sidecar's (%s), refused", self.path,
                            _peer_pid(conn), peer)
                conn.close()
        with conn:
            socket.send_fds(conn, [name.encode()], [listening.fileno()])

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Receiver:
    """The sidecar's end: connected to the starter's `Offer` at ``path`` (OSError if none listens there)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.error: Exception | None = None  # why `pass_to` failed
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _address(Path(path)) as address:
                self._sock.connect(address)
        except BaseException:
            self._sock.close()
            raise
        self._sock.setblocking(False)

    async def receive(self) -> tuple[str, socket.socket]:
        """Wait for the starter to send a socket: the listener's name and the socket, checked as
        `inherited` checks one. ConnectionError if the starter hangs up first, ValueError if what it
        sent is not a listening TCP socket."""
        loop = asyncio.get_running_loop()
        fd = self._sock.fileno()
        arrived: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not arrived.done():
                arrived.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await arrived
        finally:
            loop.remove_reader(fd)
        message, fds, _, _ = socket.recv_fds(self._sock, 256, 4)
        for extra in fds[1:]:
            os.close(extra)
        if not fds:
            raise ConnectionError(f"{self.path}: closed before a socket was handed over")
        try:
            return message.decode(errors="replace"), inherited(fds[0])
        except ValueError:
            os.close(fds[0])
            raise

    async def pass_to(self, serve: Callable[[socket.socket], Awaitable[None]], failed: Callable[[], None]) -> None:
        """`receive` the socket, hang up, and ``serve`` it; if that fails, keep why in ``error`` and
        call ``failed``."""
        try:
            _, sock = await self.receive()
            self.close()
            await serve(sock)
        except (OSError, ValueError, RuntimeError) as exc:
            self.error = exc
            failed()
        finally:
            self.close()

    def close(self) -> None:
        self._sock.close()


def add_arguments(parser: Any) -> None:
    """`mesh sidecar`'s options for sockets it is given (`sockets_from` reads them)."""
    for name in LISTENERS:
        parser.add_argument(f"--{name}-fd", type=int, metavar="FD",
                            help=f"serve the {name} listener on this inherited file descriptor, a listening "
                                 f"TCP socket (instead of binding its port)")
    parser.add_argument("--public-handoff", metavar="PATH",
                        help="connect to the unix socket PATH at start and serve the public listener on the "
                             "listening socket sent there (SCM_RIGHTS), from when it arrives")


def sockets_from(args: Any) -> tuple[dict[str, socket.socket], Receiver | None]:
    """The sockets ``args`` give (listener -> socket) and the handoff to wait on; ValueError saying
    which option is wrong and why."""
    given = [option for option, value in (("--public-port", args.public_port), ("--public-fd", args.public_fd),
                                          ("--public-handoff", args.public_handoff)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)}: give the public listener one of them")
    sockets = {}
    for name in LISTENERS:
        fd = getattr(args, f"{name}_fd")
        if fd is not None:
            try:
                sockets[name] = inherited(fd)
            except ValueError as exc:
                raise ValueError(f"--{name}-fd {fd}: {exc}") from None
    receiver = None
    if args.public_handoff:
        try:
            receiver = Receiver(args.public_handoff)
        except OSError as exc:
            raise ValueError(f"--public-handoff {args.public_handoff}: cannot connect: {exc}") from None
    return sockets, receiver
