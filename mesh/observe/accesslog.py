"""Access logs: one JSON object per request per line, to a rotated file and, when asked, to stderr.

A sidecar writes a line for every request it answers (`mesh sidecar
--access-log FILE`; `mesh up` gives each sidecar
``.mesh/<mesh>/logs/<instance>.jsonl``, and `mesh logs` reads them). The
fields are listed in docs/observability.md. Lines are built with the C
JSON string encoder and buffered: the file is written every `FLUSH_EVERY`
seconds, once `FLUSH_SIZE` characters wait, and on close, so a request
costs no system call of its own.
When the file passes ``max_bytes`` it is rotated: FILE.1 becomes FILE.2,
FILE becomes FILE.1, and a new FILE starts (``backups`` old files kept).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as quote
from pathlib import Path
from typing import IO, Any

__all__ = ["FLUSH_EVERY", "MILLIS", "AccessLog", "rfc3339", "rfc3339_second"]

log = logging.getLogger("mesh.accesslog")

FLUSH_EVERY = 0.5
FLUSH_SIZE = 64 << 10
MAX_BYTES = 10 << 20

MILLIS = tuple(f".{milli:03d}Z" for milli in range(1000))  # what follows a second's text, by milliseconds
_clock: list[Any] = [-1, ""]  # the last second made into text, and its text


def rfc3339_second(second: int) -> str:
    """``2026-12-02T17:30:01`` for a whole `time.time` second: made once a second (a line per request asks)."""
    if second != _clock[0]:
        _clock[0], _clock[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return _clock[1]


def rfc3339(now: float) -> str:
    """``2026-12-02T17:30:01.123Z`` for a `time.time` value."""
    second = int(now)
    return rfc3339_second(second) + MILLIS[int((now - second) * 1000)]


def _nothing() -> None:
    pass


def value(item: Any) -> str:
    """One JSON value: strings quoted (ASCII, escaped), numbers as they are, None as null."""
    if item is None:
        return "null"
    if isinstance(item, str):
        return quote(item)
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int | float):
        return repr(item) if item == item and item not in (float("inf"), float("-inf")) else "null"
    return quote(str(item))


class AccessLog:
    """Where a sidecar's access log lines go: ``path`` (rotated), stderr, or both."""

    def __init__(self, path: str | Path | None = None, *, stderr: bool = False,
                 max_bytes: int = MAX_BYTES, backups: int = 2) -> None:
        self.path = Path(path) if path is not None else None
        self.stderr = stderr
        self.max_bytes = max_bytes
        self.backups = backups
        self._text: list[str] = []  # lines written, not yet in the file
        self._queued = 0  # their characters
        # Called before each flush, for whoever writes in bulk to hand over what it holds.
        self.collect: Callable[[], None] = _nothing
        self._file: IO[str] | None = None
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.stderr

    def start(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open()
        self._timer = asyncio.get_running_loop().call_later(FLUSH_EVERY, self._tick)

    def write(self, text: str) -> None:
        """Queue lines (each a JSON object and its newline): in the file within `FLUSH_EVERY` seconds,
        at once past `FLUSH_SIZE` characters."""
        self._text.append(text)
        self._queued += len(text)
        if self._queued >= FLUSH_SIZE:
            self.flush()

    def _tick(self) -> None:
        self.collect()
        self.flush()
        self._timer = asyncio.get_running_loop().call_later(FLUSH_EVERY, self._tick)

    def flush(self) -> None:
        if not self._text:
            return
        text = "".join(self._text)
        self._text.clear()
        self._queued = 0
        if self.stderr:
            sys.stderr.write(text)
            sys.stderr.flush()
        if self._file is not None:
            try:
                self._file.write(text)
                self._file.flush()
                self._size += len(text)
                if self._size >= self.max_bytes:
                    self._rotate()
            except OSError as exc:  # a full disk loses log lines, never requests
                log.warning("access log %s: %s", self.path, exc)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.collect()
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> None:
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="ascii", buffering=1 << 16)
        self._size = self._file.tell()

    def _rotate(self) -> None:
        assert self.path is not None and self._file is not None
        self._file.close()
        for number in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            newer = self.path.with_name(f"{self.path.name}.{number - 1}") if number > 1 else self.path
            if newer.exists():
                os.replace(newer, older)
        self._open()
