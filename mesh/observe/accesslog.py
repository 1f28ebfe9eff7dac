"""Access logs: one JSON object per request per line, to a rotated file and, when asked, to stderr.

A sidecar writes a line for every request it answers (`mesh sidecar
--access-log FILE`; `mesh up` gives each sidecar
``.mesh/<mesh>/logs/<instance>.jsonl``, and `mesh logs` reads them). The
fields are listed in docs/observability.md.

A sidecar hands each batch of requests' `Record` tuples to
`AccessLog.records`; the lines are made (`Lines`: a field at a time over
the batch, the JSON by msgspec) and written (`Sink`) every `FLUSH_EVERY`
seconds, once `FLUSH_ROWS` requests wait, and on close. At first the
sidecar does this itself. Once it is busy (`WRITER_AFTER` requests within
`FLUSH_EVERY` seconds), and where it may run on `WRITER_CPUS` CPUs or more,
it starts a writer process, this module run as a script (``python -I
accesslog.py``), and from then on sends it the batches, marshalled, down a
pipe: the lines are made on another core, and a request costs the sidecar's
event loop a fraction of what making its line would. On fewer CPUs the
sidecar keeps making them: the writer's own work (unmarshalling, a process
of its own) would cost the machine more than it takes off the sidecar.
Closing waits for the writer to finish. When the writer cannot start or
exits, the sidecar makes and writes the lines itself from then on (and says so).
When the file passes ``max_bytes`` it is rotated: FILE.1 becomes FILE.2,
FILE becomes FILE.1, and a new FILE starts (``backups`` old files kept).
"""

from __future__ import annotations

import argparse
import logging
import marshal
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from json.encoder import encode_basestring_ascii as quote
from operator import add, mul, sub, truediv
from pathlib import Path
from typing import IO, Any, Literal

__all__ = ["FLUSH_EVERY", "MILLIS", "AccessLog", "Lines", "Record", "Sink", "plugin_label", "rfc3339",
           "rfc3339_second", "value"]

log = logging.getLogger("mesh.accesslog")

FLUSH_EVERY = 0.5
FLUSH_ROWS = 1024
WRITER_AFTER = 256  # requests within FLUSH_EVERY seconds that make a sidecar start its writer process
# CPUs this process may run on from which a busy sidecar starts a writer. With fewer, the sidecar, its app
# and their clients share them, and the writer's own work (a process; unmarshalling) costs more than it saves.
WRITER_CPUS = 3
WRITER_POLL = 0.1  # seconds between the writer's looks at its pipe, when it finds nothing
MAX_BYTES = 10 << 20
MAX_UNSENT = 16 << 20  # bytes the writer has not taken yet, past which the sidecar waits for it
_CLOSE_WAIT = 10.0  # seconds close() gives the writer to write what it was sent
_MARSHAL = 4  # marshal's format: the writer runs the sidecar's own Python

# A request as the access log gets it: direction, method, path, request id, peer, status, started,
# answered, ended (time.monotonic() at its head, its response's head, its end), bytes in, bytes out,
# route, upstream started (monotonic, or None), retries, trace id, span id (or None), upstream address
# (or None), the chain entry that answered (or None), and the plugins' own fields as text ("" or
# ',"user":"ada"'). Only strings, numbers and None: marshal carries them to the writer.
Record = tuple[Any, ...]

MILLIS = tuple(f".{milli:03d}Z" for milli in range(1000))  # what follows a second's text, by milliseconds
_clock: list[Any] = [-1, ""]  # the last second made into text, and its text

_RESERVED = frozenset({"time", "request_id", "trace_id", "span_id", "service", "instance", "peer", "direction",
                       "method", "path", "route", "status", "bytes_in", "bytes_out", "duration_ms",
                       "upstream_duration_ms", "upstream", "retries", "answered_by"})
_NO_IDS = '"trace_id":null,"span_id":null,'
_REMEMBERED = 4096  # texts `Lines` keeps for values from small sets
_LABEL = re.compile(r"\(([^()]+)\)$")


def _millis(ends: Sequence[float], starts: Sequence[float]) -> Iterator[float]:
    """``end - start`` of each pair, in milliseconds to the microsecond (``0.512``, never ``0.5120000001``)."""
    count = len(ends)
    return map(truediv, map(int, map(mul, map(sub, ends, starts), repeat(1e6, count))), repeat(1000, count))


def rfc3339_second(second: int) -> str:
    """``2026-12-02T17:30:01`` for a whole `time.time` second: made once a second (a line per request asks)."""
    if second != _clock[0]:
        _clock[0], _clock[1] = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return _clock[1]


def rfc3339(now: float) -> str:
    """``2026-12-02T17:30:01.123Z`` for a `time.time` value."""
    second = int(now)
    return rfc3339_second(second) + MILLIS[int((now - second) * 1000)]


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


_LINE_FIELDS = (("time", str), ("request_id", str | None), ("trace_id", str | None), ("span_id", str | None),
                ("service", str), ("instance", str), ("peer", str | None), ("direction", str), ("method", str),
                ("route", str), ("status", int), ("path", str), ("bytes_in", int), ("bytes_out", int),
                ("duration_ms", float), ("upstream_duration_ms", float | None), ("upstream", str | None),
                ("retries", int), ("answered_by", str | None))
_json: list[Any] = []  # msgspec's line type and encoder, made when the first line is (msgspec takes ~15 ms to import)


def _encoding() -> tuple[Any, Any]:
    """A line's type (its fields in their order; `Lines` makes them a field at a time and msgspec the
    JSON) and the encoder."""
    if not _json:
        import msgspec

        _json.extend((msgspec.defstruct("Line", _LINE_FIELDS, gc=False), msgspec.json.Encoder()))
    return _json[0], _json[1]


class Lines:
    """Makes the lines of `Record` tuples."""

    def __init__(self) -> None:
        # The fields requests with the same (service, instance, peer, direction, method, route, status)
        # share, as text; and JSON strings of values from small sets (routes, methods, upstreams, plugins).
        self._middles: dict[tuple[Any, ...], str] = {}
        self._quoted: dict[str | None, str] = {None: "null"}
        self._labels: dict[str | None, str | None] = {None: None}  # chain entry -> its plugin label

    def make(self, service: str, instance: str, wall: float, records: Sequence[Record]) -> bytes:
        """The lines of ``records``, in order, ASCII; ``wall`` turns their monotonic times into times of
        day. A record whose line cannot be made is left out, and the reason logged."""
        if not records:
            return b""
        try:
            data = self._columns(service, instance, wall, records)
        except Exception:  # a value of an odd type somewhere: line by line, so that it costs no other line
            data = b""
        if not data.isascii():  # a plugin's path or id: escaped, line by line
            data = b""
        return data or self._rows(service, instance, wall, records).encode("ascii")

    def _columns(self, service: str, instance: str, wall: float, records: Sequence[Record]) -> bytes:
        """`make`, a field at a time over the whole batch: each step is one C call for all the batch's
        values (`map`, `zip`), and msgspec writes the lines; Python runs per request only for a value
        that can be missing where it is (a request with no upstream call) and for plugins' fields."""
        (directions, methods, paths, rids, peers, statuses, started, answered, ended, received, sent, routes,
         began, tried, trace_ids, span_ids, addresses, by, extra) = zip(*records, strict=True)
        count = len(records)
        millis = list(map(int, map(mul, map(add, started, repeat(wall, count)), repeat(1000.0, count))))
        stamps = {milli: rfc3339_second(milli // 1000) + MILLIS[milli % 1000] for milli in set(millis)}
        upstream = (_millis(answered, began) if None not in began else
                    [None if start is None else int((end - start) * 1e6) / 1000
                     for start, end in zip(began, answered, strict=True)])
        labels = self._labels
        answered_by = map(labels.__getitem__, by) if labels.keys() >= set(by) else map(self._label, by)
        line_type, encoder = _encoding()
        lines = list(map(line_type, map(stamps.__getitem__, millis), rids, trace_ids, span_ids, repeat(service, count),
                         repeat(instance, count), peers, directions, methods, routes, statuses, paths, received, sent,
                         _millis(ended, started), upstream, addresses, tried, answered_by))
        if not any(extra):
            return encoder.encode_lines(lines)
        # The plugins' fields follow mesh's: each such line's closing brace moves after them.
        return b"".join(encoder.encode(line)[:-1] + fields.encode("ascii") + b"}\n" if fields else
                        encoder.encode(line) + b"\n" for line, fields in zip(lines, extra, strict=True))

    def _quote(self, item: str) -> str:
        text = self._quoted.get(item)
        if text is None:
            text = quote(item)
            if len(self._quoted) < _REMEMBERED:  # a client's odd method must not grow it forever
                self._quoted[item] = text
        return text

    def _label(self, name: str | None) -> str | None:
        """The plugin label of the chain entry that answered (`plugin_label`), or None."""
        label = self._labels.get(name)
        if label is None and name is not None:
            label = plugin_label(name)
            if len(self._labels) < _REMEMBERED:
                self._labels[name] = label
        return label

    def _middle(self, key: tuple[Any, ...]) -> str:
        service, instance, peer, direction, method, route, status = key
        q = self._quote
        text = (f'"service":{q(service)},"instance":{q(instance)},"peer":{"null" if peer is None else q(peer)},'
                f'"direction":{q(direction)},"method":{q(method)},"route":{q(route)},"status":{int(status)},')
        if len(self._middles) < _REMEMBERED:
            self._middles[key] = text
        return text

    def _rows(self, service: str, instance: str, wall: float, records: Sequence[Record]) -> str:
        """`make`, a line at a time, each under its own ``try``."""
        lines = []
        middles, middle_of, quoted, q, millis = self._middles, self._middle, self._quoted, self._quote, MILLIS
        label_of = self._label
        second, stamp = -1, ""
        for (direction, method, path, rid, peer, status, started, answered, ended, received, sent, route,
             began, tried, trace_id, span_id, address, by, extra) in records:
            try:
                key = (service, instance, peer, direction, method, route, status)
                middle = middles.get(key) or middle_of(key)
                at = wall + started
                if int(at) != second:
                    second = int(at)
                    stamp = rfc3339_second(second)
                label = label_of(by)
                ids = _NO_IDS if trace_id is None else f'"trace_id":"{trace_id}","span_id":"{span_id}",'
                lines.append(
                    f'{{"time":"{stamp}{millis[int((at - second) * 1000)]}",'
                    f'"request_id":{"null" if rid is None else quote(rid)},{ids}{middle}'
                    f'"path":{quote(path)},"bytes_in":{received},"bytes_out":{sent},'
                    f'"duration_ms":{(ended - started) * 1000:.3f},"upstream_duration_ms":'
                    f'{"null" if began is None else f"{(answered - began) * 1000:.3f}"},'
                    f'"upstream":{quoted.get(address) or q(address)},"retries":{tried},'
                    f'"answered_by":{"null" if label is None else quote(label)}{extra}}}\n')
            except Exception:  # one request's line costs no other's
                log.exception("request %s: cannot log it", rid)
        return "".join(lines)


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
    """A sidecar's access log: where its lines go (``path``, rotated; stderr; or both), and who makes and
    writes them: this process at first, a writer process once ``writer_after`` requests come within
    `FLUSH_EVERY` seconds (0: from the start; None: never; "auto": `WRITER_AFTER` where this process may
    run on `WRITER_CPUS` CPUs or more, else never)."""

    def __init__(self, path: str | Path | None = None, *, stderr: bool = False, max_bytes: int = MAX_BYTES,
                 backups: int = 2, writer_after: int | None | Literal["auto"] = "auto") -> None:
        self.path = Path(path) if path is not None else None
        self.stderr = stderr
        self.max_bytes = max_bytes
        self.backups = backups
        if writer_after == "auto":
            writer_after = WRITER_AFTER if _cpus() >= WRITER_CPUS else None
        self.writer_after = writer_after
        self._recent = 0  # requests handed over since the last tick
        # Called before each flush, for whoever hands over records in bulk to hand over what it holds.
        self.collect: Callable[[], None] = _nothing
        self._batches: list[tuple[str, str, float, list[Record]]] = []  # handed over, not sent yet
        self._rows = 0  # their records
        self._process: subprocess.Popen[bytes] | None = None
        self._unsent: list[bytes] = []  # frames sent to the writer in part or not at all
        self._offset = 0  # how much of the first was sent
        self._here: tuple[Lines, Sink] | None = None  # when this process makes and writes the lines
        self._timer: Any = None

    @property
    def enabled(self) -> bool:
        return self.path is not None or self.stderr

    def start(self) -> None:
        """Open the log: start the writer (or open the file here); must run in the event loop."""
        import asyncio  # here: the writer process, this module run as a script, never needs it

        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.writer_after == 0:
            self._spawn()
        if self._process is None:
            self._write_here()  # opens the file now: one that cannot be is an error at start, not later
        self._timer = asyncio.get_running_loop().call_later(FLUSH_EVERY, self._tick)

    def records(self, service: str, instance: str, wall: float, records: list[Record]) -> None:
        """Queue requests' records: logged within `FLUSH_EVERY` seconds, at once past `FLUSH_ROWS`.
        ``wall`` is `time.time` minus `time.monotonic`, when they were handed over."""
        self._batches.append((service, instance, wall, records))
        self._rows += len(records)
        self._recent += len(records)
        if self._rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Send what is queued to the writer (as much as its pipe takes now), or write it here."""
        if self._process is None and self.writer_after is not None and self._recent >= self.writer_after:
            self._spawn()
        batches = self._batches
        if batches:
            self._batches = []
            self._rows = 0
            if self._process is not None:
                self._unsent.extend(map(_frame, batches))
            else:
                self._write_here(batches)
        if self._unsent:
            self._send()

    def close(self) -> None:
        """Log everything handed over, and wait (a few seconds at most) for the writer to finish."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.collect()
        self.flush()
        if self._process is not None:
            self._send(wait=True)  # a writer found gone here leaves the rest to this process, and says so
        process = self._process
        if process is not None:
            assert process.stdin is not None
            self._process = None
            try:
                process.stdin.close()
            except OSError:
                pass
            try:
                code = process.wait(_CLOSE_WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
                log.warning("access log %s: the writer did not finish in %.0f s", self._where, _CLOSE_WAIT)
            if code:
                log.warning("access log %s: the writer exited with %s", self._where, code)
        if self._here is not None:
            self._here[1].close()
            self._here = None

    @property
    def _where(self) -> str:
        return str(self.path) if self.path is not None else "(stderr)"

    def _tick(self) -> None:
        import asyncio

        try:
            self.collect()
            self.flush()
        finally:  # a tick that failed (and said why) leaves the next one to come
            self._recent = 0
            self._timer = asyncio.get_running_loop().call_later(FLUSH_EVERY, self._tick)

    def _spawn(self) -> None:
        argv = [sys.executable, "-I", str(Path(__file__).resolve()), "--max-bytes", str(self.max_bytes),
                "--backups", str(self.backups)]
        if self.path is not None:
            argv += ["--path", str(self.path)]
        if self.stderr:
            argv.append("--stderr")
        try:
            # In a session of its own: a Ctrl-C or a signal to the sidecar's process group stops the
            # sidecar, which closes the pipe; the writer writes what it was sent, then exits.
            self._process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             close_fds=True, start_new_session=True)
        except OSError as exc:
            log.warning("access log %s: no writer process (%s); lines are made in the sidecar", self._where, exc)
            self.writer_after = None
            return
        if self._here is not None:  # the writer appends to the file from here on
            self._here[1].close()
            self._here = None
        assert self._process.stdin is not None
        fd = self._process.stdin.fileno()
        os.set_blocking(fd, False)
        try:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, 1 << 20)  # room for a second of batches at a high rate
        except OSError:
            pass

    def _send(self, wait: bool = False) -> None:
        """Write unsent frames to the writer's pipe: what it takes now; all of them when ``wait`` or when
        more than `MAX_UNSENT` bytes wait (a writer that falls behind slows the sidecar, it loses nothing)."""
        process = self._process
        assert process is not None and process.stdin is not None
        fd = process.stdin.fileno()
        unsent = self._unsent
        if not wait and sum(map(len, unsent)) - self._offset > MAX_UNSENT:
            wait = True
        if wait:
            os.set_blocking(fd, True)
        try:
            while unsent:
                first = unsent[0]
                self._offset += os.write(fd, memoryview(first)[self._offset:])
                if self._offset == len(first):
                    del unsent[0]
                    self._offset = 0
        except BlockingIOError:
            pass
        except OSError as exc:  # the writer is gone: what it was sent in full, it took with it
            log.warning("access log %s: the writer exited (%s); lines are made in the sidecar from now on",
                        self._where, exc)
            self._process = None
            self.writer_after = None
            try:
                process.stdin.close()
            except OSError:
                pass
            process.wait()
            self._write_here([marshal.loads(frame[4:]) for frame in unsent])
            unsent.clear()
            self._offset = 0
        finally:
            if wait and self._process is not None:
                os.set_blocking(fd, False)

    def _write_here(self, batches: Sequence[tuple[str, str, float, list[Record]]] = ()) -> None:
        if self._here is None:
            sink = Sink(self.path, self.stderr, self.max_bytes, self.backups)
            sink.open()
            self._here = (Lines(), sink)
        lines, sink = self._here
        for service, instance, wall, records in batches:
            sink.write(lines.make(service, instance, wall, records))


def _cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _frame(batch: tuple[str, str, float, list[Record]]) -> bytes:
    """A batch as the writer reads it: its length, then the batch marshalled. A request holding a
    value marshal cannot carry (a plugin's own object as its id or path) is left out, and said so:
    in this process its line could not be made either."""
    try:
        frame = marshal.dumps(batch, _MARSHAL)
    except ValueError:
        service, instance, wall, records = batch
        kept = []
        for record in records:
            try:
                marshal.dumps(record, _MARSHAL)
            except ValueError as exc:
                log.error("request %s: cannot log it: %s", record[3], exc)
            else:
                kept.append(record)
        frame = marshal.dumps((service, instance, wall, kept), _MARSHAL)
    return len(frame).to_bytes(4, "big") + frame


def main(argv: Sequence[str] | None = None) -> int:
    """The writer process: make and write the lines of the batches its sidecar sends, until it closes
    the pipe (when it stops, or when it dies).

    It looks at the pipe every `WRITER_POLL` seconds rather than waiting on it: a reader waiting on a
    pipe is woken by each write, and Linux tends to run it on the writing process's core; on a timer
    it runs where there is room, not in its sidecar's way."""
    parser = argparse.ArgumentParser(prog="mesh access log writer")
    parser.add_argument("--path", type=Path)
    parser.add_argument("--stderr", action="store_true")
    parser.add_argument("--max-bytes", type=int, default=MAX_BYTES)
    parser.add_argument("--backups", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="mesh access log writer: %(message)s")
    sink = Sink(args.path, args.stderr, args.max_bytes, args.backups)
    sink.open()
    lines = Lines()
    pipe = sys.stdin.fileno()
    os.set_blocking(pipe, False)
    received = bytearray()
    try:
        while True:
            try:
                chunk = os.read(pipe, 1 << 20)
            except BlockingIOError:
                time.sleep(WRITER_POLL)
                continue
            if not chunk:
                break
            received += chunk
            start = 0
            while len(received) - start >= 4:
                end = start + 4 + int.from_bytes(received[start:start + 4], "big")
                if end > len(received):
                    break
                service, instance, wall, records = marshal.loads(received[start + 4:end])
                sink.write(lines.make(service, instance, wall, records))
                start = end
            del received[:start]
    finally:
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
