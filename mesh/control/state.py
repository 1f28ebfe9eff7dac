"""A mesh's state folder, and what `mesh up -d`, `mesh ps` and `mesh down` do with it.

A running controller (`mesh.control.controller.Controller`) keeps its files
in the mesh's state dir; other processes talk to it through them::

    .mesh/<name>/controller.lock   held (flock) while a controller runs
    .mesh/<name>/controller.pid    its pid, for `mesh down`
    .mesh/<name>/state.json        phase, instances, addresses, pids
    .mesh/<name>/registry.json     service -> mesh addresses in rotation, read by sidecars at start
    .mesh/<name>/ca/               the mesh CA (ca.pem, ca.key mode 0600), kept across runs
    .mesh/<name>/certs/<instance>/ each sidecar's cert.pem, key.pem and ca.pem (mutual TLS)
    .mesh/<name>/admin.token       this run's token for the sidecars' admin listeners (mode 0600; `mesh.sidecar.admin`)
    .mesh/<name>/dashboard.token   this run's token for the dashboard (0600, while it runs; `mesh.control.dashboard`)
    .mesh/<name>/logs/             each sidecar's access log, <instance>.jsonl (rotated: .1, .2), read by `mesh logs`
    .mesh/<name>/volumes/          process runtime: a folder per key of a keyed service with ``volume`` (0700),
                                   kept across runs; only `mesh down --volumes` removes it
    .mesh/<name>/up.log            output of a detached controller (`mesh up -d`)

state.json is the contract for scripts; `mesh ps --json` prints it with
each state checked against live pids and ``controller.running`` added::

    {"mesh": "hello", "config": "/abs/mesh.toml", "runtime": "process",
     "phase": "starting" | "running" | "stopping" | "stopped" | "failed",
     "error": null | "what failed, with the last output lines",
     "controller": {"pid": 123, "metrics": "http://127.0.0.1:PORT/metrics",
                    "dashboard": "http://127.0.0.1:PORT/?token=..."},   (both while it serves them)
     "run": "<MESH_RUN id of its processes>",
     "ca_rotation": {"done": 0 (rotations finished, failed ones too), "rotating": false,
                     "error": null | "why the last one failed"},
     "instances": [{"service": "web", "instance": 1, "label": "web",
                    "state": "starting" | "running" | "stopped" | "exited", "problem": null,
                    "exit_code": 0 (once "exited": how its app ended; it is not restarted),
                    "healthy": true | false | null (no health path),
                    "addresses": {"app": "127.0.0.1:40001", "mesh": ..., "outbound": ..., "admin": ...},
                    "public": "http://127.0.0.1:8080" | null,
                    "pids": {"sidecar": 124, "app": 125}, "pgids": {...}}]}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mesh.config import MeshConfig
from mesh.control.runtimes import RUNTIMES, runtime_class
from mesh.control.runtimes.base import Runtime, RuntimeUnavailable
from mesh.control.runtimes.procfs import group_alive, pid_alive, run_processes

__all__ = ["StateDir", "detach", "down", "format_table", "reload", "remove_volumes", "status"]


class StateDir:
    """The files of one mesh's controller."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = path / "controller.lock"
        self.pid = path / "controller.pid"
        self.state = path / "state.json"
        self.registry = path / "registry.json"
        self.log = path / "up.log"

    def make(self) -> None:
        # Private: it holds the mesh CA's key and every sidecar's.
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)

    def acquire(self) -> int | None:
        """Take the controller lock; return its fd (keep it open) or None if another controller holds it."""
        self.make()
        fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def running(self) -> bool:
        """Whether a controller holds the lock. A lock dies with its holder, so a stale pid file can't fool this."""
        if not self.lock.exists():
            return False
        fd = os.open(self.lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing releases a lock we took
        return False

    def controller_pid(self) -> int | None:
        try:
            return int(self.pid.read_text().strip())
        except (OSError, ValueError):
            return None

    def read_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        # Write then rename, so a reader never sees half a file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)


def format_table(instances: list[dict[str, Any]], *, with_state: bool = False) -> str:
    """Services and where they listen, one instance a row (from state.json's ``instances``)."""
    head = ["service", "instance"] + (["state"] if with_state else []) + [
        "app", "mesh", "outbound", "admin", "public"] + (["pids"] if with_state else [])
    rows = [head]
    for inst in instances:
        addresses = inst.get("addresses", {})
        row = [inst["service"], str(inst["instance"]) + (f" ({inst['key']})" if inst.get("key") else "")]
        if with_state:
            state = inst["state"]
            if inst.get("problem"):
                state += f" ({inst['problem']})"
            elif inst.get("exit_code") is not None:
                state += f" (code {inst['exit_code']})"
            row.append(state)
        row += [addresses.get(k, "-") for k in ("app", "mesh", "outbound", "admin")]
        row.append(inst.get("public") or "-")
        if with_state:
            pids = inst.get("pids", {})
            row.append(" ".join(f"{role}={pid}" for role, pid in pids.items()) or "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


# `mesh up -d`, `mesh ps`, `mesh down`: other processes talking to a controller through its files.


def detach(config: MeshConfig, runtime: str, timeout: float, watch: bool = False) -> int:
    """Start a controller in the background; return once it is up (0) or has failed (1)."""
    files = StateDir(config.state_dir)
    if files.running():
        print(f"mesh '{config.name}' is already up (controller pid {files.controller_pid()}); "
              f"`mesh down` stops it", file=sys.stderr)
        return 1
    problem = runtime_class(runtime).prepare_detached(config)  # here, so its progress shows
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    files.make()
    with open(files.log, "w") as logfile:
        child = subprocess.Popen(
            [sys.executable, "-m", "mesh", "up", str(config.path), "--runtime", runtime,
             "--timeout", str(timeout), *(["--watch"] if watch else [])],
            stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
            cwd=config.root, start_new_session=True)  # outlives this command and its terminal
    # The controller's own start timeout bounds the wait; the margin covers its start and stop.
    deadline = time.monotonic() + timeout + 30
    while time.monotonic() < deadline:
        state = files.read_state()
        mine = state is not None and state.get("controller", {}).get("pid") == child.pid
        if mine and state is not None and state["phase"] == "running":
            dashboard = state["controller"].get("dashboard")
            print(f"mesh '{config.name}' is up in the background ({runtime} runtime, "
                  f"controller pid {child.pid}):\n{format_table(state['instances'])}\n"
                  + (f"dashboard: {dashboard}\n" if dashboard else "")
                  + f"log: {files.log}\nstop it with: mesh down {config.path}")
            return 0
        if child.poll() is not None:
            # Read again: the state may have changed between the check above and the exit.
            state = files.read_state()
            if state and state.get("controller", {}).get("pid") == child.pid and state.get("error"):
                print(state["error"], file=sys.stderr)
            else:
                print(f"mesh up -d: the controller exited with code {child.returncode} before the "
                      f"mesh was up; its output:\n{_tail(files.log, 40)}", file=sys.stderr)
            print(f"log: {files.log}", file=sys.stderr)
            return 1
        time.sleep(0.1)
    print(f"mesh up -d: not up after {timeout + 30:g}s; stopping it (log: {files.log})", file=sys.stderr)
    child.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(30)
    return 1


def reload(config: MeshConfig, timeout: float = 300.0) -> int:
    """`mesh reload`: ask the running controller (SIGHUP) to apply mesh.toml; 0 applied, 1 refused."""
    files = StateDir(config.state_dir)
    pid = files.controller_pid() if files.running() else None
    if pid is None:
        print(f"mesh '{config.name}' is not running: `mesh up` starts it as the file is", file=sys.stderr)
        return 1

    def outcome() -> dict[str, Any]:
        return dict((files.read_state() or {}).get("reload") or {})

    before = outcome().get("done", 0)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while (now := outcome()).get("done", 0) <= before:
        if time.monotonic() > deadline or not files.running():
            print(f"the reload did not finish within {timeout:g}s; the controller's output ({files.log} when "
                  f"detached) says how far it got", file=sys.stderr)
            return 1
        time.sleep(0.1)
    if now.get("error"):
        print(f"mesh reload: {now['error']}", file=sys.stderr)
        return 1
    state = files.read_state() or {}
    print(f"mesh '{config.name}' reloaded: version {state.get('version')}; {now.get('changes')}")
    return 0


def _tail(path: Path, count: int) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(f"  {line}" for line in lines[-count:]) or "  (nothing)"


def status(config: MeshConfig) -> dict[str, Any]:
    """state.json with the controller and each instance checked against live processes.

    An instance whose recorded processes are gone is ``stopped`` whatever the
    file says (its controller may have died without updating it). Once the
    controller is gone, its pid and the addresses and dead pids of every
    instance not running are left out (the keys stay, empty), and so are
    its ``metrics`` and ``dashboard`` URLs (those keys go): nothing
    listens there any more, and a pid may since belong to another process.
    """
    files = StateDir(config.state_dir)
    state = files.read_state()
    running = files.running()
    if state is None:
        return {"mesh": config.name, "config": str(config.path), "phase": "stopped",
                "controller": {"pid": None, "running": False}, "instances": []}
    state.setdefault("controller", {})["running"] = running
    if not running and state.get("phase") in ("starting", "running", "stopping"):
        state["phase"] = "stopped"
    _runtime_of(state).refresh_state(config, state)
    return _without_stale(state)


def _runtime_of(state: dict[str, Any]) -> type[Runtime]:
    """The runtime class of the run that wrote ``state`` (the process runtime's if it names none known)."""
    try:
        return runtime_class(state.get("runtime") or "process")
    except RuntimeUnavailable:
        return runtime_class("process")


def _without_stale(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without what is left of a run whose controller is gone (see `status`)."""
    if state["controller"]["running"]:
        return state
    state["controller"]["pid"] = None
    for url in ("metrics", "dashboard"):
        state["controller"].pop(url, None)
    for inst in state.get("instances", []):
        if inst.get("state") == "running":
            continue  # its processes outlived the controller: `mesh down` stops them
        if "addresses" in inst:
            inst["addresses"] = {}
        if "public" in inst:
            inst["public"] = None
        for key, alive in (("pids", pid_alive), ("pgids", group_alive)):
            if key in inst:  # a process left behind is still shown, for `mesh down` to stop
                inst[key] = {role: p for role, p in inst[key].items() if alive(p)}
    return state


def down(config: MeshConfig, timeout: float = 60.0, *, volumes: bool = False) -> int:
    """Stop the controller of this mesh (SIGTERM) and wait until it and everything it started are gone;
    with ``volumes``, then remove its keys' volumes (`remove_volumes`)."""
    code = _stop(config, timeout)
    if volumes and code == 0 and not remove_volumes(config):
        return 1
    return code


def remove_volumes(config: MeshConfig) -> bool:
    """`mesh down --volumes`: remove the per-key volumes (``instances.volume``) of this mesh that every
    runtime keeps (each by its own marks: the process runtime's folders, Docker's labels), and
    nothing else; whether all went. The runtime of the last run must answer; the others may not."""
    last = _runtime_of(StateDir(config.state_dir).read_state() or {})
    removed, ok = 0, True
    for name in RUNTIMES:
        try:
            kind = runtime_class(name)
        except RuntimeUnavailable:
            continue
        count = kind.remove_volumes(config, required=kind is last)
        if count is None:
            ok = False
        else:
            removed += count
    print(f"mesh '{config.name}': removed {removed} volume{'s' if removed != 1 else ''}")
    return ok


def _stop(config: MeshConfig, timeout: float) -> int:
    """`down` without ``volumes``."""
    files = StateDir(config.state_dir)
    state = files.read_state() or {}
    run_id = state.get("run", "")
    kind = _runtime_of(state)
    if not files.running():
        removed = kind.remove_leftovers(config)
        if removed is None:
            return 1
        leftovers = run_processes(run_id)
        if not leftovers:
            if removed == (0, 0):
                print(f"mesh '{config.name}' is not running")
            return 0
        # Its controller died without stopping them (killed with SIGKILL, say).
        print(f"mesh '{config.name}': its controller is gone; stopping {len(leftovers)} "
              f"processes it left behind")
        _kill(leftovers, signal.SIGTERM)
        if not _wait(lambda: not run_processes(run_id), 10):
            _kill(run_processes(run_id), signal.SIGKILL)
        return 0
    pid = None
    for _ in range(50):  # the lock is taken just before the pid file is written
        pid = files.controller_pid()
        if pid:
            break
        time.sleep(0.1)
    if not pid:
        print(f"mesh '{config.name}': a controller holds {files.lock} but wrote no pid", file=sys.stderr)
        return 1
    os.kill(pid, signal.SIGTERM)
    groups = [g for inst in state.get("instances", []) for g in inst.get("pgids", {}).values()]

    def gone() -> bool:
        return (not files.running() and not pid_alive(pid)
                and not any(group_alive(g) for g in groups) and not run_processes(run_id))

    if _wait(gone, timeout):
        kind.remove_leftovers(config)
        print(f"mesh '{config.name}' stopped")
        return 0
    print(f"mesh '{config.name}': not stopped after {timeout:g}s; killing what is left", file=sys.stderr)
    _kill([pid, *run_processes(run_id)], signal.SIGKILL)
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    kind.remove_leftovers(config)
    return 1


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait(done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
