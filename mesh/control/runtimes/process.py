"""The process runtime: each instance is a sidecar process and an app process on loopback ports.

Each sidecar runs as ``python -m mesh sidecar ...`` (a keyed instance's, in a spare
sidecar started ahead: ``python -m mesh.sidecar.spare``) and writes its access log to
``.mesh/<name>/logs/<label>.jsonl`` (`mesh.control.logs`); each app runs its service's
``command`` through the shell in mesh.toml's folder. Both run in sessions of
their own, so a stop reaches whole process groups, and both inherit ``MESH_RUN``
(`mesh.control.runtimes.procfs`), so `mesh down` finds what a dead controller
left behind. A key's volume (``instances.volume``) is the folder
``.mesh/<name>/volumes/<volume>`` (mode 0700), kept until `mesh down --volumes`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from mesh.config import MeshConfig
from mesh.control.logs import log_file
from mesh.control.runtimes.base import (
    SIDECAR_TIMEOUT,
    TAIL_LINES,
    Instance,
    OnExit,
    Output,
    Runtime,
    StartFailed,
    instance_label,
    output_label,
)
from mesh.control.runtimes.loopback import free_ports, http_status, port_open
from mesh.control.runtimes.procfs import RUN_VARIABLE, group_alive, pid_alive, process_group_cpu
from mesh.control.runtimes.public import PublicSockets
from mesh.sidecar import admin

__all__ = ["ProcessRuntime"]

log = logging.getLogger("mesh.runtime")

SPARE_AFTER = 0.5  # seconds after a keyed instance's start that the next spare sidecar starts
MAX_LINE = 64 * 1024  # longer output without a newline is cut into lines of this size
_VOLUME_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*\Z")  # `mesh.control.keyed.key_volume`'s names


def volumes_folder(config: MeshConfig) -> Path:
    """Where the process runtime keeps the mesh's per-key volumes, one folder each."""
    return config.state_dir / "volumes"


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
                    env: dict[str, str], output: Output, pass_fds: tuple[int, ...] = ()) -> _Process:
        """Start ``command``; of this process's descriptors it inherits only ``pass_fds``."""
        common: dict[str, Any] = dict(cwd=cwd, env=env, stdin=asyncio.subprocess.DEVNULL, pass_fds=pass_fds,
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


class _Spare:
    """A spare sidecar (`mesh.sidecar.spare`) and the controller's end of its channel."""

    def __init__(self, proc: _Process, channel: socket.socket) -> None:
        self.proc = proc
        self.channel = channel

    def order(self, argv: list[str], sockets: dict[str, socket.socket]) -> bool:
        """Have it run ``mesh sidecar ARGV`` on ``sockets`` (role: listening socket); False if it is gone."""
        message = json.dumps({"argv": argv, "fds": list(sockets)}).encode()
        try:
            if self.proc.returncode is not None:
                return False
            socket.send_fds(self.channel, [message], [sock.fileno() for sock in sockets.values()])
            return True
        except OSError:
            return False
        finally:
            self.channel.close()

    async def stop(self, grace: float) -> None:
        self.channel.close()  # a spare still waiting exits on its own
        await self.proc.stop(grace)


def _let_go(starting: asyncio.Future[_Spare | None]) -> None:
    """Close the channel of a spare no one will use: it exits by itself."""
    if not starting.cancelled() and starting.exception() is None:
        spare = starting.result()
        if spare is not None:
            spare.channel.close()


class ProcessRuntime(Runtime):
    """Apps and sidecars as local processes on free loopback ports.

    Each sidecar runs as ``python -m mesh sidecar ...`` (or in a spare, below); each app runs its
    ``command`` through the shell in mesh.toml's folder, with ``PORT``,
    ``HTTP_PROXY``/``NO_PROXY`` (to reach other services by name through its
    sidecar), ``MESH_SERVICE``, ``MESH_INSTANCE`` and the service's ``env``;
    ``python`` (and ``python3``) in a command is the Python running mesh.
    Both run in sessions of their own, so a stop reaches whole process groups.

    The runtime opens each sidecar's mesh, outbound and admin sockets (bound,
    listening) and the sidecar inherits them (``--mesh-fd`` ...,
    `mesh.sidecar.handoff`), nothing else of the controller's; so its app starts
    beside it, not after it: the app's first calls wait in the outbound socket's
    backlog until the sidecar serves. Every instance of an exposed service
    serves its ``expose`` port: the controller holds that socket and hands it to
    each sidecar (`mesh.control.runtimes.public`).

    While the mesh has keyed services, a spare sidecar waits, started and its
    modules imported (`mesh.sidecar.spare`): a new key's instance takes it
    instead of starting a Python of its own, and another spare starts behind it.
    """

    name = "process"
    shares_public = True
    app_grace = 5.0
    sidecar_grace = 15.0  # a sidecar drains requests in flight for up to 10s

    def __init__(self, config: MeshConfig, *, output: Output, on_exit: OnExit, run_id: str = "",
                 admin_token: admin.AdminToken | None = None) -> None:
        super().__init__(config, output=output, on_exit=on_exit, run_id=run_id, admin_token=admin_token)
        self._procs: dict[str, dict[str, _Process]] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        self._planned: set[int] = set()  # loopback ports given to instances
        self.public = PublicSockets(config.state_dir / "handoff", peer_role="sidecar")
        self._spare: asyncio.Future[_Spare | None] | None = None
        self._closing = False

    def problems(self) -> list[str]:
        found = []
        for name, service in self.config.services.items():
            if not service.command:
                found.append(f"services.{name}: no 'command' to run on the process runtime "
                             f"(it has only 'build'/'image': use --runtime docker)")
        return found

    def plan_one(self, service: str, index: int) -> Instance:
        config = self.config.services[service]
        roles = ["app", "mesh", "outbound", "admin"]
        # None given to another instance, nor pinned by any sidecar (`services.NAME.sidecar`).
        pinned = {port for each in self.config.services.values() for port in each.pinned_ports().values()}
        ports = free_ports(len(roles), avoid=self._planned | pinned)
        self._planned.update(ports)
        assigned = {**dict(zip(roles, ports, strict=True)), **config.pinned_ports()}
        if config.expose is not None:
            assigned["public"] = config.expose  # one socket, every instance's (`PublicSockets`)
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

    def volume_path(self, instance: Instance) -> str | None:
        """The key's folder under `volumes_folder`, made (mode 0700) if it is not there yet."""
        if instance.volume is None:
            return None
        # SECURITY: the name is a digest of the key (`key_volume`), never the key: no path from a request.
        if not _VOLUME_NAME.match(instance.volume):
            raise StartFailed(instance.label, f"not a volume name: {instance.volume!r}")
        parent = volumes_folder(self.config)
        folder = parent / instance.volume
        try:
            for each in (parent, folder):
                each.mkdir(mode=0o700, parents=True, exist_ok=True)
                each.chmod(0o700)
        except OSError as exc:
            raise StartFailed(instance.label, f"cannot make its volume {folder}: {exc}") from None
        return str(folder.resolve())

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
        # An app of this mesh proxies through its sidecar only (HTTP_PROXY, HTTPS_PROXY above).
        for key in ("ALL_PROXY", "all_proxy"):
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

    def _sidecar_env(self) -> dict[str, str]:
        env = dict(os.environ, **{RUN_VARIABLE: self.run_id})
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _sidecar_args(self, instance: Instance, registry: Path, public: Path | None) -> list[str]:
        """`mesh sidecar`'s options for the instance, but for its sockets' (``--mesh-fd`` ...)."""
        args = ["--config", str(self.config.path), "--service", instance.service,
                "--app-port", str(instance.ports["app"]), "--registry", str(registry),
                "--admin-token-file", str(self.admin_token.path), "--instance", instance.label,
                "--access-log", str(log_file(self.config.state_dir, instance.label))]
        if public is not None:
            args += ["--public-handoff", str(public)]
        if instance.tls is not None:
            args += ["--tls", str(instance.tls)]
        return args

    async def build(self) -> None:
        await super().build()
        self._keep_spare()

    async def start_instance(self, instance: Instance, registry: Path, timeout: float) -> None:
        service = self.config.services[instance.service]
        assert service.command is not None  # problems() refuses services without one
        self._mark_starting(instance)  # maybe again (a restart)
        self._procs.get(instance.label, {}).pop("app", None)  # a stopped app of an earlier start
        instance.pids.pop("app", None)
        instance.pgids.pop("app", None)
        public = self.public.offer(instance) if "public" in instance.ports else None
        args = self._sidecar_args(instance, registry, public)
        sockets = self._listening(instance)
        try:
            spare = await self._take_spare() if instance.key is not None else None
            if spare is not None and spare.order(args, sockets):
                spare.proc.label = output_label(instance, "sidecar")
                self._adopt(instance, "sidecar", spare.proc)
            else:
                if spare is not None:
                    await spare.stop(self.sidecar_grace)
                fds = [part for role, sock in sockets.items() for part in (f"--{role}-fd", str(sock.fileno()))]
                await self._spawn(instance, "sidecar", [sys.executable, "-m", "mesh", "sidecar", *args, *fds],
                                  self._sidecar_env(), pass_fds=tuple(sock.fileno() for sock in sockets.values()))
        finally:
            for sock in sockets.values():
                sock.close()  # the sidecar's now
        try:
            await self._start_beside(instance, service.command, service.job, public, timeout)
        finally:
            # A little after: a spare's start (a Python importing mesh) would slow this one's first request.
            asyncio.get_running_loop().call_later(SPARE_AFTER, self._keep_spare)

    async def _start_beside(self, instance: Instance, command: str, job: bool, public: Path | None,
                            timeout: float) -> None:
        """Start the app beside its sidecar (just started), and wait until both are ready."""
        # Its listeners take connections already (the kernel queues them until the sidecar serves), so
        # the app starts at once: its first outbound calls wait for the sidecar instead of failing.
        await self._spawn(instance, "app", command, self._app_env(instance))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # the app's own, from its start
        sidecar_timeout = max(timeout, SIDECAR_TIMEOUT)
        # A job may be done before its sidecar is ready: its exit is reported once watched, not a failed start.
        roles = ("sidecar",) if job else ("sidecar", "app")
        await self._wait_ready(instance, roles, loop.time() + sidecar_timeout, sidecar_timeout)
        if public is not None:
            await self.public.hand_over(instance, app_ready=False)  # if no other sidecar serves it
        await self._wait_ready(instance, ("sidecar", "app"), deadline, timeout, parts=("app",))
        if public is not None:
            await self.public.hand_over(instance, app_ready=True)
        self._mark_ready(instance)
        for role, proc in self._procs[instance.label].items():
            self._watch_later(instance, role, proc)

    # the spare sidecar

    def _keep_spare(self) -> None:
        """Start a spare sidecar if the mesh has keyed services and none is there or on its way."""
        if self._spare is None and not self._closing and any(
                service.instances is not None for service in self.config.services.values()):
            self._spare = asyncio.ensure_future(self._start_spare())

    async def _start_spare(self) -> _Spare | None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await _Process.spawn("spare.sidecar", [sys.executable, "-m", "mesh.sidecar.spare",
                                                          str(theirs.fileno())],
                                        cwd=self.config.root, env=self._sidecar_env(), output=self.output,
                                        pass_fds=(theirs.fileno(),))
        except OSError as exc:
            log.warning("cannot start a spare sidecar: %s", exc)
            ours.close()
            return None
        finally:
            theirs.close()
        return _Spare(proc, ours)

    async def _take_spare(self) -> _Spare | None:
        """The spare sidecar, if there is one (still importing is fine: it reads its order after)."""
        starting, self._spare = self._spare, None
        if starting is None:
            return None
        try:
            spare = await asyncio.shield(starting)
        except asyncio.CancelledError:
            if self._spare is None:
                self._spare = starting  # still the spare, for the next start
            else:
                starting.add_done_callback(_let_go)
            raise
        except Exception:  # a spare is a shortcut: without one, a sidecar starts as usual
            log.exception("the spare sidecar did not start")
            return None
        if spare is not None and spare.proc.returncode is not None:
            spare.channel.close()
            return None
        return spare

    async def _drop_spare(self) -> None:
        spare = await self._take_spare()
        if spare is not None:
            await spare.stop(self.sidecar_grace)

    def _listening(self, instance: Instance) -> dict[str, socket.socket]:
        """The sidecar's mesh, outbound and admin listeners' sockets, bound and listening, for it to
        inherit (`mesh.sidecar.handoff`); StartFailed if a port cannot be had."""
        sockets: dict[str, socket.socket] = {}
        for role in ("mesh", "outbound", "admin"):
            port = instance.ports[role]
            try:
                sockets[role] = socket.create_server(("127.0.0.1", port), backlog=1024)
            except OSError as exc:
                for sock in sockets.values():
                    sock.close()
                raise StartFailed(instance.label, f"cannot listen on 127.0.0.1:{port} for its sidecar's {role} "
                                  f"listener: {exc.strerror or exc}") from None
        return sockets

    def _watch_later(self, instance: Instance, role: str, proc: _Process) -> None:
        task = asyncio.ensure_future(self._watch(instance, role, proc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def restart_app(self, instance: Instance, registry: Path, timeout: float) -> None:
        """Only the app: its sidecar keeps running (and keeps its connections and registry)."""
        procs = self._procs.get(instance.label, {})
        sidecar = procs.get("sidecar")
        if sidecar is None or sidecar.returncode is not None or instance.label in self._stopping:
            await super().restart_app(instance, registry, timeout)
            return
        service = self.config.services[instance.service]
        assert service.command is not None
        self._mark_starting(instance)
        old = procs.get("app")
        if old is not None:  # what the old app started may linger in its group: not on its port
            await old.stop(self.app_grace)
        await self._spawn(instance, "app", service.command, self._app_env(instance))
        deadline = asyncio.get_running_loop().time() + timeout
        await self._wait_ready(instance, ("sidecar", "app"), deadline, timeout, parts=("app",))
        self._mark_ready(instance)
        self._watch_later(instance, "app", self._procs[instance.label]["app"])

    def exit_code(self, instance: Instance, role: str) -> int | None:
        proc = self._procs.get(instance.label, {}).get(role)
        return proc.returncode if proc is not None else None

    async def _spawn(self, instance: Instance, role: str, command: str | list[str],
                     env: dict[str, str], pass_fds: tuple[int, ...] = ()) -> None:
        label = output_label(instance, role)

        async def spawn() -> None:
            try:
                proc = await _Process.spawn(label, command, cwd=self.config.root, env=env,
                                            output=self.output, pass_fds=pass_fds)
            except OSError as exc:
                raise StartFailed(instance.label, f"cannot start {label}: {exc}") from exc
            self._adopt(instance, role, proc)

        # A start cancelled mid-spawn still records the process it created, so stopping finds it.
        await self._shielded(spawn())

    def _adopt(self, instance: Instance, role: str, proc: _Process) -> None:
        self._procs.setdefault(instance.label, {})[role] = proc
        instance.pids[role] = proc.pid
        instance.pgids[role] = proc.pgid

    async def _wait_ready(self, instance: Instance, roles: tuple[str, ...], deadline: float, timeout: float,
                          parts: tuple[str, ...] = ("sidecar",)) -> None:
        """Until the ``parts`` are ready, by ``deadline``; any of the ``roles`` exiting meanwhile fails it."""
        procs = {role: self._procs[instance.label][role] for role in roles}

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
            return await port_open(instance.ports["app"]), ""

        # Asked often: on loopback a question costs little, and a keyed instance's first request waits.
        await self.wait_ready(instance, deadline, timeout, alive=lambda: alive(), app_ready=app_ready,
                              parts=parts, pause=0.01)

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
        self._mark_stopping(instance)
        proc = self._procs.get(instance.label, {}).get(role)
        if proc is not None:
            await proc.stop(self.sidecar_grace if role == "sidecar" else self.app_grace)
        if role == "sidecar":
            self.public.release(instance, self.config)

    async def kill_all(self) -> None:
        self._closing = True
        await self._settle()
        spare = await self._take_spare()
        procs = [proc for each in self._procs.values() for proc in each.values()]
        for proc in procs + ([spare.proc] if spare is not None else []):
            proc.stopping = True
            proc.signal(signal.SIGKILL)

    async def close(self) -> None:
        self._closing = True
        await self._drop_spare()
        self.public.close()

    # without a controller: `mesh ps`, `mesh down`

    @classmethod
    def refresh_state(cls, config: MeshConfig, state: dict[str, Any]) -> None:
        """An instance whose recorded processes are gone is ``stopped`` (a sleeping keyed instance
        while its controller runs, and one that exited on purpose, have none by design)."""
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
        """Nothing beyond processes (`mesh down` stops those by ``MESH_RUN``)."""
        return (0, 0)

    @classmethod
    def remove_volumes(cls, config: MeshConfig, *, required: bool) -> int | None:
        """Every folder under `volumes_folder` (links in them are removed, never followed)."""
        folder = volumes_folder(config)
        if not folder.is_dir():
            return 0
        count = sum(1 for _ in folder.iterdir())
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            print(f"mesh '{config.name}': cannot remove its volumes in {folder}: {exc}", file=sys.stderr)
            return None
        return count
