"""Shared fixtures: real local servers, a raw HTTP client for byte-exact requests, and the harness's
meshes under test (tests/harness.py)."""

from __future__ import annotations

import asyncio

import pytest

from .harness import eventually, free_port, make_mesh, wait_until  # noqa: F401 - shared here, make_mesh a fixture


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


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.fixture
def raw():
    return raw_http
