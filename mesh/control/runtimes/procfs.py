"""The processes of this machine, read from /proc: alive, in a group, CPU used, started by a run.

Used by the process runtime, by `mesh ps` and `mesh down` (which find what a
run left behind without its controller) and by the tests. Where /proc is
missing, each says what it can from signals alone.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["RUN_VARIABLE", "group_alive", "pid_alive", "process_group_cpu", "run_processes"]

# Every app and sidecar of a `mesh up` run inherits MESH_RUN=<its run id>.
RUN_VARIABLE = "MESH_RUN"

_PROC = Path("/proc")


def _proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` from /proc (``Z`` for a zombie), or None without /proc."""
    if not _PROC.is_dir():
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return "gone"
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live process. A zombie is not alive: it only waits to be reaped."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_state(pid) not in ("Z", "X", "gone")


def group_alive(pgid: int | None) -> bool:
    """Whether any live (non-zombie) process is left in process group ``pgid``."""
    if not pgid:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not _PROC.is_dir():
        return True
    # The group exists, but its members may all be zombies nobody reaps (PID 1 in
    # a container often does not), so look at each member's state.
    for _, fields in _proc_stats():
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_group_cpu(pgid: int, proc: Path = _PROC) -> float | None:
    """CPU seconds used by process group ``pgid``: utime+stime(+cutime+cstime) of each member.

    None when no process of the group is left (or there is no /proc).
    """
    total = 0
    found = False
    try:
        entries = list(proc.iterdir())
    except OSError:
        return None
    for entry in entries:
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # After the command name: state(0) ppid(1) pgrp(2) ... utime(11) stime(12) cutime(13) cstime(14)
        fields = stat.rpartition(")")[2].split()
        if len(fields) < 15 or fields[2] != str(pgid):
            continue
        found = True
        total += sum(int(f) for f in fields[11:15])
    return total / _TICK if found else None


def _proc_stats() -> list[tuple[int, list[str]]]:
    """(pid, the fields of /proc/PID/stat after the command name) of every process."""
    found = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            found.append((int(entry.name), stat.rpartition(")")[2].split()))
    return found


def run_processes(run_id: str) -> list[int]:
    """Live processes started by the `mesh up` run ``run_id``, found by the
    ``MESH_RUN`` variable every app and sidecar inherits (so grandchildren that
    left their process group count too). Empty where /proc is missing."""
    if not run_id or not _PROC.is_dir():
        return []
    marker = f"{RUN_VARIABLE}={run_id}".encode()
    found = []
    for pid, fields in _proc_stats():
        if pid == os.getpid() or not fields or fields[0] in ("Z", "X"):
            continue
        try:
            environ = (_PROC / str(pid) / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(pid)
    return found

