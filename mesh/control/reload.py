"""The controller's side of `mesh reload`: check, apply everywhere at once, or change nothing.

`Reloader.reload` reads mesh.toml again and checks it as `mesh check`
does (plugin files edited since are imported afresh), then:

1. every running sidecar prepares the new version (`mesh.sidecar.reload`):
   it loads the same files, checks they are the version the controller
   checked, builds its new chains and starts their plugins;
2. once all have, every sidecar commits (swaps); once all have, each
   finishes (its old chains drain, their plugins stop). If any step fails
   anywhere, the sidecars that prepared abort and those that committed
   roll back: the mesh keeps serving the old version, and the reload is
   refused with the reason;
3. then the processes follow: services added are started, services
   removed are drained and stopped, and services whose process settings
   changed (command, env, build, image, port, expose, health, replicas,
   limits, listener settings) are replaced one instance at a time, the new
   one started and in rotation before the old one is drained, so a
   service never lacks a running instance. Changes to chains, routes,
   egress and timeouts restart nothing.

A runtime may do steps 1 to 3 for the services kept itself
(`Runtime.update_services`: on swarm, rolling updates of the services whose
tasks see a change); services added and removed still follow step 3.

A change to a keyed service's ``instances`` or a pool's ``scale``,
adding or removing a keyed service or a pool, or renaming the mesh is
refused: those need `mesh down` and `mesh up`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import aiohttp

from mesh.config import MeshConfig, ServiceConfig, load
from mesh.config.model import start_order
from mesh.config.version import version
from mesh.control.runtimes.base import Instance, StartFailed, instance_count, instance_label
from mesh.errors import ConfigError

if TYPE_CHECKING:
    from mesh.control.controller import Controller

__all__ = ["Plan", "ReloadFailed", "Reloader", "plan"]

log = logging.getLogger("mesh.reload")

# What a service's instances can change without being restarted: their sidecars swap it in.
_LIVE = frozenset({"plugins", "outbound", "routes", "timeout", "plugin_specs", "outbound_specs", "name",
                   "depends_on", "restart"})  # the last two: read at a start, at an exit
_REFUSED = ("scale", "instances")  # changing these needs the mesh restarted
STEP_TIMEOUT = 120.0  # seconds one sidecar may take for one step (prepare starts plugins: a cache may connect)


class ReloadFailed(Exception):
    """The reload was refused or undone; the mesh serves the version it served before."""


@dataclass
class Plan:
    """What a new mesh.toml changes in the running mesh's processes."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)  # by the runtime (`Runtime.update_services`)

    def describe(self) -> str:
        parts = [f"{what} {', '.join(names)}" for what, names in
                 (("started", self.added), ("stopped", self.removed), ("restarted", self.restarted),
                  ("updated", self.updated)) if names]
        return "; ".join(parts) or "no service started, stopped or restarted"


def _process_settings(service: ServiceConfig) -> dict[str, Any]:
    return {f.name: getattr(service, f.name) for f in fields(service) if f.name not in _LIVE}


def plan(old: MeshConfig, new: MeshConfig) -> Plan:
    """What changes between ``old`` and ``new``; ReloadFailed for what a reload cannot change."""
    if new.name != old.name:
        raise ReloadFailed(f"[mesh] name changed ({old.name!r} -> {new.name!r}): a reload cannot rename a "
                           f"mesh; `mesh down`, then `mesh up`")
    result = Plan()
    for name in new.services:
        if name not in old.services:
            if new.services[name].instances is not None or new.services[name].scale is not None:
                raise ReloadFailed(f"services.{name}: a keyed or scaled service cannot be added by a reload; "
                                   f"`mesh down`, then `mesh up`")
            result.added.append(name)
    for name, service in old.services.items():
        if name not in new.services:
            if service.instances is not None or service.scale is not None:
                raise ReloadFailed(f"services.{name}: a keyed or scaled service cannot be removed by a reload; "
                                   f"`mesh down`, then `mesh up`")
            result.removed.append(name)
            continue
        before, after = _process_settings(service), _process_settings(new.services[name])
        for key in _REFUSED:
            if before[key] != after[key]:
                raise ReloadFailed(f"services.{name}.{key} changed: a reload cannot change it; "
                                   f"`mesh down`, then `mesh up`")
        if before != after:
            if service.instances is not None:
                raise ReloadFailed(f"services.{name}: a keyed service's process settings cannot change by a "
                                   f"reload; `mesh down`, then `mesh up`")
            result.restarted.append(name)
    return result


class Reloader:
    """`mesh reload` for one controller (see the module docstring)."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.version = version(controller.config)
        # In state.json as "reload": what `mesh reload` waits on (``done`` counts the reloads tried).
        self.status: dict[str, Any] = {"done": 0, "running": False, "error": None, "changes": None}
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        """One reload, its outcome in `status` (SIGHUP; `mesh reload` sends it and reads the outcome)."""
        c = self.controller
        self.status.update(running=True, error=None, changes=None)
        c.save()
        try:
            if c.phase != "running":
                raise ReloadFailed(f"the mesh is {c.phase}: reload it once it runs")
            if not c.runtime.reloadable:
                raise ReloadFailed(f"the {c.runtime.name} runtime cannot reload a running mesh: `mesh down`, "
                                   f"then `mesh up`")
            target, changes = await self.reload()
            self.status["changes"] = changes.describe()
            log.info("reloaded: version %s; %s", target, changes.describe())
            c.console.line("mesh", f"reloaded: version {target}; {changes.describe()}")
        except ReloadFailed as exc:
            self.status["error"] = str(exc)
            log.error("reload refused: %s", exc)
            c.console.line("mesh", f"reload refused: {exc}")
        except Exception as exc:  # a bug here must not stop the controller
            log.exception("reload failed")
            self.status["error"] = f"reload failed: {type(exc).__name__}: {exc}"
        finally:
            self.status["done"] += 1
            self.status["running"] = False
            c.save()

    async def watch(self, every: float = 1.0) -> None:
        """`mesh up --watch`: reload when mesh.toml or the plugin code changes (checked every ``every`` s)."""
        loop = asyncio.get_running_loop()
        seen = self.version
        while True:
            await asyncio.sleep(every)
            try:
                now = await loop.run_in_executor(None, version, self.controller.config)
            except OSError:
                continue  # mesh.toml is being replaced: look again
            if now != seen and not self._lock.locked():
                seen = now
                log.info("mesh.toml or the plugin code changed: reloading")
                await self.run()

    async def reload(self) -> tuple[str, Plan]:
        """Apply mesh.toml as it is now; the new version and what changed. ReloadFailed: nothing changed."""
        async with self._lock:
            c = self.controller
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, load, c.config.path)
            except ConfigError as exc:
                raise ReloadFailed("mesh.toml has problems:\n" + "\n".join(exc.problems)) from None
            changes = plan(c.config, new)
            target = version(new)
            if target == self.version and not (changes.added or changes.removed or changes.restarted):
                return target, changes
            try:
                updated = await c.runtime.update_services(new)
            except StartFailed as exc:
                raise ReloadFailed(f"not applied, the mesh serves the version it served:\n{exc}") from None
            if updated is None:
                await self._swap_sidecars(target, [i for i in self._sidecars() if i.service not in changes.removed])
            else:
                changes.restarted, changes.updated = [], updated
            self.version = target
            c.adopt(new)
            await self._apply(new, changes)
            return target, changes

    # the sidecars, all or none

    def _sidecars(self) -> list[Instance]:
        c = self.controller
        return [i for i in c.instances if c.runtime.instance_state(i) == "running" and "admin" in i.ports]

    async def _step(self, instance: Instance, step: str, target: str) -> str | None:
        """One reload step on one sidecar; None when it is done, else why not."""
        url = f"http://127.0.0.1:{instance.ports['admin']}/reload/{step}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=STEP_TIMEOUT)) as session, \
                    session.post(url, json={"version": target}, headers=self.controller.admin_token.headers()) as r:
                if r.status in (200, 204):
                    return None
                return f"{instance.label}: {(await r.text()).strip() or r.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{instance.label}: {type(exc).__name__}: {exc}"

    async def _all(self, instances: list[Instance], step: str, target: str) -> list[str]:
        results = await asyncio.gather(*(self._step(i, step, target) for i in instances))
        return [problem for problem in results if problem is not None]

    async def _swap_sidecars(self, target: str, sidecars: list[Instance]) -> None:
        problems = await self._all(sidecars, "prepare", target)
        if problems:
            await self._all(sidecars, "abort", target)
            raise ReloadFailed("not applied, the mesh serves the version it served:\n" + "\n".join(problems))
        problems = await self._all(sidecars, "commit", target)
        if problems:
            await self._all(sidecars, "rollback", target)
            await self._all(sidecars, "abort", target)
            raise ReloadFailed("rolled back, the mesh serves the version it served:\n" + "\n".join(problems))
        for problem in await self._all(sidecars, "finish", target):
            log.warning("reload: %s", problem)  # it serves the new version; its old plugins may linger

    # the processes

    async def _apply(self, new: MeshConfig, changes: Plan) -> None:
        c = self.controller
        for name in [n for n in start_order(new.services) if n in changes.added]:  # after their depends_on
            service = new.services[name]
            count = instance_count(service)
            for index in range(1, count + 1):
                instance = c.instances.plan(name, index)
                instance.label = instance_label(name, service, index, count)
                if service.expose is not None and index == 1:
                    instance.ports["public"] = service.expose
                await self._start(instance)
        for name in changes.restarted:
            await self._replace(name, new.services[name])
        for name in changes.removed:
            for instance in list(c.instances.of(name)):
                await self._retire(instance, "removed from mesh.toml")

    async def _start(self, instance: Instance) -> None:
        c = self.controller
        c.instances.add(instance)
        c.instances.save()
        try:
            await c.instances.start(instance)
        except StartFailed as exc:
            log.error("reload: %s did not start: %s", instance.label, exc.reason)
            c.hook(instance, "on_error", instance, f"start failed: {exc.reason}")

    async def _retire(self, instance: Instance, why: str) -> None:
        c = self.controller
        c.drain(instance)
        await asyncio.sleep(0.5)  # sidecars learn it is gone before it stops answering
        await c.instances.stop(instance)
        c.hook(instance, "on_stop", instance, c.instances.exit_code(instance, "app"), why)
        await c.instances.remove(instance)
        c.forget(instance)

    async def _replace(self, name: str, service: ServiceConfig) -> None:
        """One instance at a time: a new one up and in rotation, then an old one drained and stopped.

        An exposed service's instances share its public socket where the runtime holds it
        (`Runtime.shares_public`): the new sidecar takes it once its app is ready, and the old
        one stops accepting as it drains, so the public port never refuses a connection. The
        instance whose sidecar pins ports (or, elsewhere, holds the ``expose``d port) gives them up
        first (two cannot listen on one): they refuse connections while its successor starts.
        """
        c = self.controller
        old = sorted(c.instances.of(name), key=lambda i: i.index)
        count = instance_count(service)
        index = max((i.index for i in old), default=0) + 1
        shared = c.runtime.shares_public
        for position in range(max(count, len(old))):
            retiring = old[position] if position < len(old) else None
            fixed = retiring is not None and (("public" in retiring.ports and not shared)
                                              or bool(service.pinned_ports()))
            if retiring is not None and fixed:
                await self._retire(retiring, "replaced by a reload")
            if position < count:
                instance = c.instances.plan(name, index + position)
                if service.expose is not None and position == 0:
                    instance.ports["public"] = service.expose
                await self._start(instance)
            if retiring is not None and not fixed:
                await self._retire(retiring, "replaced by a reload")
