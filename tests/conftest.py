"""Shared fixtures: real local servers and a raw HTTP client for byte-exact requests."""

from __future__ import annotations

import asyncio
import socket

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def raw_http(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send ``data`` as is to 127.0.0.1:port and return every byte until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            return await reader.read(-1)
    finally:
        writer.close()


async def eventually(condition, *, timeout: float = 30.0, every: float = 0.02, what: str = "") -> None:
    """Wait until ``condition()`` is true: a bound generous enough for a slow, busy machine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout:g}s: {what or condition}")
        await asyncio.sleep(every)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.fixture
def raw():
    return raw_http
