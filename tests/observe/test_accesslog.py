"""The access log: lines made as structs are written as one JSON object each, ASCII, whatever a client
or a plugin put in them; a line that cannot be written costs no other its line; the file is private,
rotated, and written on a timer and on close."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.observe.accesslog import AccessLog, encode, line_type, shared_fields


def line(index: int, *, path: Any = None, request_id: Any = None, peer: str | None = None, method: str = "GET",
         upstream: float | None = 1.0) -> Any:
    """Request ``index``'s line, request id ``r<index>``, as the observer makes it."""
    return line_type()(
        "2026-12-03T18:00:00.000Z", f"r{index}" if request_id is None else request_id, "a" * 32, "b" * 16,
        shared_fields("web", "web.1", peer, "public", method, "outside->web", 200),
        f"/items/{index}" if path is None else path, 0, index, 3.0, upstream, "127.0.0.1:8080", 0, None)


def parsed(*paths: Path) -> list[dict[str, Any]]:
    return [json.loads(text) for path in paths if path.exists() for text in path.read_text().splitlines()]


async def test_lines_are_written_to_a_private_file_on_a_timer_and_on_close(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "web.jsonl"
    log = AccessLog(path)
    made: list[Any] = []

    def collect() -> None:
        lines = made[:]
        del made[:]
        log.write(lines)

    log.collect = collect
    log.start()
    made.extend(line(index) for index in range(3))
    deadline = time.monotonic() + 60
    while len(parsed(path)) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the log's timer collects them
    assert [entry["request_id"] for entry in parsed(path)] == ["r0", "r1", "r2"]
    made.append(line(3))
    log.close()  # collects what is left
    entries = parsed(path)
    assert [entry["request_id"] for entry in entries] == ["r0", "r1", "r2", "r3"]
    assert entries[1] == {
        "time": "2026-12-03T18:00:00.000Z", "request_id": "r1", "trace_id": "a" * 32, "span_id": "b" * 16,
        "service": "web", "instance": "web.1", "peer": None, "direction": "public", "method": "GET",
        "route": "outside->web", "status": 200, "path": "/items/1", "bytes_in": 0, "bytes_out": 1,
        "duration_ms": 3.0, "upstream_duration_ms": 1.0, "upstream": "127.0.0.1:8080", "retries": 0,
        "answered_by": None}
    assert list(entries[1]) == list(entries[0])  # the same fields, in the same order, on every line
    assert oct(path.stat().st_mode & 0o777) == "0o600"


async def test_the_file_is_rotated_and_no_line_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "web.jsonl"
    log = AccessLog(path, max_bytes=100_000, backups=2)
    log.start()
    for start in range(0, 1500, 100):  # about 400 kB: rotated past 100 kB, the oldest file dropped
        log.write([line(index) for index in range(start, start + 100)])
    log.close()
    rotated = [path.with_name("web.jsonl.2"), path.with_name("web.jsonl.1"), path]
    assert all(file.exists() for file in rotated) and not path.with_name("web.jsonl.3").exists()
    ids = [int(entry["request_id"][1:]) for entry in parsed(*rotated)]
    assert ids == list(range(ids[0], 1500))  # the newest lines, in order, none missing
    assert all(file.stat().st_size <= 100_000 + 64 * 1024 for file in rotated)


def test_a_line_that_cannot_be_written_costs_no_other_its_line(caplog: pytest.LogCaptureFixture) -> None:
    """A plugin may leave its own object where text belongs, or fields that cannot be made into text;
    that line is left out, named in the log, and the others of its batch are written."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    lines = [line(index) for index in range(6)]
    lines[2] = line(2, path=object())
    text = encode(lines, {4: {"odd": Unprintable()}, 5: {"user": "ada", "status": "forged", 7: "seven"}})
    entries = [json.loads(entry) for entry in text.decode("ascii").splitlines()]
    assert [entry["request_id"] for entry in entries] == ["r0", "r1", "r3", "r5"]
    assert (entries[3]["user"], entries[3]["7"], entries[3]["status"]) == ("ada", "seven", 200)
    assert "request r2: cannot log it" in caplog.text
    assert "request r4: its plugins' log fields cannot be written" in caplog.text


def test_what_a_client_sent_is_escaped_and_read_back_as_it_was() -> None:
    """Paths, ids, methods and peers with quotes, controls, non-ASCII and text that is no Unicode (a
    lone surrogate) are written as ASCII JSON strings that read back as what was sent."""
    odd = ['/a"b\\c\n\x00', "/é☃", "/\udcff", "/\U0001f600"]
    lines = [line(index, path=path, request_id=path, peer=path, method=path[1:] or "X")
             for index, path in enumerate(odd)]
    text = encode(lines)
    assert text.isascii()
    entries = [json.loads(entry) for entry in text.decode("ascii").splitlines()]
    assert [(entry["path"], entry["request_id"], entry["peer"]) for entry in entries] == [(p, p, p) for p in odd]
    assert [entry["method"] for entry in entries] == [path[1:] for path in odd]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(), st.text(), st.one_of(st.none(), st.text()), st.integers(0, 10**15),
                          st.one_of(st.none(), st.floats(0, 1e6)),
                          st.dictionaries(st.text(), st.one_of(st.none(), st.text(), st.integers(), st.floats(),
                                                               st.booleans()), max_size=3)),
                min_size=1, max_size=20))
def test_every_line_is_one_json_object_whatever_it_holds(
        requests: list[tuple[str, str, str | None, int, float | None, dict[str, Any]]]) -> None:
    lines = [line(index, path=path, request_id=rid, peer=peer, upstream=upstream)
             for index, (path, rid, peer, _, upstream, _) in enumerate(requests)]
    fields = {index: own for index, (*_, own) in enumerate(requests) if own}
    text = encode(lines, fields)
    assert text.isascii()
    entries = [json.loads(entry) for entry in text.decode("ascii").splitlines()]
    assert len(entries) == len(requests)
    for entry, (path, rid, peer, _, upstream, own) in zip(entries, requests, strict=True):
        assert (entry["path"], entry["request_id"], entry["peer"], entry["status"]) == (path, rid, peer, 200)
        assert entry["upstream_duration_ms"] == upstream
        for name, item in own.items():
            if name not in {"service", "status", "path", "time", "request_id", "peer", "retries", "upstream",
                            "trace_id", "span_id", "instance", "direction", "method", "route", "bytes_in",
                            "bytes_out", "duration_ms", "upstream_duration_ms", "answered_by"}:
                assert entry[name] == (None if isinstance(item, float) and not math.isfinite(item) else item)


async def test_lines_go_to_stderr_when_asked(capfd: pytest.CaptureFixture[str]) -> None:
    log = AccessLog(stderr=True)
    log.start()
    log.write([line(1)])
    log.close()
    assert json.loads(capfd.readouterr().err)["request_id"] == "r1"
