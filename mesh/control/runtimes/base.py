"""Runtimes: where the instances of a mesh run.

A runtime turns one planned `Instance` (a service, its number, its
addresses) into a running app plus its sidecar, reports how it is doing,
and stops it. The controller (`mesh.control.controller`) decides *what* runs; a
runtime only knows *how*::

    runtime = get_runtime("process", config, output=print_line, on_exit=report)  # mesh.control.runtimes
    instances = runtime.plan()                 # addresses chosen, nothing started
    await runtime.start_instance(instance, registry_file, timeout=30)   # ready, or StartFailed
    runtime.instance_state(instance)           # "starting" | "running" | "stopped"
    await runtime.stop_role(instance, "sidecar")   # drains; then stop_role(instance, "app")

`ProcessRuntime` (the embedded default) runs both as local processes on
loopback ports. A Docker runtime implements the same `Runtime` interface.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import shlex
import signal
import socket
import sys
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mesh.config import MeshConfig, ServiceConfig
from mesh.sidecar import admin

__all__ = [
    "RUN_VARIABLE", "Instance", "ProcessRuntime", "Runtime", "RuntimeUnavailable", "StartFailed",
    "free_ports", "group_alive", "http_status", "instance_count", "instance_label",
    "pid_alive", "port_in_use", "process_group_cpu", "run_processes",
]

TAIL_LINES = 20
RUN_VARIABLE = "MESH_RUN"
MAX_LINE = 64 * 1024  # longer output without a newline is cut into lines of this size

# What a runtime calls: output(label, line) for each line a process prints,
# on_exit(instance, role, returncode) when an app or sidecar ends unasked.
Output = Callable[[str, str], None]
OnExit = Callable[["Instance", str, int], None]


class RuntimeUnavailable(Exception):
    """The runtime asked for cannot run here (not built yet, or its engine is missing)."""


class StartFailed(Exception):
    """An instance did not become ready: ``reason`` says why, ``tail`` holds its last output lines."""

    def __init__(self, label: str, reason: str, tail: list[str] | None = None) -> None:
        self.label = label
        self.reason = reason
        self.tail = tail or []
        super().__init__(f"{label}: {reason}")


@dataclass
class Instance:
    """One instance of a service and where it listens.

    ``index`` counts from 1. ``label`` names it in output: the service name
    alone when the service has one instance, ``web.2`` otherwise. ``host`` is
    where other sidecars reach its mesh listener; ``ports`` maps ``app``,
    ``mesh``, ``outbound``, ``admin`` and, when exposed, ``public``. ``tls``
    is the folder of its certificate (``cert.pem``, ``key.pem``, ``ca.pem``)
    for mutual TLS between sidecars; None runs its mesh listener on plain HTTP.
    ``key``: the key a keyed service's instance serves (`mesh.control.keyed`). ``pids`` and
    ``pgids``: role (``sidecar``, ``app``) -> the process (group) running it, while
    it runs on this machine.
    """

    service: str
    index: int
    label: str
    host: str
    ports: dict[str, int]
    health: str | None = None
    tls: Path | None = None
    key: str | None = None
    pids: dict[str, int] = field(default_factory=dict)
    pgids: dict[str, int] = field(default_factory=dict)

    @property
    def mesh_address(self) -> str:
        return f"{self.host}:{self.ports['mesh']}"

    def addresses(self) -> dict[str, str]:
        return {role: f"127.0.0.1:{port}" for role, port in self.ports.items() if role != "public"}

    @property
    def public_url(self) -> str | None:
        port = self.ports.get("public")
        return f"http://127.0.0.1:{port}" if port else None

    def state_fields(self) -> dict[str, Any]:
        """What state.json shows of it beyond addresses: its pids and process groups, by role."""
        return {"pids": dict(self.pids), "pgids": dict(self.pgids)}

    def forget_processes(self) -> None:
        """It stopped: never signal a pid that may since be reused."""
        self.pids.clear()
        self.pgids.clear()


def instance_count(service: ServiceConfig) -> int:
    """How many instances `mesh up` starts: ``replicas``, or a pool's ``scale.min`` (at least 1).

    Keyed instances and autoscaling are the controller's later work; until
    then such a service runs a fixed number of instances.
    """
    if service.scale is not None:
        return max(service.scale.min, 1)
    return service.replicas


def instance_label(name: str, service: ServiceConfig, index: int, count: int) -> str:
    """``web`` for a service's only instance, ``web.2`` otherwise; an autoscaled pool that may
    grow (``scale.max`` > 1) numbers its instances from the start, so labels never change."""
    if count == 1 and (service.scale is None or service.scale.max <= 1):
        return name
    return f"{name}.{index}"


class Runtime(ABC):
    """How instances run. One runtime object serves one `mesh up`."""

    name: ClassVar[str]

    def __init__(self, config: MeshConfig, *, output: Output, on_exit: OnExit, run_id: str = "",
                 admin_token: admin.AdminToken | None = None) -> None:
        """``run_id`` marks everything this run starts (``MESH_RUN`` in its environment),
        so what a dead controller left behind can still be found and stopped.

        ``admin_token``: the run's token for sidecars' admin listeners (`mesh.sidecar.admin`);
        each sidecar gets its file, which the controller writes before any starts.
        A new one (for the mesh's state folder) by default.
        """
        self.config = config
        self.output = output
        self.on_exit = on_exit
        self.run_id = run_id
        self.admin_token = admin_token or admin.AdminToken.new(config.state_dir)

    def problems(self) -> list[str]:
        """What stops this mesh from running on this runtime, one line each (empty: none)."""
        return []

    @abstractmethod
    async def start_instance(self, instance: Instance, registry: Path, timeout: float) -> None:
        """Start the instance's sidecar and app and return once both are ready.

        Raise `StartFailed` if either exits or is not ready within
        ``timeout`` seconds. What was started stays tracked, so `stop_role`
        cleans up after a failure or a cancellation.
        """

    @abstractmethod
    async def stop_role(self, instance: Instance, role: str) -> None:
        """Stop the instance's ``sidecar`` or its ``app``; return when nothing of it is left.

        A sidecar drains requests in flight first, so a controller stops every
        sidecar before any app.
        """

    async def stop_instance(self, instance: Instance) -> None:
        """Stop the sidecar (it drains), then the app."""
        await self.stop_role(instance, "sidecar")
        await self.stop_role(instance, "app")

    def plan_one(self, service: str, index: int) -> Instance:
        """One more instance of ``service`` (an autoscaled pool growing), addresses chosen, nothing started."""
        raise NotImplementedError(f"the {self.name} runtime cannot add instances while running")

    # keyed services (`mesh.control.keyed`): their fronts run in the controller's process

    async def front_host(self) -> str:
        """Where keyed services' fronts listen: an address of the controller's host that sidecars
        reach. Whatever that needs (networks) is made now, before any instance starts.

        Raise `NotImplementedError` saying why when this runtime runs no keyed services.
        """
        raise NotImplementedError(f"keyed services (instances = {{...}}) run on the process and docker "
                                  f"runtimes only; not on {self.name}")

    def allow_front(self, port: int) -> None:
        """Let sidecars reach a keyed service's front on ``port`` of `front_host` (called before any
        instance starts). Nothing to do, by default."""

    def plan_key(self, service: str, index: int, label: str) -> Instance:
        """An instance of a keyed service for one key (named ``label``); `replan` gives it addresses."""
        instance = self.plan_one(service, index)
        instance.label = label
        return instance

    def replan(self, instance: Instance) -> None:
        """Addresses for a new start of a keyed instance that slept (the last ones may be taken by now)."""
        raise NotImplementedError(f"the {self.name} runtime cannot start keyed instances")

    def reach(self, instance: Instance) -> tuple[str, int]:
        """Where the controller's host reaches a started instance's mesh listener."""
        host, port = instance.mesh_address.rsplit(":", 1)
        return host, int(port)

    async def cpu_seconds(self, instance: Instance) -> float | None:
        """Cumulative CPU seconds of the instance's app, or None if it cannot be told now."""
        return None

    async def restart_app(self, instance: Instance, registry: Path, timeout: float) -> None:
        """Start the app of an instance again after it exited (its sidecar may still run); return once ready.

        By default: stop what is left of the instance and start all of it again.
        Raise `StartFailed` as `start_instance` does.
        """
        await self.stop_instance(instance)
        await self.start_instance(instance, registry, timeout)

    def exit_code(self, instance: Instance, role: str) -> int | None:
        """How the instance's ``app`` or ``sidecar`` last exited, if it did and the runtime knows."""
        return None

    def tail(self, instance: Instance, role: str) -> list[str]:
        """The last output lines of the instance's ``sidecar`` or ``app``, each prefixed with its label."""
        return []

    @abstractmethod
    def instance_state(self, instance: Instance) -> str:
        """``starting``, ``running`` or ``stopped``."""

    async def kill_all(self) -> None:
        """Stop everything at once, without grace (a second Ctrl-C)."""

    async def reload_certificates(self, instance: Instance) -> bool:
        """Make the instance's sidecar load the files in ``instance.tls`` again; False if it did not.

        By default through its admin listener on loopback, with the run's token.
        """
        return await http_status(instance.ports["admin"], "/certs/reload", method="POST",
                                  headers=self.admin_token.headers()) == 204

    async def push_registry(self, instance: Instance, body: bytes) -> bool:
        """Give the instance's sidecar a new registry (``{"services": ...}`` JSON); False if it did not take it.

        By default ``PUT /registry`` on its admin listener on loopback, with the run's token.
        """
        return await http_status(instance.ports["admin"], "/registry", method="PUT", body=body,
                                  headers=self.admin_token.headers()) == 204

    async def check_health(self, instance: Instance, timeout: float) -> bool:
        """Whether the instance's app answers 200 on its ``health`` path within ``timeout`` seconds.

        By default a GET on its app port on loopback.
        """
        if not instance.health:
            return True
        return await http_status(instance.ports["app"], instance.health, timeout=timeout) == 200

    async def build(self) -> None:
        """Build what instances need before they can start (images). Nothing, by default."""

    # shared by the runtimes

    def plan(self) -> list[Instance]:
        """Every instance of every service, with its addresses chosen; nothing started.

        Raise `StartFailed` when the mesh cannot start here (a port to expose is taken).
        Built on `plan_one`; the first instance of an exposed service publishes on ``expose``.
        """
        for name, service in self.config.services.items():
            if service.expose is not None and port_in_use(service.expose):
                raise StartFailed(name, f"cannot expose it on 127.0.0.1:{service.expose}: "
                                  f"the port is in use (services.{name}.expose)")
        instances = []
        for name, service in self.config.services.items():
            count = instance_count(service)
            for index in range(1, count + 1):
                instance = self.plan_one(name, index)
                instance.label = instance_label(name, service, index, count)
                if service.expose is not None and index == 1:
                    instance.ports["public"] = service.expose
                instances.append(instance)
        return instances

    def app_environment(self, instance: Instance, outbound: int) -> dict[str, str]:
        """What every app finds in its environment: the service's ``env``, then ``PORT``,
        ``HTTP_PROXY`` (its sidecar's outbound listener on loopback port ``outbound``),
        ``NO_PROXY``, ``MESH_SERVICE`` and ``MESH_INSTANCE``."""
        service = self.config.services[instance.service]
        env = {k: str(v) for k, v in service.env.items()}
        proxy = f"http://127.0.0.1:{outbound}"
        env.update({
            "PORT": str(instance.ports["app"]),
            "HTTP_PROXY": proxy, "http_proxy": proxy,
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "MESH_SERVICE": instance.service,
            "MESH_INSTANCE": str(instance.index),
        })
        return env

    async def wait_ready(self, instance: Instance, deadline: float, timeout: float, *,
                         alive: Callable[[], Awaitable[None]],
                         app_ready: Callable[[float], Awaitable[tuple[bool, str]]],
                         where: str = "", pause: float = 0.05) -> None:
        """Return once the instance's sidecar answers ``/readyz`` and its app is ready; raise
        `StartFailed` at ``deadline`` (event loop time) saying what it waited for, with the output.

        ``alive()`` raises `StartFailed` if a part of the instance exited. ``app_ready(wait)``
        asks the app once, in at most about ``wait`` seconds: whether it is ready (200 on its
        ``health`` path; without one, listening) and what it said. It runs beside the loop, in
        rounds, so an app that dies meanwhile is seen at once. ``where``: said after the app's
        port in the message.
        """
        loop = asyncio.get_running_loop()
        ready = {"sidecar": False, "app": False}
        probe: asyncio.Future[tuple[bool, str]] | None = None
        last = ""
        try:
            while True:
                await alive()
                if not ready["sidecar"]:
                    ready["sidecar"] = await http_status(instance.ports["admin"], "/readyz") == 200
                if not ready["app"]:
                    if probe is None:
                        # In rounds of a few seconds: a round outlives its start if the app dies meanwhile.
                        left = min(3.0, max(0.5, deadline - loop.time()))
                        probe = asyncio.ensure_future(app_ready(left))
                    elif probe.done():
                        ready["app"], last = probe.result()
                        probe = None
                if all(ready.values()):
                    return
                if loop.time() >= deadline:
                    waiting = [r for r, ok in ready.items() if not ok]
                    if "app" in waiting:
                        what = (f"GET {instance.health} answering 200" if instance.health
                                else "the app listening")
                        why = f"{what} on port {instance.ports['app']} ($PORT){where}"
                        why += f" (last: {last})" if last else ""
                    else:
                        why = "its sidecar's /readyz"
                    tail = [line for role in waiting for line in self.tail(instance, role)]
                    raise StartFailed(instance.label, f"not ready after {timeout:g}s: waited for {why}", tail)
                await asyncio.sleep(pause)
        finally:
            if probe is not None:
                probe.cancel()

    # other processes reading a mesh's files: `mesh up -d`, `mesh ps`, `mesh down`

    @classmethod
    def prepare_detached(cls, config: MeshConfig) -> str | None:
        """Before `mesh up -d` starts a controller in the background: what takes long or may fail
        visibly (building images), here so its progress shows. What went wrong, if anything."""
        return None

    @classmethod
    def refresh_state(cls, config: MeshConfig, state: dict[str, Any]) -> None:
        """`mesh ps`: each of state.json's instances checked against what runs.

        By default an instance whose recorded processes are gone is ``stopped``
        (a sleeping keyed instance while its controller runs, and one that exited
        on purpose, have none by design).
        """
        running = state["controller"]["running"]
        for inst in state.get("instances", []):
            if running and inst.get("state") == "sleeping":
                continue
            if inst.get("state") == "exited":
                continue
            pids = inst.get("pids", {})
            if not pids or not all(pid_alive(p) for p in pids.values()):
                inst["state"] = "stopped"

    @classmethod
    def remove_leftovers(cls, config: MeshConfig) -> tuple[int, int] | None:
        """`mesh down`'s last step: remove what a run of this mesh holds beyond its processes (found
        without a controller, so also after one crashed): how many (containers, networks), or None
        when that cannot be done now (said on stderr). Nothing, by default."""
        return (0, 0)

    async def close(self) -> None:
        """Release what the run holds beyond its instances (networks), once every instance is stopped.

        Nothing, by default.
        """


# Process helpers, also used by `mesh ps`, `mesh down` and the tests.

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


def free_ports(count: int, avoid: Iterable[int] = ()) -> list[int]:
    """``count`` distinct free loopback ports, none of ``avoid``. All stay bound until all are
    chosen, so none repeats."""
    sockets = []
    avoided = set(avoid)
    chosen: list[int] = []
    try:
        while len(chosen) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
            port = sock.getsockname()[1]
            if port not in avoided:
                chosen.append(port)
        return chosen
    finally:
        for sock in sockets:
            sock.close()


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def http_status(port: int, path: str, timeout: float = 1.0, method: str = "GET",
                       body: bytes = b"", headers: dict[str, str] | None = None) -> int | None:
    """Status of ``METHOD path`` (with ``body`` and ``headers``) on 127.0.0.1:port, or None if it does not answer."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                length = f"Content-Length: {len(body)}\r\n" if method != "GET" else ""
                writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{length}{extra}"
                             f"Connection: close\r\n\r\n".encode() + body)
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return None
    parts = line.split()
    if len(parts) >= 2 and parts[1].isdigit():
        return int(parts[1])
    return None


async def _port_open(port: int, timeout: float = 1.0) -> bool:
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class _Process:
    """One child process in its own session: its output prefixed and kept, its exit watched."""

    def __init__(self, label: str, proc: asyncio.subprocess.Process, output: Output) -> None:
        self.label = label
        self.proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the child leads its own group
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.stopping = False
        self._output = output
        self._pump = asyncio.ensure_future(self._read(proc.stdout))

    @classmethod
    async def spawn(cls, label: str, command: str | list[str], *, cwd: Path,
                    env: dict[str, str], output: Output) -> _Process:
        common: dict[str, Any] = dict(cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL,
                                      stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                                      # A session of its own: a terminal's Ctrl-C reaches only the
                                      # controller, which stops children in order, and a stop can
                                      # signal the whole group (a shell and what it started).
                                      start_new_session=True)
        if isinstance(command, str):
            proc = await asyncio.create_subprocess_shell(command, **common)
        else:
            proc = await asyncio.create_subprocess_exec(*command, **common)
        return cls(label, proc, output)

    async def _read(self, stream: asyncio.StreamReader | None) -> None:
        if stream is None:
            return
        pending = b""
        while chunk := await stream.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            while len(pending) > MAX_LINE:
                lines.append(pending[:MAX_LINE])
                pending = pending[MAX_LINE:]
            for line in lines:
                self._line(line)
        if pending:
            self._line(pending)

    def _line(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(text)
        self._output(self.label, text)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    async def drained(self, timeout: float = 1.0) -> None:
        """Wait for the last output; a grandchild holding the pipe open must not hold us up."""
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._pump), timeout)

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)

    async def stop(self, grace: float) -> None:
        """SIGTERM the group, wait up to ``grace`` seconds, then SIGKILL whatever is left of it."""
        self.stopping = True
        if self.returncode is None or group_alive(self.pgid):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            self.signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), grace)
            # The leader may be gone while processes it started linger in the group.
            while group_alive(self.pgid) and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if self.returncode is None or group_alive(self.pgid):
                self.signal(signal.SIGKILL)
        await self.proc.wait()
        await self.drained()


class ProcessRuntime(Runtime):
    """Apps and sidecars as local processes on free loopback ports.

    Each sidecar runs as ``python -m mesh sidecar ...``; each app runs its
    ``command`` through the shell in mesh.toml's folder, with ``PORT``,
    ``HTTP_PROXY``/``NO_PROXY`` (to reach other services by name through its
    sidecar), ``MESH_SERVICE``, ``MESH_INSTANCE`` and the service's ``env``;
    ``python`` (and ``python3``) in a command is the Python running mesh.
    Both run in sessions of their own, so a stop reaches whole process groups.

    The first instance of an exposed service publishes on its ``expose``
    port (one port has one listener); the others each publish on a free
    loopback port of their own.
    """

    name = "process"
    app_grace = 5.0
    sidecar_grace = 15.0  # a sidecar drains requests in flight for up to 10s

    def __init__(self, config: MeshConfig, *, output: Output, on_exit: OnExit, run_id: str = "",
                 admin_token: admin.AdminToken | None = None) -> None:
        super().__init__(config, output=output, on_exit=on_exit, run_id=run_id, admin_token=admin_token)
        self._procs: dict[str, dict[str, _Process]] = {}
        self._ready: set[str] = set()
        self._stopped: set[str] = set()
        self._spawning: set[asyncio.Future[None]] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._planned: set[int] = set()  # loopback ports given to instances

    def problems(self) -> list[str]:
        found = []
        for name, service in self.config.services.items():
            if not service.command:
                found.append(f"services.{name}: no 'command' to run on the process runtime "
                             f"(it has only 'build'/'image': use --runtime docker)")
        return found

    def plan_one(self, service: str, index: int) -> Instance:
        config = self.config.services[service]
        roles = ["app", "mesh", "outbound", "admin"] + (["public"] if config.expose is not None else [])
        ports = free_ports(len(roles), avoid=self._planned)  # none given to another instance
        self._planned.update(ports)
        assigned = dict(zip(roles, ports, strict=True))
        return Instance(service, index, instance_label(service, config, index, 2), "127.0.0.1",
                        assigned, config.health)

    async def front_host(self) -> str:
        return "127.0.0.1"

    def plan_key(self, service: str, index: int, label: str) -> Instance:
        return Instance(service, index, label, "127.0.0.1", {}, self.config.services[service].health)

    def replan(self, instance: Instance) -> None:
        # Fresh loopback ports for every boot; the front serves `expose`.
        instance.ports = dict(zip(("app", "mesh", "outbound", "admin"), free_ports(4), strict=True))
        self._planned.update(instance.ports.values())

    async def cpu_seconds(self, instance: Instance) -> float | None:
        pgid = instance.pgids.get("app")
        return process_group_cpu(pgid) if pgid else None

    def _app_env(self, instance: Instance) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(self._shims()), str(Path(sys.executable).parent),
                                       env.get("PATH", os.defpath)])
        env.setdefault("PYTHONUNBUFFERED", "1")  # app output is piped; show it as it happens
        env.update(self.app_environment(instance, instance.ports["outbound"]))
        env[RUN_VARIABLE] = self.run_id
        # An app of this mesh never proxies HTTPS through the sidecar.
        for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            env.pop(key, None)
        return env

    def _shims(self) -> Path:
        """A folder whose ``python`` and ``python3`` run the Python running mesh.

        So ``command = "python app.py"`` means this Python (and its packages)
        in a venv, and also where the system has only ``python3``.
        """
        folder = self.config.state_dir / "bin"
        folder.mkdir(parents=True, exist_ok=True)
        script = f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n'
        for name in ("python", "python3"):
            shim = folder / name
            if not shim.is_file() or shim.read_text() != script:
                tmp = folder / f".{name}.{os.getpid()}"
                tmp.write_text(script)
                tmp.chmod(0o755)
                os.replace(tmp, shim)
        return folder

    def _sidecar_command(self, instance: Instance, registry: Path) -> list[str]:
        ports = instance.ports
        command = [sys.executable, "-m", "mesh", "sidecar", "--config", str(self.config.path),
                   "--service", instance.service, "--app-port", str(ports["app"]),
                   "--mesh-port", str(ports["mesh"]), "--outbound-port", str(ports["outbound"]),
                   "--admin-port", str(ports["admin"]), "--registry", str(registry),
                   "--admin-token-file", str(self.admin_token.path)]
        if "public" in ports:
            command += ["--public-port", str(ports["public"])]
        if instance.tls is not None:
            command += ["--tls", str(instance.tls)]
        return command

    async def start_instance(self, instance: Instance, registry: Path, timeout: float) -> None:
        service = self.config.services[instance.service]
        assert service.command is not None  # problems() refuses services without one
        self._stopped.discard(instance.label)  # started again (a restart)
        sidecar_env = dict(os.environ, **{RUN_VARIABLE: self.run_id})
        sidecar_env.setdefault("PYTHONUNBUFFERED", "1")
        await self._spawn(instance, "sidecar", self._sidecar_command(instance, registry), sidecar_env)
        await self._spawn(instance, "app", service.command, self._app_env(instance))
        procs = self._procs[instance.label]
        await self._wait_ready(instance, procs, timeout)
        self._ready.add(instance.label)
        for role, proc in procs.items():
            self._watch_later(instance, role, proc)

    def _watch_later(self, instance: Instance, role: str, proc: _Process) -> None:
        task = asyncio.ensure_future(self._watch(instance, role, proc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def restart_app(self, instance: Instance, registry: Path, timeout: float) -> None:
        """Only the app: its sidecar keeps running (and keeps its connections and registry)."""
        procs = self._procs.get(instance.label, {})
        sidecar = procs.get("sidecar")
        if sidecar is None or sidecar.returncode is not None or instance.label in self._stopped:
            await super().restart_app(instance, registry, timeout)
            return
        service = self.config.services[instance.service]
        assert service.command is not None
        self._ready.discard(instance.label)
        old = procs.get("app")
        if old is not None:  # what the old app started may linger in its group: not on its port
            await old.stop(self.app_grace)
        await self._spawn(instance, "app", service.command, self._app_env(instance))
        procs = self._procs[instance.label]
        await self._wait_ready(instance, procs, timeout)
        self._ready.add(instance.label)
        self._watch_later(instance, "app", procs["app"])

    def exit_code(self, instance: Instance, role: str) -> int | None:
        proc = self._procs.get(instance.label, {}).get(role)
        return proc.returncode if proc is not None else None

    async def _spawn(self, instance: Instance, role: str, command: str | list[str],
                     env: dict[str, str]) -> None:
        label = instance.label if role == "app" else f"{instance.label}.{role}"

        async def spawn() -> None:
            try:
                proc = await _Process.spawn(label, command, cwd=self.config.root, env=env,
                                            output=self.output)
            except OSError as exc:
                raise StartFailed(instance.label, f"cannot start {label}: {exc}") from exc
            self._procs.setdefault(instance.label, {})[role] = proc
            instance.pids[role] = proc.pid
            instance.pgids[role] = proc.pgid

        # Shielded and tracked: a start cancelled mid-spawn still records the
        # process it created, so stopping finds it.
        task = asyncio.ensure_future(spawn())
        self._spawning.add(task)
        task.add_done_callback(self._spawning.discard)
        await asyncio.shield(task)

    async def _wait_ready(self, instance: Instance, procs: dict[str, _Process], timeout: float) -> None:
        async def alive() -> None:
            for role, proc in procs.items():
                if proc.returncode is not None:
                    await proc.drained()
                    who = "the app" if role == "app" else "its sidecar"
                    raise StartFailed(instance.label, f"{who} exited with code {proc.returncode} "
                                      f"before it was ready", [f"{proc.label} | {t}" for t in proc.tail])

        async def app_ready(wait: float) -> tuple[bool, str]:
            if instance.health:
                return await http_status(instance.ports["app"], instance.health) == 200, ""
            return await _port_open(instance.ports["app"]), ""

        deadline = asyncio.get_running_loop().time() + timeout
        await self.wait_ready(instance, deadline, timeout, alive=lambda: alive(), app_ready=app_ready)

    async def _watch(self, instance: Instance, role: str, proc: _Process) -> None:
        # Not proc.wait(): it also waits for the output pipe to close, which a child of a
        # killed shell (``sh -c "python app.py"``) keeps open. The exit code is known at once.
        while proc.returncode is None:
            await asyncio.sleep(0.1)
        code = proc.returncode
        await proc.drained()
        if not proc.stopping:
            self.on_exit(instance, role, code)

    def tail(self, instance: Instance, role: str) -> list[str]:
        proc = self._procs.get(instance.label, {}).get(role)
        return [f"{proc.label} | {t}" for t in proc.tail] if proc else []

    async def stop_role(self, instance: Instance, role: str) -> None:
        await self._settle()
        self._ready.discard(instance.label)
        self._stopped.add(instance.label)
        proc = self._procs.get(instance.label, {}).get(role)
        if proc is not None:
            await proc.stop(self.sidecar_grace if role == "sidecar" else self.app_grace)

    async def _settle(self) -> None:
        """Let spawns in progress finish, so every process that exists is known."""
        if self._spawning:
            await asyncio.gather(*self._spawning, return_exceptions=True)

    def instance_state(self, instance: Instance) -> str:
        procs = self._procs.get(instance.label, {})
        if instance.label in self._stopped or any(p.returncode is not None for p in procs.values()):
            return "stopped"
        return "running" if instance.label in self._ready else "starting"

    async def kill_all(self) -> None:
        await self._settle()
        for procs in self._procs.values():
            for proc in procs.values():
                proc.stopping = True
                proc.signal(signal.SIGKILL)
