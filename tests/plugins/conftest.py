"""Fixtures for plugin tests: a real redis-server on 127.0.0.1.

``redis_server`` is one server for the whole session (tests keep apart by
using their own service names); ``private_redis`` is a fresh one for a test
that freezes or kills it. Both are started with persistence off and
stopped by their pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisServer:
    """A redis-server process we started: freeze it, thaw it, kill it."""

    port: int
    process: subprocess.Popen[bytes]
    frozen: bool = field(default=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def freeze(self) -> None:
        """SIGSTOP: connections stay open and nothing answers, like a hung server."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        if self.frozen:
            self.thaw()
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(timeout=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis(workdir: Path) -> RedisServer:
    """Start redis-server on a free port; retry if another process took the port first."""
    for _attempt in range(3):
        port = _free_port()
        process = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
             "--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = RedisServer(port, process)
        deadline = time.monotonic() + 60  # generous: a loaded machine starts it late
        while time.monotonic() < deadline and process.poll() is None:
            if _answers_ping(port):
                return server
            time.sleep(0.02)
        server.stop()
    raise RuntimeError("redis-server did not start")


def _need_redis() -> None:
    if not os.access(REDIS_SERVER, os.X_OK):
        pytest.skip("redis-server is not installed")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    _need_redis()
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    _need_redis()
    server = start_redis(tmp_path)
    try:
        yield server
    finally:
        server.stop()
