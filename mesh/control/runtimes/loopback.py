"""Loopback ports on this machine: free ones, taken ones, and what answers on one.

The process runtime gives instances free ports; every runtime checks an
``expose`` port is free before it starts, and asks a sidecar's admin listener
(published on 127.0.0.1 by the docker runtime) over plain HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
from collections.abc import Iterable
from pathlib import Path

__all__ = ["free_ports", "http_status", "port_in_use", "port_open"]

_EPHEMERAL = "/proc/sys/net/ipv4/ip_local_port_range"
_LOWEST = 10000  # below: ports that services and tools tend to claim as their own


def free_ports(count: int, avoid: Iterable[int] = ()) -> list[int]:
    """``count`` distinct free loopback ports, none of ``avoid``. All stay bound until all are
    chosen, so none repeats.

    They are chosen below the kernel's ephemeral range (``ip_local_port_range``), where no outgoing
    connection takes its source port: a port chosen now is still free when its process binds it.
    """
    low = _ephemeral_low()
    avoided = set(avoid)
    tries = 64 * count if low - _LOWEST >= 64 * count else 0
    candidates = (random.randrange(_LOWEST, low) for _ in range(tries))
    sockets = []
    chosen: list[int] = []
    ports = itertools.chain(candidates, itertools.repeat(0))  # then any port the kernel gives
    try:
        while len(chosen) < count:
            port = next(ports)
            if port in avoided:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            try:
                sock.bind(("127.0.0.1", port))  # no SO_REUSEADDR: a port in TIME_WAIT is not free
            except OSError:
                continue
            port = sock.getsockname()[1]
            if port not in avoided:
                chosen.append(port)
        return chosen
    finally:
        for sock in sockets:
            sock.close()


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(Path(_EPHEMERAL).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def http_status(port: int, path: str, timeout: float = 1.0, method: str = "GET",
                       body: bytes = b"", headers: dict[str, str] | None = None) -> int | None:
    """Status of ``METHOD path`` (with ``body`` and ``headers``) on 127.0.0.1:port, or None if it does not answer."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                length = f"Content-Length: {len(body)}\r\n" if method != "GET" else ""
                writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{length}{extra}"
                             f"Connection: close\r\n\r\n".encode() + body)
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    parts = line.split()
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return None


async def port_open(port: int, timeout: float = 1.0) -> bool:
    """Whether something accepts a connection on 127.0.0.1:port within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
