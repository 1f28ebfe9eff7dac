"""The controller: what `mesh up` runs, and what `mesh ps` and `mesh down` read.

`Controller.run` starts every instance of a mesh on a runtime, keeps a
state file up to date, and on SIGINT/SIGTERM stops everything (sidecars
first, so they drain, then apps). Its files live in the mesh's state dir::

    .mesh/<name>/controller.lock   held (flock) while a controller runs
    .mesh/<name>/controller.pid    its pid, for `mesh down`
    .mesh/<name>/state.json        phase, instances, addresses, pids
    .mesh/<name>/registry.json     service -> mesh addresses in rotation, read by sidecars at start
    .mesh/<name>/ca/               the mesh CA (ca.pem, ca.key mode 0600), kept across runs
    .mesh/<name>/certs/<instance>/ each sidecar's cert.pem, key.pem and ca.pem (mutual TLS)
    .mesh/<name>/admin.token       this run's token for the sidecars' admin listeners (mode 0600; `mesh.sidecar.admin`)
    .mesh/<name>/up.log            output of a detached controller (`mesh up -d`)

state.json is the contract for scripts; `mesh ps --json` prints it with
each state checked against live pids and ``controller.running`` added::

    {"mesh": "hello", "config": "/abs/mesh.toml", "runtime": "process",
     "phase": "starting" | "running" | "stopping" | "stopped" | "failed",
     "error": null | "what failed, with the last output lines",
     "controller": {"pid": 123}, "run": "<MESH_RUN id of its processes>",
     "ca_rotation": {"done": 0 (rotations finished, failed ones too), "rotating": false,
                     "error": null | "why the last one failed"},
     "instances": [{"service": "web", "instance": 1, "label": "web",
                    "state": "starting" | "running" | "stopped", "problem": null,
                    "healthy": true | false | null (no health path),
                    "addresses": {"app": "127.0.0.1:40001", "mesh": ..., "outbound": ..., "admin": ...},
                    "public": "http://127.0.0.1:8080" | null,
                    "pids": {"sidecar": 124, "app": 125}, "pgids": {...}}]}

Instances: ``controller.instances`` is a `mesh.control.instances.InstanceSet`, the one
API through which the controller, its autoscaler (`mesh.control.autoscale`), keyed
services (`mesh.control.keyed`) and supervisor (`mesh.lifecycle`) add, start,
restart, stop and remove instances, issue certificates and save state. What
differs between runtimes is a method of `mesh.control.runtimes.base.Runtime`.

Discovery: the controller keeps the registry (service -> mesh addresses of
its instances in rotation: running, and passing health checks if the
service has a ``health`` path) and pushes it to every running sidecar
(``PUT /registry`` on its admin listener) whenever it changes: an instance
became ready, exited, or changed health. A push that fails is tried again
within a second, and the registry is compared once a second anyway, so a
change made without telling the controller (`Controller.registry_changed`)
still reaches the sidecars. registry.json always holds the last registry,
for sidecars that start later.

Health checks: every instance of a service with ``health`` is checked on
its app (``health_check``: interval, timeout, thresholds; see
`mesh.config.HealthCheck`); after ``unhealthy_threshold`` failed checks in
a row it leaves the registry, after ``healthy_threshold`` good ones it
comes back. Nothing is restarted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from mesh.config import MeshConfig
from mesh.control.instances import InstanceSet
from mesh.control.runtimes import get_runtime, runtime_class
from mesh.control.runtimes.base import (
    Instance,
    Runtime,
    RuntimeUnavailable,
    StartFailed,
    group_alive,
    pid_alive,
    run_processes,
)
from mesh.sidecar.admin import AdminToken

__all__ = ["Controller", "Console", "StateDir", "detach", "down", "format_table", "status"]

log = logging.getLogger("mesh.controller")

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# Instance certificates are short-lived and renewed halfway through their life.
CERT_LIFETIME = 24 * 3600.0


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


class Console:
    """Where the output of apps and sidecars goes: one line each, prefixed with its label."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.width = 0

    def line(self, label: str, text: str) -> None:
        try:
            self.stream.write(f"{label:<{self.width}} | {text}\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed terminal must not stop the controller
            pass


def format_table(instances: list[dict[str, Any]], *, with_state: bool = False) -> str:
    """Services and where they listen, one instance a row (from state.json's ``instances``)."""
    head = ["service", "instance"] + (["state"] if with_state else []) + [
        "app", "mesh", "outbound", "admin", "public"] + (["pids"] if with_state else [])
    rows = [head]
    for inst in instances:
        addresses = inst.get("addresses", {})
        row = [inst["service"], str(inst["instance"]) + (f" ({inst['key']})" if inst.get("key") else "")]
        if with_state:
            state = inst["state"] + (f" ({inst['problem']})" if inst.get("problem") else "")
            row.append(state)
        row += [addresses.get(k, "-") for k in ("app", "mesh", "outbound", "admin")]
        row.append(inst.get("public") or "-")
        if with_state:
            pids = inst.get("pids", {})
            row.append(" ".join(f"{role}={pid}" for role, pid in pids.items()) or "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


class Controller:
    """Runs one mesh until told to stop. See the module docstring for its files."""

    def __init__(self, config: MeshConfig, runtime: str = "process", *, timeout: float = 30.0,
                 console: Console | None = None, cert_lifetime: float = CERT_LIFETIME) -> None:
        self.config = config
        self.files = StateDir(config.state_dir)
        self.timeout = timeout
        self.cert_lifetime = cert_lifetime
        self.console = console or Console()
        self.run_id = secrets.token_hex(8)
        # Written once this controller holds the mesh's lock (`run`), before any sidecar starts.
        self.admin_token = AdminToken.new(self.files.path)
        self.runtime_name = runtime  # in state.json, for `mesh ps` and `mesh down`
        self.runtime: Runtime = get_runtime(runtime, config, output=self.console.line,
                                            on_exit=self._exited, run_id=self.run_id,
                                            admin_token=self.admin_token)
        self.instances = InstanceSet(config, self.runtime, self.files.path, timeout=timeout,
                                     cert_lifetime=cert_lifetime, save=self._save,
                                     changed=self.registry_changed, started=self._started_one,
                                     added=self._added)
        self.phase = "starting"
        self.error: str | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self._changed = asyncio.Event()
        self._written = ""  # the registry in registry.json
        self._started = False  # until then registry.json lists every planned instance
        self._push_failing: set[str] = set()
        # What `mesh certs --rotate-ca` waits on, in state.json.
        self.ca_rotation: dict[str, Any] = {"done": 0, "rotating": False, "error": None}
        from mesh.control.keyed import KeyedServices  # here: `mesh ps` and `mesh down` need none of it

        self.keyed = KeyedServices(self)  # keyed services: their fronts and per-key instances
        from mesh.control.autoscale import Autoscaler
        from mesh.control.supervisor import Supervisor

        self.supervisor = Supervisor(self)  # restarts, exits, lifecycle hooks (mesh.lifecycle)
        self.autoscaler = Autoscaler(self)  # pools scaled on CPU (mesh.control.autoscale)

    def state(self) -> dict[str, Any]:
        return {
            "mesh": self.config.name,
            "config": str(self.config.path),
            "runtime": self.runtime_name,
            "phase": self.phase,
            "error": self.error,
            "controller": {"pid": os.getpid()},
            "run": self.run_id,
            "ca_rotation": dict(self.ca_rotation),
            "instances": [{
                "service": inst.service,
                "instance": inst.index,
                "label": inst.label,
                "state": self.runtime.instance_state(inst),
                "problem": self.instances.problems.get(inst.label),
                "healthy": (inst.label not in self.instances.unhealthy) if inst.health else None,
                "addresses": inst.addresses(),
                "public": inst.public_url,
                **inst.state_fields(),
                **self.keyed.describe(inst),
                **self.supervisor.fields(inst),
            } for inst in self.instances] + self.keyed.rows(),
        }

    def _save(self) -> None:
        try:
            self.files.write_json(self.files.state, self.state())
        except OSError as exc:  # the mesh runs on even if its state dir went away
            log.warning("cannot write %s: %s", self.files.state, exc)

    def _added(self, instance: Instance) -> None:
        self.console.width = max(self.console.width, len(f"{instance.label}.sidecar"))

    def _started_one(self, instance: Instance) -> None:
        self.supervisor.started(instance)

    def _exited(self, instance: Instance, role: str, code: int) -> None:
        # Restarted with backoff, or (code 0) left exited with its sidecar stopped: mesh.lifecycle.
        self.supervisor.on_exit(instance, role, code)

    # discovery

    def registry(self) -> dict[str, list[str]]:
        """Service -> mesh addresses of its instances in rotation: running and not failing health checks."""
        services: dict[str, list[str]] = {name: [] for name in self.config.services}
        for inst in self.instances:
            if (self.runtime.instance_state(inst) == "running" and inst.label not in self.instances.unhealthy
                    and self.supervisor.in_rotation(inst)):
                services[inst.service].append(inst.mesh_address)
        services.update(self.keyed.registry())  # a keyed service is reached at its front
        return services

    def registry_changed(self) -> None:
        """Push the registry to every sidecar now (call after starting, stopping or replacing an instance)."""
        self._changed.set()

    async def _publish_every(self, seconds: float) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._changed.wait()
            self._changed.clear()
            try:
                await self._publish()
            except OSError as exc:  # the state dir went away: pushes still go out next time
                log.warning("cannot write %s: %s", self.files.registry, exc)

    async def _publish(self) -> None:
        """Write registry.json and push it to each running sidecar that does not have it yet."""
        body = json.dumps({"services": self.registry()}, sort_keys=True)
        pushed = self.instances.pushed
        targets = [i for i in self.instances.running() if pushed.get(i.label) != body]
        if body != self._written and self._started:
            self.files.write_json(self.files.registry, json.loads(body))
            self._written = body
            log.info("registry: %s", " ".join(f"{name}={len(addresses)}" for name, addresses
                                              in json.loads(body)["services"].items()))
        if not targets:
            return
        results = await asyncio.gather(*(self.runtime.push_registry(i, body.encode()) for i in targets),
                                       return_exceptions=True)
        for inst, ok in zip(targets, results, strict=True):
            if ok is True:
                pushed[inst.label] = body
                self._push_failing.discard(inst.label)
            elif inst.label not in self._push_failing:  # said once; tried again every second
                self._push_failing.add(inst.label)
                log.warning("%s: its sidecar did not take the new registry (%s)", inst.label,
                            ok if isinstance(ok, BaseException) else "no 204 from PUT /registry")

    def stop(self) -> None:
        """Ask a running `run` to stop everything and return (what SIGINT and SIGTERM do)."""
        self._stop.set()

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            self.stop()
        else:
            # A second Ctrl-C: the user does not want to wait for draining.
            log.warning("stopping now, without waiting")
            task = asyncio.ensure_future(self.runtime.kill_all())
            self._tasks.add(task)

    def _on_rotate_ca(self) -> None:
        task = asyncio.ensure_future(self._rotate_ca())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _rotate_ca(self) -> None:
        """A new mesh CA: trusted everywhere first, then issuing every certificate, then the only one
        trusted. Said in state.json's ``ca_rotation``, which `mesh certs --rotate-ca` waits on."""
        if self.ca_rotation["rotating"]:
            log.warning("a CA rotation is already under way")
            return
        self.ca_rotation.update(rotating=True, error=None)
        self._save()
        try:
            async with self.instances.certificate_work("a CA rotation"):
                self.ca_rotation["error"] = await self._rotate_ca_now()
        except Exception as exc:  # a bug here must not stop the controller
            log.exception("rotating the mesh CA failed")
            self.ca_rotation["error"] = f"rotating the mesh CA failed: {type(exc).__name__}: {exc}"
        finally:
            self.ca_rotation["done"] += 1
            self.ca_rotation["rotating"] = False
            self._save()

    async def _rotate_ca_now(self) -> str | None:
        """Rotate; what went wrong, if anything."""
        fronts = {f"{name} (front)": front for name, front in self.keyed.fronts.items()}
        # Every instance's files, running or not: one that starts later reads them then.
        known = {inst.label: inst for inst in self.instances if inst.tls is not None}
        front_files = {label: (front.service, front.identity.folder)
                       for label, front in fronts.items() if front.identity is not None}
        missed: set[str] = set()

        async def reload(label: str) -> None:
            if label in fronts:
                await fronts[label].reload_certificates()
            elif self.runtime.instance_state(known[label]) == "running":
                if not await self.runtime.reload_certificates(known[label]):
                    log.warning("%s: its sidecar did not reload during the CA rotation", label)
                    missed.add(label)

        log.info("rotating the mesh CA: %d sidecars and fronts trust the new CA first", len(known) + len(front_files))
        try:
            await self.instances.rotate_ca(front_files, reload)
        except OSError as exc:
            log.error("rotating the mesh CA failed: %s", exc)
            return f"rotating the mesh CA failed: {exc}"
        log.info("mesh CA rotated: every certificate is issued by the new CA, the only one trusted")
        if missed:
            return (f"the mesh CA was rotated, but these sidecars did not reload (restart them): "
                    f"{', '.join(sorted(missed))}")
        return None

    async def run(self) -> int:
        """Start the mesh, serve until SIGINT/SIGTERM, stop it. 0 after a clean stop, 1 if it failed to start."""
        fd = self.files.acquire()
        if fd is None:
            pid = self.files.controller_pid()
            print(f"mesh '{self.config.name}' is already up (controller pid {pid}); "
                  f"`mesh down` stops it", file=sys.stderr)
            return 1
        loop = asyncio.get_running_loop()
        try:
            self.files.pid.write_text(f"{os.getpid()}\n")
            self.admin_token.write()
            for sig in _SIGNALS:
                loop.add_signal_handler(sig, self._on_signal)
            loop.add_signal_handler(signal.SIGUSR1, self._on_rotate_ca)  # `mesh certs --rotate-ca`
            return await self._run()
        finally:
            for sig in (*_SIGNALS, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            with contextlib.suppress(OSError):
                self.files.pid.unlink()
            os.close(fd)

    async def _run(self) -> int:
        try:
            await self.runtime.build()
            self.instances.add(*await self.keyed.plan(self.runtime.plan()))
            registry: dict[str, list[str]] = self.keyed.registry()
            for inst in self.instances:
                registry.setdefault(inst.service, []).append(inst.mesh_address)
            self.files.write_json(self.files.registry, {"services": registry})
        except (StartFailed, OSError) as exc:
            self.phase, self.error = "failed", f"mesh up: {exc}"
            print(self.error, file=sys.stderr)
            self._save()
            await self.keyed.stop()  # fronts, and (docker) the networks made for them
            await self.runtime.close()
            return 1
        self.console.width = max((len(f"{i.label}.sidecar") for i in self.instances), default=24)
        self._save()

        code = 1  # unless it starts and is then told to stop
        publishing = asyncio.ensure_future(self._publish_every(1.0))
        starting = asyncio.ensure_future(self._start_all())
        stopping = asyncio.ensure_future(self._stop.wait())
        progress = asyncio.ensure_future(self._save_every(0.25))
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            progress.cancel()
            if not starting.done():
                code = 0  # told to stop while starting
            elif failures := starting.result():
                self.error = _report(failures, len(self.instances) > len(failures))
                self.phase = "failed"
                print(self.error, file=sys.stderr, flush=True)
            else:
                self.phase = "running"
                self._started = True
                self.registry_changed()
                self._save()
                print(f"mesh '{self.config.name}' is up ({self.runtime_name} runtime):\n"
                      f"{format_table(self.state()['instances'])}", flush=True)
                renewing = asyncio.ensure_future(self._renew_every(self.cert_lifetime / 2))
                self.autoscaler.start()
                try:
                    await stopping
                finally:
                    renewing.cancel()
                code = 0
        finally:
            # Whatever happened, including a bug here, nothing this run started outlives it.
            for task in (starting, stopping, progress, publishing):
                task.cancel()
            await asyncio.gather(starting, publishing, return_exceptions=True)
            await self.instances.close()
            if code == 0:
                self.phase = "stopping"
            elif self.phase != "failed":
                self.phase, self.error = "failed", "the controller failed; see its output"
            self._save()
            await self.autoscaler.close()
            await self.supervisor.close()
            await self.keyed.stop()
            await self.instances.stop_all()
            await self.supervisor.shutdown_hooks(list(self.instances))
            await self.runtime.close()
            if code == 0:
                self.phase = "stopped"
                print(f"mesh '{self.config.name}' stopped", flush=True)
            self._save()
        return code

    async def _renew_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            async with self.instances.certificate_work("renewing certificates"):
                await self._renew()

    async def _renew(self) -> None:
        try:
            self.instances.issue(*self.instances)
            await self.keyed.renew()
        except OSError as exc:  # keep serving on the old ones and try again next time
            log.error("renewing certificates failed: %s", exc)
            return
        for inst in self.instances:
            if self.runtime.instance_state(inst) != "running":
                continue
            if not await self.runtime.reload_certificates(inst):
                log.warning("%s: its sidecar did not reload its renewed certificate", inst.label)
        log.info("certificates renewed")

    async def _save_every(self, seconds: float) -> None:
        """Keep state.json current while instances start, so `mesh ps` shows their pids."""
        while True:
            await asyncio.sleep(seconds)
            self._save()

    async def _start_all(self) -> list[StartFailed]:
        """Start every instance at once; on the first failure cancel the rest and return the failures."""
        planned = list(self.instances)
        tasks = [asyncio.ensure_future(self.instances.start(i)) for i in planned]
        try:
            if tasks:  # none when every service is keyed
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        failures = []
        for inst, task in zip(planned, tasks, strict=True):
            if task.cancelled():
                continue
            exc = task.exception()
            if isinstance(exc, StartFailed):
                failures.append(exc)
            elif exc is not None:
                failures.append(StartFailed(inst.label, f"{type(exc).__name__}: {exc}"))
        return failures


def _report(failures: list[StartFailed], others: bool) -> str:
    lines = []
    for failure in failures:
        lines.append(f"mesh up: {failure.label} failed to start: {failure.reason}")
        if failure.tail:
            lines.append(f"last output of {failure.label}:")
            lines += [f"  {line}" for line in failure.tail]
        else:
            lines.append(f"({failure.label} printed nothing)")
    if others:
        lines.append("stopping the rest of the mesh")
    return "\n".join(lines)


# `mesh up -d`, `mesh ps`, `mesh down`: other processes talking to a controller through its files.


def detach(config: MeshConfig, runtime: str, timeout: float) -> int:
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
             "--timeout", str(timeout)],
            stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
            cwd=config.root, start_new_session=True)  # outlives this command and its terminal
    # The controller's own start timeout bounds the wait; the margin covers its start and stop.
    deadline = time.monotonic() + timeout + 30
    while time.monotonic() < deadline:
        state = files.read_state()
        mine = state is not None and state.get("controller", {}).get("pid") == child.pid
        if mine and state is not None and state["phase"] == "running":
            print(f"mesh '{config.name}' is up in the background ({runtime} runtime, "
                  f"controller pid {child.pid}):\n{format_table(state['instances'])}\n"
                  f"log: {files.log}\nstop it with: mesh down {config.path}")
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
    instance not running are left out (the keys stay, empty): nothing
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


def down(config: MeshConfig, timeout: float = 60.0) -> int:
    """Stop the controller of this mesh (SIGTERM) and wait until it and everything it started are gone."""
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


def _wait(done: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True
