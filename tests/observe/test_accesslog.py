"""The access log's writer process: it makes and writes the lines, and no line handed over is lost when
it dies, falls behind, cannot start or gets a Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from mesh.observe import accesslog
from mesh.observe.accesslog import AccessLog, Record


def records(first: int, count: int) -> list[Record]:
    """``count`` requests' records, request ids ``r<first>`` on."""
    return [("public", "GET", f"/items/{index}", f"r{index}", None, 200, 10.0, 10.002, 10.003, 0, index,
             "outside->web", 10.001, 0, "a" * 32, "b" * 16, "127.0.0.1:8080", None, "")
            for index in range(first, first + count)]


def ids(*paths: Path) -> list[str]:
    return [json.loads(line)["request_id"] for path in paths if path.exists()
            for line in path.read_text().splitlines()]


def hand_over(log: AccessLog, first: int, count: int, batch: int = 256) -> None:
    for start in range(first, first + count, batch):
        log.records("web", "web.1", 1000.0, records(start, min(batch, first + count - start)))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_writer_process_makes_and_writes_the_lines_and_close_waits_for_it(tmp_path: Path) -> None:
    log = AccessLog(tmp_path / "logs" / "web.jsonl", writer_after=0)
    log.start()
    writer = log._process
    assert writer is not None and writer.pid != os.getpid() and alive(writer.pid)
    hand_over(log, 0, 3000)
    log.close()
    assert writer.returncode == 0 and not alive(writer.pid)
    assert ids(tmp_path / "logs" / "web.jsonl") == [f"r{index}" for index in range(3000)]
    line = json.loads((tmp_path / "logs" / "web.jsonl").read_text().splitlines()[5])
    assert line["time"] == "1970-01-01T00:16:50.000Z"  # wall 1000 + started 10
    assert (line["service"], line["instance"], line["path"], line["bytes_out"]) == ("web", "web.1", "/items/5", 5)
    assert (line["duration_ms"], line["upstream_duration_ms"], line["upstream"]) == (3.0, 1.0, "127.0.0.1:8080")
    assert oct((tmp_path / "logs" / "web.jsonl").stat().st_mode & 0o777) == "0o600"


async def test_lines_handed_over_after_the_writer_died_are_written_by_the_sidecar(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog(tmp_path / "web.jsonl", writer_after=0)
    log.start()
    writer = log._process
    assert writer is not None
    hand_over(log, 0, 100)
    log.flush()
    writer.kill()
    writer.wait(60)
    hand_over(log, 100, 2000)
    log.close()
    logged = ids(tmp_path / "web.jsonl")
    # What the writer had been sent may have died with it; nothing handed over after is lost.
    assert logged[-2000:] == [f"r{index}" for index in range(100, 2100)]
    assert "the writer exited" in caplog.text


@pytest.mark.parametrize("how", ["writer_after=None", "no such interpreter"])
async def test_without_a_writer_the_sidecar_writes_the_lines(
        tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    if how == "no such interpreter":
        monkeypatch.setattr(accesslog.sys, "executable", str(tmp_path / "missing-python"))
    log = AccessLog(tmp_path / "web.jsonl", writer_after=None if how == "writer_after=None" else 0)
    log.start()
    assert log._process is None
    hand_over(log, 0, 1500)
    log.close()
    assert ids(tmp_path / "web.jsonl") == [f"r{index}" for index in range(1500)]
    assert ("no writer process" in caplog.text) == (how == "no such interpreter")


async def test_the_writer_rotates_the_file(tmp_path: Path) -> None:
    path = tmp_path / "web.jsonl"
    log = AccessLog(path, max_bytes=100_000, backups=2, writer_after=0)
    log.start()
    hand_over(log, 0, 600)  # about 250 kB: the file is rotated twice
    log.close()
    rotated = [path.with_name("web.jsonl.2"), path.with_name("web.jsonl.1"), path]
    assert all(file.exists() for file in rotated)
    assert ids(*rotated) == [f"r{index}" for index in range(600)]
    assert all(file.stat().st_size <= 100_000 + 64 * 1024 for file in rotated)


async def test_the_writer_is_out_of_reach_of_a_ctrl_c_to_its_sidecar(tmp_path: Path) -> None:
    """A Ctrl-C reaches the sidecar's process group; the writer has a session of its own, and ends
    when its sidecar closes the pipe, having written everything."""
    log = AccessLog(tmp_path / "web.jsonl", writer_after=0)
    log.start()
    writer = log._process
    assert writer is not None
    assert os.getpgid(writer.pid) != os.getpgid(0) and os.getsid(writer.pid) != os.getsid(0)
    hand_over(log, 0, 500)
    log.close()
    assert writer.returncode == 0
    assert ids(tmp_path / "web.jsonl") == [f"r{index}" for index in range(500)]


async def test_a_writer_that_falls_behind_slows_the_sidecar_and_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the writer's pipe cannot take waits in the sidecar; past MAX_UNSENT bytes the sidecar
    waits for the writer."""
    monkeypatch.setattr(accesslog, "MAX_UNSENT", 4 << 20)
    path = tmp_path / "web.jsonl"
    log = AccessLog(path, max_bytes=1 << 30, writer_after=0)
    log.start()
    writer = log._process
    assert writer is not None
    os.kill(writer.pid, signal.SIGSTOP)
    try:
        hand_over(log, 0, 20_000)  # about 2 MB: more than the pipe holds, less than MAX_UNSENT
        log.flush()
        assert log._unsent  # the rest waits here
        resume = threading.Timer(1.0, os.kill, (writer.pid, signal.SIGCONT))
        resume.start()
        began = time.monotonic()
        hand_over(log, 20_000, 40_000)  # past MAX_UNSENT: the sidecar waits for the writer to read again
        assert time.monotonic() - began >= 0.9
        resume.join()
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    log.close()
    assert ids(path) == [f"r{index}" for index in range(60_000)]


async def test_a_sidecar_starts_its_writer_once_it_is_busy(tmp_path: Path) -> None:
    """Lines are made in the sidecar while it is quiet, by the writer from the first busy flush on,
    in one file, in order."""
    log = AccessLog(tmp_path / "web.jsonl", writer_after=accesslog.WRITER_AFTER)
    log.start()
    hand_over(log, 0, 10, batch=1)
    deadline = time.monotonic() + 60
    while len(ids(tmp_path / "web.jsonl")) < 10 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the log's tick writes them
    assert ids(tmp_path / "web.jsonl") == [f"r{index}" for index in range(10)]
    assert log._process is None
    hand_over(log, 10, accesslog.WRITER_AFTER)
    log.flush()
    assert log._process is not None
    hand_over(log, 10 + accesslog.WRITER_AFTER, 500)
    log.close()
    assert ids(tmp_path / "web.jsonl") == [f"r{index}" for index in range(510 + accesslog.WRITER_AFTER)]


@pytest.mark.parametrize(("cpus", "writer_after"), [(2, None), (accesslog.WRITER_CPUS, accesslog.WRITER_AFTER)])
def test_a_sidecar_has_a_writer_only_where_it_has_cpus_to_spare(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpus: int, writer_after: int | None) -> None:
    """With few CPUs the sidecar, its app and their clients share them: the writer's own work (a
    process, unmarshalling) would cost more than making the lines in the sidecar."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert AccessLog(tmp_path / "web.jsonl").writer_after == writer_after
    assert AccessLog(tmp_path / "web.jsonl", writer_after=0).writer_after == 0


async def test_a_request_marshal_cannot_carry_costs_no_other_its_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A plugin may leave its own object where a string belongs (as a request's path); with a writer,
    that request is left out of the log, as it is without one, and its batch's others are written."""
    log = AccessLog(tmp_path / "web.jsonl", writer_after=0)
    log.start()
    batch = records(0, 10)
    batch[4] = (*batch[4][:2], object(), *batch[4][3:])
    log.records("web", "web.1", 1000.0, batch)
    hand_over(log, 10, 5)
    log.close()
    assert ids(tmp_path / "web.jsonl") == [f"r{index}" for index in range(15) if index != 4]
    assert "request r4: cannot log it: unmarshallable object" in caplog.text
