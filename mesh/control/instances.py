"""The controller's instances, and everything done to one of them.

`InstanceSet` is the one way to plan, add, start, restart, stop and remove
an instance of a running mesh, and to ask the runtime about one. The
controller owns it (``controller.instances``); its helpers
(`mesh.control.autoscale.Autoscaler`, `mesh.control.keyed.KeyedServices`,
`mesh.control.supervisor.Supervisor`) go through it, never to the runtime,
and reach each other only through the controller's public methods. It
keeps, per instance label:

- its ``problem`` (shown by `mesh ps`) and whether it fails its health
  checks (``unhealthy``: out of rotation),
- the registry its sidecar last took (a (re)started sidecar has only
  registry.json's, so it gets the next push),
- the task checking its health: every ``health_check.interval`` while it
  starts or fails, then, once it passed ``healthy_threshold`` checks in a row,
  every `steady_interval` (a dead process is noticed at once all the same, by
  the runtime's exit callback).

Certificates come from here too, and only from here: `certificate` writes
one from the mesh CA (`mesh.control.ca`; ``.mesh/<name>/ca``, made on first use) into
``.mesh/<name>/certs/<label>/``. A start takes a fresh one (`starting`), and
a renewal or a CA rotation (`certificate_work`) waits for the starts under
way to finish and lets none begin meanwhile, so no sidecar is left with a
certificate or a trust bundle it did not see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from mesh.config import HealthCheck, MeshConfig
from mesh.control.ca import CA, rotate_ca
from mesh.control.runtimes.base import Instance, Runtime

__all__ = ["STEADY_INTERVAL", "InstanceSet", "steady_interval"]

log = logging.getLogger("mesh.controller")

STEADY_INTERVAL = 10.0  # seconds: the longest gap between checks of a healthy instance, unless interval is longer


def steady_interval(check: HealthCheck) -> float:
    """How often a steadily healthy instance is checked: every 10 intervals, at most `STEADY_INTERVAL`
    apart (an interval longer than that stays as it is). With the default 1 s, every 10 s: an app's
    own log is not flooded with its health checks."""
    interval = float(check.interval)
    return max(interval, min(STEADY_INTERVAL, 10 * interval))


class InstanceSet:
    """The instances of a running mesh (see the module docstring). Iterating gives them in order."""

    def __init__(self, config: MeshConfig, runtime: Runtime, state_dir: Path, *, timeout: float,
                 cert_lifetime: float, save: Callable[[], None], changed: Callable[[], None],
                 started: Callable[[Instance], None], added: Callable[[Instance], None]) -> None:
        self.config = config
        self.runtime = runtime
        self.state_dir = state_dir
        self.registry_file = state_dir / "registry.json"
        self.timeout = timeout
        self.cert_lifetime = cert_lifetime
        self._items: list[Instance] = []
        self.problems: dict[str, str] = {}  # label -> what went wrong, for `mesh ps`
        self.unhealthy: set[str] = set()  # labels of instances failing their health checks
        self.pushed: dict[str, str] = {}  # label -> the registry its sidecar last took
        self._watchers: dict[str, asyncio.Future[Any]] = {}  # label -> its health checks
        self._recheck: dict[str, asyncio.Event] = {}  # label -> set when it (re)starts: back to interval
        self._save = save
        self._changed = changed
        self._started = started
        self._added = added
        self._certs = asyncio.Condition()
        self._starts = 0
        self._certs_busy = False

    # membership

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, instance: object) -> bool:
        return any(i is instance for i in self._items)

    def of(self, service: str) -> list[Instance]:
        return [i for i in self._items if i.service == service]

    def add(self, *instances: Instance) -> None:
        """Known from now on: in state.json, and stopped when the mesh stops."""
        for instance in instances:
            self._items.append(instance)
            self._added(instance)

    async def remove(self, instance: Instance) -> None:
        """Stop ``instance`` (if it runs) and forget it: it leaves the registry and state.json."""
        with contextlib.suppress(Exception):
            await self.runtime.stop_instance(instance)
        watcher = self._watchers.pop(instance.label, None)
        if watcher is not None:
            watcher.cancel()
        self._recheck.pop(instance.label, None)
        self._items[:] = [i for i in self._items if i is not instance]
        self.unhealthy.discard(instance.label)
        self.problems.pop(instance.label, None)
        self.pushed.pop(instance.label, None)
        self.changed()
        self.save()

    def save(self) -> None:
        """Write state.json now."""
        self._save()

    def changed(self) -> None:
        """The registry may have changed: push it to every sidecar."""
        self._changed()

    def running(self) -> list[Instance]:
        return [i for i in self._items if self.runtime.instance_state(i) == "running"]

    # planning, and what the runtime tells of an instance

    def plan(self, service: str, index: int) -> Instance:
        """One more instance of ``service`` (a pool growing), addresses chosen; `add` makes it known."""
        return self.runtime.plan_one(service, index)

    def plan_key(self, service: str, index: int, label: str) -> Instance:
        """An instance of a keyed service for one key, named ``label``; `replan` gives it addresses."""
        return self.runtime.plan_key(service, index, label)

    def replan(self, instance: Instance) -> None:
        """Fresh addresses for a new start of a keyed instance, and none of its old processes."""
        self.runtime.replan(instance)  # the last addresses may be taken by now
        instance.forget_processes()

    def reach(self, instance: Instance) -> tuple[str, int]:
        """Where the controller's host reaches a started instance's mesh listener."""
        return self.runtime.reach(instance)

    async def cpu_seconds(self, instance: Instance) -> float | None:
        """Cumulative CPU seconds of the instance's app, or None if it cannot be told now."""
        return await self.runtime.cpu_seconds(instance)

    def exit_code(self, instance: Instance, role: str) -> int | None:
        return self.runtime.exit_code(instance, role)

    def tail(self, instance: Instance, role: str) -> list[str]:
        """The last lines ``role`` (app or sidecar) of ``instance`` printed."""
        return self.runtime.tail(instance, role)

    async def front_host(self) -> str:
        """Where keyed services' fronts listen, reachable from every sidecar (`Runtime.front_host`)."""
        return await self.runtime.front_host()

    def allow_front(self, port: int) -> None:
        """Let sidecars reach a keyed service's front on ``port`` of `front_host`."""
        self.runtime.allow_front(port)

    # starting and stopping

    async def start(self, instance: Instance) -> None:
        """Start ``instance`` with a fresh certificate; watch its health; push the registry."""
        self.pushed.pop(instance.label, None)  # a (re)started sidecar has only the file's registry
        async with self.starting(instance):
            await self.runtime.start_instance(instance, self.registry_file, self.timeout)
        self._started(instance)
        watcher = self._watchers.get(instance.label)
        if instance.health and (watcher is None or watcher.done()):
            self._recheck[instance.label] = recheck = asyncio.Event()
            self._watchers[instance.label] = asyncio.ensure_future(self._check_health(instance, recheck))
        else:
            self._restarted(instance)
        self.changed()
        self.save()

    async def restart(self, instance: Instance, role: str) -> None:
        """Start again its app (``role`` "app") or the whole instance, with certificates of the moment."""
        self.pushed.pop(instance.label, None)
        self._restarted(instance)
        async with self.starting(instance):
            if role == "app":
                await self.runtime.restart_app(instance, self.registry_file, self.timeout)
            else:
                await self.runtime.stop_instance(instance)
                await self.runtime.start_instance(instance, self.registry_file, self.timeout)

    async def stop(self, instance: Instance, *roles: str) -> None:
        """Stop the given roles of ``instance`` in order, or all of it."""
        if not roles:
            await self.runtime.stop_instance(instance)
        for role in roles:
            await self.runtime.stop_role(instance, role)

    async def stop_all(self) -> None:
        """Sidecars first: they stop taking requests and drain those in flight to apps still up. Then apps."""
        for role in ("sidecar", "app"):
            await asyncio.gather(*(self.runtime.stop_role(i, role) for i in self._items))

    async def close(self) -> None:
        """Stop checking health (the mesh is stopping)."""
        watchers = list(self._watchers.values())
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    # health

    def _restarted(self, instance: Instance) -> None:
        """It starts again: its checks go back to every interval."""
        recheck = self._recheck.get(instance.label)
        if recheck is not None:
            recheck.set()

    async def _check_health(self, instance: Instance, recheck: asyncio.Event) -> None:
        """Check the instance's app every interval, or every `steady_interval` once it passed
        ``healthy_threshold`` checks in a row; take it out of rotation and back by the thresholds.
        ``recheck`` is set when the instance starts again."""
        check = self.config.services[instance.service].health_check or HealthCheck()
        steady = steady_interval(check)
        good = bad = 0
        while True:
            calm = good >= check.healthy_threshold and instance.label not in self.unhealthy
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(recheck.wait(), steady if calm else float(check.interval))
            if recheck.is_set():  # (re)started meanwhile: from the start, at the interval
                recheck.clear()
                good = bad = 0
                continue
            if self.runtime.instance_state(instance) != "running":
                good = bad = 0
                continue
            try:
                healthy = await self.runtime.check_health(instance, min(check.timeout, check.interval))
            except Exception as exc:  # a broken check is a failed check, not a dead controller
                log.warning("%s: health check failed to run: %s", instance.label, exc)
                healthy = False
            if healthy:
                good, bad = good + 1, 0
            else:
                good, bad = 0, bad + 1
            if instance.label in self.unhealthy and good >= check.healthy_threshold:
                self.unhealthy.discard(instance.label)
                log.info("%s: healthy again (%d good checks of %s): back in rotation",
                         instance.label, good, instance.health)
            elif instance.label not in self.unhealthy and bad >= check.unhealthy_threshold:
                self.unhealthy.add(instance.label)
                log.warning("%s: unhealthy (%d failed checks of %s): out of rotation",
                            instance.label, bad, instance.health)
            else:
                continue
            self.changed()
            self.save()

    # certificates

    def certificate(self, label: str, service: str) -> Path:
        """A fresh certificate for ``service`` in certs/<label>/ (cert.pem, key.pem, ca.pem); the folder."""
        ca = CA.load_or_create(self.state_dir / "ca", self.config.name)
        folder = self.state_dir / "certs" / label
        ca.write_instance(folder, service, self.cert_lifetime)
        return folder

    async def rotate_ca(self, fronts: dict[str, tuple[str, Path]],
                        reload: Callable[[str], Awaitable[None]]) -> None:
        """A new mesh CA for every instance with certificate files and each of ``fronts`` (label ->
        (service, folder)): trusted everywhere first, then issuing every certificate, then the only
        one trusted; ``reload(label)`` after each step (`mesh.control.ca.rotate_ca`). Raises `OSError`."""
        targets = {inst.label: (inst.service, inst.tls) for inst in self._items if inst.tls is not None}
        targets.update(fronts)
        await rotate_ca(self.state_dir / "ca", self.config.name, targets, self.cert_lifetime, reload)

    def issue(self, *instances: Instance) -> None:
        """A fresh certificate for each of ``instances`` (``instance.tls``)."""
        for inst in instances:
            inst.tls = self.certificate(inst.label, inst.service)

    @contextlib.asynccontextmanager
    async def certificate_work(self, what: str) -> AsyncIterator[None]:
        """Renewing or rotating: once the instances starting are up, and with none starting meanwhile."""
        async with self._certs:
            await self._certs.wait_for(lambda: not self._certs_busy)
            self._certs_busy = True
            if self._starts:
                log.info("%s waits for %d instances to finish starting", what, self._starts)
            await self._certs.wait_for(lambda: self._starts == 0)
        try:
            yield
        finally:
            async with self._certs:
                self._certs_busy = False
                self._certs.notify_all()

    @contextlib.asynccontextmanager
    async def starting(self, instance: Instance) -> AsyncIterator[None]:
        """Around a start of ``instance``'s sidecar: a fresh certificate from the CA of the moment,
        and no renewal or CA rotation until the start is done."""
        async with self._certs:
            await self._certs.wait_for(lambda: not self._certs_busy)
            self._starts += 1
        try:
            self.issue(instance)
            yield
        finally:
            async with self._certs:
                self._starts -= 1
                self._certs.notify_all()
