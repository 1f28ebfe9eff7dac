"""Access logs: one JSON object per request per line, to a rotated file and, when asked, to stderr.

A sidecar writes a line for every request it answers (`mesh sidecar
--access-log FILE`; `mesh up` gives each sidecar
``.mesh/<mesh>/logs/<instance>.jsonl``, and `mesh logs` reads them). The
fields are listed in docs/observability.md.

A line is made as its request ends, as a `line_type` struct whose fields
are the line's values, ready to be written: the observer
(`mesh.sidecar.observing`) makes it, with the fields requests of the same
label set share (`shared_fields`) made once. Every `FLUSH_ROWS` lines, and
every `FLUSH_EVERY` seconds, the observer hands them to `AccessLog.write`;
msgspec writes the batch's JSON in one call (`encode`), and `Sink` appends
it to the file. When the file passes ``max_bytes`` it is rotated: FILE.1
becomes FILE.2, FILE becomes FILE.1, and a new FILE starts (``backups`` old
files kept).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from json.encoder import encode_basestring_ascii as quote
from pathlib import Path
from typing import IO, Any

__all__ = ["FLUSH_EVERY", "FLUSH_ROWS", "MILLIS", "AccessLog", "Sink", "encode", "fields_text", "line_type",
           "plugin_label", "rfc3339", "rfc3339_milli", "rfc3339_second", "shared_fields", "value"]

log = logging.getLogger("mesh.accesslog")

FLUSH_EVERY = 0.5  # seconds between writes of the lines made since the last
FLUSH_ROWS = 1024  # lines past which they are written at once
MAX_BYTES = 10 << 20

MILLIS = tuple(f".{milli:03d}Z" for milli in range(1000))  # what follows a second's text, by milliseconds
_clock: list[Any] = [-1, ""]  # the last second made into text, and its text

_RESERVED = frozenset({"time", "request_id", "trace_id", "span_id", "service", "instance", "peer", "direction",
                       "method", "path", "route", "status", "bytes_in", "bytes_out", "duration_ms",
                       "upstream_duration_ms", "upstream", "retries", "answered_by"})
_LABEL = re.compile(r"\(([^()]+)\)$")


def rfc3339_second(second: int) -> str:
    """``2026-12-02T17:30:01`` for a whole `time.time` second: made once a second (a line per request asks)."""
    if second != _clock[0]:
        _clock[0], _clock[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return _clock[1]


def rfc3339(now: float) -> str:
    """``2026-12-02T17:30:01.123Z`` for a `time.time` value."""
    second = int(now)
    return rfc3339_second(second) + MILLIS[int((now - second) * 1000)]


def rfc3339_milli(milli: int) -> str:
    """`rfc3339` of a whole `time.time` millisecond (``int(now * 1000)``)."""
    return rfc3339_second(milli // 1000) + MILLIS[milli % 1000]


def plugin_label(name: str) -> str:
    """The ``plugin`` label of a chain entry: ``jwt`` for ``services.web.plugins[0] (jwt)``."""
    found = _LABEL.search(name)
    return found.group(1) if found else name


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


def fields_text(fields: dict[Any, Any]) -> str:
    """A plugin's own fields, as they follow mesh's in a line (``,"user":"ada"``); mesh's own names are
    left out: a plugin adds fields, it never rewrites them."""
    return "".join(f",{quote(str(name))}:{value(item)}" for name, item in fields.items()
                   if str(name) not in _RESERVED)


# A line's fields, in their order. ``service`` holds the JSON of the seven fields from ``service`` to
# ``status`` (`shared_fields`): requests of one label set share them, and they are made into JSON once.
_LINE_FIELDS = (("time", str), ("request_id", str | None), ("trace_id", str | None), ("span_id", str | None),
                ("service", Any), ("path", str), ("bytes_in", int), ("bytes_out", int), ("duration_ms", float),
                ("upstream_duration_ms", float | None), ("upstream", str | None), ("retries", int),
                ("answered_by", str | None))
_STRINGS = tuple(name for name, kind in _LINE_FIELDS if kind in (str, str | None))
# msgspec's line type, encoder, Raw and structs.replace, made when first asked for (its import takes ~15 ms)
_json: list[Any] = []


def _msgspec() -> tuple[Any, Any, Any, Any]:
    """The line type, the encoder, `msgspec.Raw` and `msgspec.structs.replace`."""
    if not _json:
        import msgspec

        _json.extend((msgspec.defstruct("Line", _LINE_FIELDS, gc=False), msgspec.json.Encoder(), msgspec.Raw,
                      msgspec.structs.replace))
    return _json[0], _json[1], _json[2], _json[3]


def line_type() -> Callable[..., Any]:
    """The type of a line: called with its values, positionally, in the order of `_LINE_FIELDS` (``time``
    as `rfc3339` text, durations in milliseconds, ``service`` as `shared_fields` gives it)."""
    return _msgspec()[0]


def shared_fields(service: str, instance: str, peer: str | None, direction: str, method: str, route: str,
                  status: int) -> Any:
    """The line's ``service`` value: the JSON of ``service`` to ``status``, as msgspec writes it as it is
    (``"web","instance":"web.1",...,"status":200``). ASCII: what a client sent is escaped."""
    raw = _msgspec()[2]
    return raw(f'{quote(service)},"instance":{quote(instance)},"peer":{"null" if peer is None else quote(peer)},'
               f'"direction":{quote(direction)},"method":{quote(method)},"route":{quote(route)},'
               f'"status":{int(status)}'.encode("ascii"))


def encode(lines: Sequence[Any], fields: Mapping[int, dict[Any, Any]] | None = None) -> bytes:
    """The text of ``lines``, ASCII, a line each; ``fields`` are the plugins' own fields of some of them,
    by index. A line that cannot be written (a value of an odd type a plugin left) is left out, and the
    reason logged; the others are written."""
    if not lines:
        return b""
    _, encoder, _, _ = _msgspec()
    if not fields:
        try:
            data = encoder.encode_lines(lines)
        except Exception:  # a value of an odd type somewhere: line by line, so that it costs no other line
            data = b""
        if data.isascii() and data:
            return data
    fields = fields or {}
    return b"".join(_one(encoder, line, fields.get(index)) for index, line in enumerate(lines))


def _one(encoder: Any, line: Any, own: dict[Any, Any] | None) -> bytes:
    """`encode` of one line, with its plugins' fields; b"" when it cannot be written."""
    extra = b""
    if own:
        try:
            extra = fields_text(own).encode("ascii")
        except Exception:
            log.exception("request %s: its plugins' log fields cannot be written; its line is left out",
                          line.request_id)
            return b""
    try:
        data = encoder.encode(line)
    except Exception:  # an odd type, or text that is no Unicode (a lone surrogate): tried escaped
        data = b""
    if not data or not data.isascii():  # a client's or a plugin's text: every string escaped, as ASCII
        _, _, raw, replace = _msgspec()
        try:
            data = encoder.encode(replace(line, **{name: raw(quote(text).encode("ascii")) for name in _STRINGS
                                                   if isinstance(text := getattr(line, name), str)}))
        except Exception:
            log.exception("request %s: cannot log it", line.request_id)
            return b""
    return data[:-1] + extra + b"}\n" if extra else data + b"\n"


class Sink:
    """Where lines go: ``path`` (rotated past ``max_bytes``), stderr, or both."""

    def __init__(self, path: Path | None, stderr: bool, max_bytes: int = MAX_BYTES, backups: int = 2) -> None:
        self.path = path
        self.stderr = stderr
        self.max_bytes = max_bytes
        self.backups = backups
        self._file: IO[bytes] | None = None
        self._size = 0

    def open(self) -> None:
        if self.path is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            self._file = os.fdopen(fd, "ab", buffering=1 << 16)
            self._size = self._file.tell()

    def write(self, text: bytes) -> None:
        if not text:
            return
        if self.stderr:
            sys.stderr.write(text.decode("ascii"))
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
        if self._file is not None:
            self._file.close()
            self._file = None

    def _rotate(self) -> None:
        assert self.path is not None and self._file is not None
        self._file.close()
        for number in range(self.backups, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{number}")
            newer = self.path.with_name(f"{self.path.name}.{number - 1}") if number > 1 else self.path
            if newer.exists():
                os.replace(newer, older)
        self.open()


class AccessLog:
    """A sidecar's access log: where its lines go (``path``, rotated; stderr; or both). Whoever makes the
    lines hands them over with `write`, and sets ``collect`` to hand over what it holds: it is called
    every `FLUSH_EVERY` seconds and on `close`."""

    def __init__(self, path: str | Path | None = None, *, stderr: bool = False, max_bytes: int = MAX_BYTES,
                 backups: int = 2) -> None:
        self.path = Path(path) if path is not None else None
        self.stderr = stderr
        self.max_bytes = max_bytes
        self.backups = backups
        self.collect: Callable[[], None] = _nothing
        self._sink: Sink | None = None
        self._timer: Any = None

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.stderr

    def start(self) -> None:
        """Open the file (one that cannot be opened is an error at start, not later) and start the timer
        that writes what was made; must run in the event loop."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()
        self._timer = asyncio.get_running_loop().call_later(FLUSH_EVERY, self._tick)

    def write(self, lines: Sequence[Any], fields: Mapping[int, dict[Any, Any]] | None = None) -> None:
        """Write ``lines`` (`line_type`), with the plugins' own ``fields`` of some of them, by index."""
        self._open().write(encode(lines, fields))

    def close(self) -> None:
        """Write what was made, and close the file."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.collect()
        if self._sink is not None:
            self._sink.close()
            self._sink = None

    def _open(self) -> Sink:
        if self._sink is None:
            self._sink = Sink(self.path, self.stderr, self.max_bytes, self.backups)
            self._sink.open()
        return self._sink

    def _tick(self) -> None:
        try:
            self.collect()
        finally:  # a tick that failed (and said why) leaves the next one to come
            self._timer = asyncio.get_running_loop().call_later(FLUSH_EVERY, self._tick)
