"""Access logs: the file each sidecar writes, and `mesh logs`, which reads them merged.

Each sidecar appends one JSON object per request, one a line, to
``.mesh/<name>/logs/<instance label>.jsonl`` (`log_file`, given to ``mesh
sidecar --access-log``). Past 10 MiB it renames ``<label>.jsonl.1`` to
``<label>.jsonl.2`` and ``<label>.jsonl`` to ``<label>.jsonl.1``, then starts
a new file: ``.2`` is the oldest, the file without a suffix the newest.

`AccessLogs` reads a mesh's logs folder: `AccessLogs.existing` gives what
is there, every instance's files merged by ``time``; each `AccessLogs.new`
then gives the lines appended since, also from files that appeared meanwhile
and across a rotation (a file renamed away is read to its end before its
successor is opened). A line that is not a JSON object is skipped and
reported through ``warn``. `show` is `mesh logs`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, NamedTuple

__all__ = ["AccessLogs", "Entry", "format_entry", "log_file", "log_folder", "show"]

SUFFIX = ".jsonl"
ROTATED = (".2", ".1")  # the rotated files of one log, oldest first
_EARLIEST = datetime.min.replace(tzinfo=UTC)


def log_folder(state_dir: Path) -> Path:
    """Where a mesh's sidecars write their access logs."""
    return state_dir / "logs"


def log_file(state_dir: Path, label: str) -> Path:
    """The access log of the instance ``label``; makes the logs folder (mode 0700) if missing."""
    folder = log_folder(state_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder / f"{label}{SUFFIX}"


class Entry(NamedTuple):
    """One line of an access log: when (for sorting), the line as written, and its object."""

    when: datetime
    line: str
    record: dict[str, Any]


Warn = Callable[[str], None]


def _when(record: dict[str, Any], before: datetime) -> datetime:
    """The record's ``time`` (RFC 3339; UTC when it names no zone), else ``before``."""
    value = record.get("time")
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            return before
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    return before


class _Reader:
    """Complete lines of one file, numbered, from where the last read stopped; the last, unfinished
    line stays for the next read."""

    def __init__(self, path: Path, warn: Warn) -> None:
        self.path = path
        self.warn = warn
        self.handle: IO[bytes] | None = None
        self.ident: tuple[int, int] | None = None
        self.pending = b""
        self.number = 0
        self.last = _EARLIEST

    def open(self) -> bool:
        try:
            self.handle = open(self.path, "rb")  # noqa: SIM115 - kept open across reads
        except OSError:
            return False
        info = os.fstat(self.handle.fileno())
        self.ident = (info.st_dev, info.st_ino)
        self.pending, self.number = b"", 0
        return True

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.handle, self.ident = None, None

    def read(self, *, final: bool = False) -> list[Entry]:
        """The lines written since the last read; ``final``: the unfinished last line too."""
        if self.handle is None:
            return []
        chunks = self.pending + self.handle.read()
        *lines, self.pending = chunks.split(b"\n")
        if final and self.pending:
            lines.append(self.pending)
            self.pending = b""
        found = []
        for raw in lines:
            self.number += 1
            entry = self._entry(raw)
            if entry is not None:
                found.append(entry)
        return found

    def _entry(self, raw: bytes) -> Entry | None:
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            return None
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            self.warn(f"{self.path}:{self.number}: not a JSON object, skipped")
            return None
        self.last = _when(record, self.last)
        return Entry(self.last, line, record)


class _Log:
    """One instance's access log: its rotated files once, then the file being written, followed."""

    def __init__(self, path: Path, warn: Warn) -> None:
        self.path = path
        self.current = _Reader(path, warn)
        self.warn = warn

    def rotated(self) -> list[Entry]:
        found: list[Entry] = []
        for suffix in ROTATED:
            reader = _Reader(self.path.with_name(self.path.name + suffix), self.warn)
            if reader.open():
                found += reader.read(final=True)
                reader.close()
        return found

    def new(self, *, final: bool = False) -> list[Entry]:
        """What was appended since the last call; from the successor too once the file was rotated."""
        reader = self.current
        found = reader.read(final=final)
        try:
            info = self.path.stat()
        except OSError:
            return found  # renamed away, its successor not made yet: keep reading the old one
        if reader.ident != (info.st_dev, info.st_ino):
            # Rotated (or made since the last look): finish the old file, then start on the new one.
            found += reader.read(final=True)
            reader.close()
            if reader.open():
                found += reader.read(final=final)
        elif reader.handle is not None and info.st_size < reader.handle.tell():
            reader.handle.seek(0)  # cut short in place: read it again from its start
            reader.pending, reader.number = b"", 0
            found += reader.read(final=final)
        return found

    def close(self) -> None:
        self.current.close()


class AccessLogs:
    """The access logs in ``folder``, of the instances of ``service`` only when given (see the module
    docstring). ``warn`` is told of each line skipped."""

    def __init__(self, folder: Path, service: str | None = None, warn: Warn | None = None) -> None:
        self.folder = folder
        self.service = service
        self.warn = warn or (lambda text: print(f"mesh logs: {text}", file=sys.stderr))
        self._logs: dict[Path, _Log] = {}

    def _discover(self) -> list[_Log]:
        """The logs not seen before: one per file of the folder, rotated or not."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return []
        found = []
        for name in sorted(names):
            base = name.removesuffix(ROTATED[0]).removesuffix(ROTATED[1])
            path = self.folder / base
            if base.endswith(SUFFIX) and not base.startswith(".") and path not in self._logs:
                self._logs[path] = found_log = _Log(path, self.warn)
                found.append(found_log)
        return found

    def _keep(self, entries: list[Entry]) -> list[Entry]:
        kept = [e for e in entries if self.service is None or e.record.get("service") == self.service]
        return sorted(kept, key=lambda e: e.when)  # stable: one file's lines keep their order

    def existing(self, *, final: bool = True) -> list[Entry]:
        """Every line there is now, oldest first. ``final=False`` leaves a line still being written
        for `new` (following); otherwise it is read as it is."""
        found: list[Entry] = []
        for log in self._discover():
            found += log.rotated()
            found += log.new(final=final)
        return self._keep(found)

    def new(self) -> list[Entry]:
        """The lines appended since the last call (or `existing`), also those of new files; by time."""
        self._discover()
        found: list[Entry] = []
        for log in self._logs.values():
            found += log.new()
        return self._keep(found)

    def close(self) -> None:
        for log in self._logs.values():
            log.close()


def _text(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def format_entry(record: dict[str, Any]) -> str:
    """One request for a person to read: time, instance, direction, peer, "method path", status,
    duration, request id, and the plugin that answered when one did."""
    duration = record.get("duration_ms")
    took = f"{duration:.1f}ms" if isinstance(duration, int | float) else "-"
    line = (f"{_text(record.get('time'))} {_text(record.get('instance') or record.get('service'))} "
            f"{_text(record.get('direction'))} {_text(record.get('peer'))} "
            f"\"{_text(record.get('method'))} {_text(record.get('path'))}\" {_text(record.get('status'))} "
            f"{took} id={_text(record.get('request_id'))}")
    if record.get("answered_by"):
        line += f" answered_by={record['answered_by']}"
    return line


def show(state_dir: Path, service: str | None = None, *, follow: bool = False, as_json: bool = False,
         poll: float = 0.2) -> int:
    """`mesh logs`: print the access logs under ``state_dir`` (see the module docstring); with
    ``follow``, keep printing lines as they are appended until interrupted."""
    folder = log_folder(state_dir)
    logs = AccessLogs(folder, service)

    def emit(entries: list[Entry]) -> None:
        for entry in entries:
            print(entry.line if as_json else format_entry(entry.record))
        sys.stdout.flush()

    try:
        entries = logs.existing(final=not follow)
        if not entries:
            whose = f" of service {service!r}" if service else ""
            print(f"mesh logs: no access log lines{whose} yet in {folder}"
                  + ("; waiting for some (Ctrl-C stops)" if follow else ""), file=sys.stderr)
        emit(entries)
        while follow:
            time.sleep(poll)
            emit(logs.new())
    except KeyboardInterrupt:
        pass
    finally:
        logs.close()
    return 0
