"""The controller: what `mesh up` runs.

`Controller.run` starts every instance of a mesh on a runtime, keeps a
state file up to date, and on SIGINT/SIGTERM stops everything (sidecars
first, so they drain, then apps). Its files (the lock, its pid, state.json,
registry.json, the mesh CA, the certificates) live in the mesh's state dir,
`mesh.control.state.StateDir`, which `mesh ps` and `mesh down` read.

Instances: ``controller.instances`` is a `mesh.control.instances.InstanceSet`, the one
API through which the controller, its autoscaler (`mesh.control.autoscale`), keyed
services (`mesh.control.keyed`) and supervisor (`mesh.control.supervisor`) plan,
add, start, restart, stop and remove instances, issue certificates and save
state. The helpers ask each other through the controller's public methods
(`Controller.hook`, `Controller.in_rotation`, `Controller.drain`, ...). What
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

Observing: the controller counts what it does (`mesh.control.telemetry`)
and serves that on ``/metrics``, with the mesh's web dashboard, on a
loopback port of its own (`mesh.control.dashboard`), from before the first
instance starts until everything stopped; state.json's ``controller`` has
both URLs meanwhile.

Health checks: every instance of a service with ``health`` is checked on
its app (``health_check``: interval, timeout, thresholds; see
`mesh.config.HealthCheck`); after ``unhealthy_threshold`` failed checks in
a row it leaves the registry, after ``healthy_threshold`` good ones it
comes back. Nothing is restarted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from typing import Any, TextIO

from mesh.config import MeshConfig
from mesh.control.autoscale import Autoscaler
from mesh.control.dashboard import Dashboard
from mesh.control.instances import InstanceSet
from mesh.control.keyed import KeyedServices
from mesh.control.reload import Reloader
from mesh.control.runtimes import get_runtime
from mesh.control.runtimes.base import Instance, Runtime, StartFailed
from mesh.control.state import StateDir, format_table
from mesh.control.supervisor import Supervisor, describe_exit
from mesh.control.telemetry import ControllerMetrics
from mesh.sidecar.admin import AdminToken

__all__ = ["Console", "Controller"]

log = logging.getLogger("mesh.controller")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Instance certificates are short-lived and renewed halfway through their life.
CERT_LIFETIME = 24 * 3600.0


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


class Controller:
    """Runs one mesh until told to stop (see the module docstring; its files: `mesh.control.state`)."""

    def __init__(self, config: MeshConfig, runtime: str = "process", *, timeout: float = 30.0,
                 console: Console | None = None, cert_lifetime: float = CERT_LIFETIME, watch: bool = False) -> None:
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
        # Its own metrics, fed by the helpers below; served with the dashboard (mesh.control.dashboard).
        self.telemetry = ControllerMetrics(config.name, list(config.services), lambda: self.state()["instances"])
        self.dashboard = Dashboard(self)
        self.reloader = Reloader(self)  # `mesh reload`, SIGHUP, `mesh up --watch` (mesh.control.reload)
        self.watch = watch
        self.keyed = KeyedServices(self)  # keyed services: their fronts and per-key instances
        self.supervisor = Supervisor(self)  # restarts, exits, lifecycle hooks (mesh.lifecycle)
        self.autoscaler = Autoscaler(self)  # pools scaled on CPU (mesh.control.autoscale)

    def state(self) -> dict[str, Any]:
        return {
            "mesh": self.config.name,
            "config": str(self.config.path),
            "runtime": self.runtime_name,
            "phase": self.phase,
            "error": self.error,
            "controller": {"pid": os.getpid(), **self.dashboard.urls},
            "run": self.run_id,
            "ca_rotation": dict(self.ca_rotation),
            "version": self.reloader.version,
            "reload": dict(self.reloader.status),
            "instances": [{
                "service": inst.service,
                "instance": inst.index,
                "label": inst.label,
                "state": self.runtime.instance_state(inst),
                "problem": self.instances.problems.get(inst.label),
                "healthy": (inst.label not in self.instances.unhealthy) if inst.health else None,
                "addresses": inst.addresses(),
                "public": inst.public_url,
                "version": self.reloader.version,
                **inst.state_fields(),
                **self.keyed.describe(inst),
                **self.supervisor.fields(inst),
            } for inst in self.instances] + self.keyed.rows(),
        }

    def save(self) -> None:
        """Write state.json now (what `mesh ps` and `mesh reload` read)."""
        self._save()

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

    # what its autoscaler and keyed services ask of its supervisor

    def in_rotation(self, instance: Instance) -> bool:
        """Whether ``instance`` may serve: neither draining on its way out nor exited on purpose."""
        return self.supervisor.in_rotation(instance)

    def hook(self, instance: Instance, name: str, *args: Any) -> None:
        """Call the lifecycle hook ``name`` of the instance's service in the background; errors are logged."""
        self.supervisor.hook(instance, name, *args)

    def drain(self, instance: Instance) -> None:
        """Take ``instance`` out of rotation for good (it is on its way out) and tell the sidecars."""
        self.supervisor.drain(instance)
        self.instances.changed()
        self.instances.save()

    def forget(self, instance: Instance) -> None:
        """Drop what the supervisor keeps of a removed instance (restarts, exit, draining)."""
        self.supervisor.forget(instance)

    async def sleep_when_idle(self, instance: Instance) -> bool:
        """Whether an idle keyed instance should sleep: its service's ``on_idle`` hook decides."""
        return await self.supervisor.sleep_when_idle(instance)

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

    def adopt(self, config: MeshConfig) -> None:
        """From now on the mesh is ``config`` (a reload applied it to every sidecar)."""
        self.config = self.instances.config = self.runtime.config = config
        self._save()

    def _on_reload(self) -> None:
        task = asyncio.ensure_future(self.reloader.run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            try:
                await self.dashboard.start()  # before any instance, so `mesh ps` shows it while they start
            except OSError as exc:  # the mesh runs without it
                log.warning("the dashboard and /metrics of the controller did not start: %s", exc)
            for sig in _SIGNALS:
                loop.add_signal_handler(sig, self._on_signal)
            loop.add_signal_handler(signal.SIGUSR1, self._on_rotate_ca)  # `mesh certs --rotate-ca`
            loop.add_signal_handler(signal.SIGHUP, self._on_reload)  # `mesh reload`
            return await self._run()
        finally:
            for sig in (*_SIGNALS, signal.SIGUSR1, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.dashboard.stop()
            self._save()  # without its addresses
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
                self._started = True
                # Up once every sidecar knows every instance: a call right after may go to any of them.
                with contextlib.suppress(OSError):
                    await self._publish()
                self.phase = "running"
                self._save()
                print(f"mesh '{self.config.name}' is up ({self.runtime_name} runtime):\n"
                      f"{format_table(self.state()['instances'])}{self._urls()}", flush=True)
                renewing = asyncio.ensure_future(self._renew_every(self.cert_lifetime / 2))
                watching = asyncio.ensure_future(self.reloader.watch()) if self.watch else None
                self.autoscaler.start()
                try:
                    await stopping
                finally:
                    renewing.cancel()
                    if watching is not None:
                        watching.cancel()
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

    def _urls(self) -> str:
        urls = self.dashboard.urls
        if not urls:
            return ""
        return f"\ndashboard: {urls['dashboard']}\nmetrics: {urls['metrics']}"

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
        """Start every instance, those of a service once each service in its ``depends_on`` is ready
        (`_ready`), the others at once; on the first failure cancel the rest and return the failures,
        with each instance left waiting for a service that failed (`NotStarted`)."""
        planned = list(self.instances)
        gates: dict[str, asyncio.Future[str | None]] = {}
        tasks: list[asyncio.Future[None]] = [asyncio.ensure_future(self._start_after(i, gates)) for i in planned]
        for name in self.config.services:
            mine = [(i, t) for i, t in zip(planned, tasks, strict=True) if i.service == name]
            gates[name] = asyncio.ensure_future(self._ready(name, mine))
        try:
            if tasks:  # none when every service is keyed
                await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            everything: list[asyncio.Future[Any]] = [*tasks, *gates.values()]
            for waiting in everything:
                waiting.cancel()
            await asyncio.gather(*everything, return_exceptions=True)
        failures: list[StartFailed] = []
        for inst, task in zip(planned, tasks, strict=True):
            exc = None if task.cancelled() else task.exception()
            if isinstance(exc, StartFailed):
                failures.append(exc)
            elif exc is not None:
                failures.append(StartFailed(inst.label, f"{type(exc).__name__}: {exc}"))
        failed = {inst.service for inst in planned if any(f.label == inst.label for f in failures)}
        for inst, task in zip(planned, tasks, strict=True):
            path = _blocked_by(self.config, inst.service, failed) if task.cancelled() else None
            if path:
                failures.append(NotStarted(inst.label, f"it depends on {', which depends on '.join(path)}, "
                                                       f"which failed to start"))
        return failures

    async def _start_after(self, instance: Instance, gates: dict[str, asyncio.Future[str | None]]) -> None:
        """Start ``instance`` once the services its own depends on are ready; say what it waits for."""
        service = self.config.services[instance.service]
        waiting = [d for d in service.depends_on if not gates[d].done()]
        if waiting and instance.index == 1:
            what = [f"the job {d} to finish" if self.config.services[d].job else d for d in waiting]
            self.console.line("mesh", f"{instance.service}: waiting for {', '.join(what)}")
        for dependency in service.depends_on:
            failed = await asyncio.shield(gates[dependency])
            if failed is not None:
                raise NotStarted(instance.label, f"it depends on {dependency}, which {failed}")
        await self.instances.start(instance)

    async def _ready(self, name: str, started: list[tuple[Instance, asyncio.Future[None]]]) -> str | None:
        """None once ``name`` is ready for the services that depend on it, else how it failed: every
        instance started, which is its first healthy answer (its ``health`` path, else its port), and
        for a job every instance finished with code 0."""
        if started:
            await asyncio.wait([task for _, task in started])
        if any(task.cancelled() or task.exception() is not None for _, task in started):
            return "failed to start"
        if self.config.services[name].job:
            for instance, _ in started:
                code = await self.supervisor.exited_for_good(instance)
                if code != 0:
                    return f"failed with {describe_exit(code)}"
        return None


class NotStarted(StartFailed):
    """An instance never started: a service it depends on failed."""


def _blocked_by(config: MeshConfig, service: str, failed: set[str]) -> list[str]:
    """The services through which ``service`` depends on one in ``failed`` (that one last); empty if none."""
    for dependency in config.services[service].depends_on:
        if dependency in failed:
            return [dependency]
        if dependency in config.services and (path := _blocked_by(config, dependency, failed)):
            return [dependency, *path]
    return []


def _report(failures: list[StartFailed], others: bool) -> str:
    lines = []
    for failure in failures:
        lines.append(f"mesh up: {failure.label} failed to start: {failure.reason}")
        if failure.tail:
            lines.append(f"last output of {failure.label}:")
            lines += [f"  {line}" for line in failure.tail]
        elif not isinstance(failure, NotStarted):
            lines.append(f"({failure.label} printed nothing)")
    if others:
        lines.append("stopping the rest of the mesh")
    return "\n".join(lines)
