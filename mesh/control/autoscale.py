"""Autoscaled pools: ``scale = { min = 1, max = 4, cpu = 0.75, cooldown = "30s" }``.

`mesh up` starts ``min`` instances (at least one). Then, for every pool whose
``max`` is above its ``min``, the controller's `Autoscaler` samples the CPU
time of each instance's app every `Autoscaler.interval` seconds (1s) and
averages it over the last `Autoscaler.window` seconds (10s):

- above ``cpu`` (a share of one core, per instance, averaged over the pool's
  instances in rotation): one instance is added, up to ``max``. It joins the
  registry pushed to the sidecars once it is ready (the runtime's readiness
  wait: the ``health`` path if any). The pool then waits one window before
  it decides again, so the new instance shows in the average.
- below ``cpu / 2`` (the low-water mark) for ``cooldown`` without a break:
  one instance is removed, down to ``min``, the newest first. It leaves the
  registry first, the sidecars get the new registry, it has `drain` seconds
  (5s) for requests in flight, then it is stopped (its sidecar drains too).

Between the two marks nothing changes. Every decision is logged with the
numbers behind it::

    convert: average CPU 0.91 over 10s across 2 instances > 0.75: adding convert.3

CPU time comes from /proc on the process runtime: utime + stime of every
live process in the app's process group, plus cutime + cstime (what their
children that already exited used: a pool running one ``ffmpeg`` per
request counts it). On the docker runtime it is the app container's
``cpu_stats.cpu_usage.total_usage`` from the engine's stats; both are
cumulative counters, and a rate is their difference over wall time.

The window, interval and drain can be set with ``MESH_AUTOSCALE_WINDOW``,
``MESH_AUTOSCALE_INTERVAL`` and ``MESH_AUTOSCALE_DRAIN`` (seconds), for tests.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from mesh.control.runtimes.base import Instance, StartFailed
from mesh.control.runtimes.procfs import process_group_cpu

if TYPE_CHECKING:
    from mesh.control.controller import Controller

__all__ = ["Autoscaler", "process_group_cpu"]

log = logging.getLogger("mesh.autoscale")


class Autoscaler:
    """Scales the controller's pools on CPU (see the module docstring)."""

    window = float(os.environ.get("MESH_AUTOSCALE_WINDOW", 10.0))
    interval = float(os.environ.get("MESH_AUTOSCALE_INTERVAL", 1.0))
    drain = float(os.environ.get("MESH_AUTOSCALE_DRAIN", 5.0))

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.pools = {name: s.scale for name, s in controller.config.services.items()
                      if s.scale is not None and s.scale.max > max(s.scale.min, 1)}
        self.samples: dict[str, collections.deque[tuple[float, float]]] = {}
        self.cpu: dict[str, float] = {}  # label -> its last window's average, for state.json
        self._tasks: list[asyncio.Future[Any]] = []
        self._changes: set[asyncio.Future[Any]] = set()

    def start(self) -> None:
        for name in self.pools:
            self._tasks.append(asyncio.ensure_future(self._run(name)))

    async def close(self) -> None:
        for task in (*self._tasks, *self._changes):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._changes, return_exceptions=True)

    def members(self, service: str) -> list[Instance]:
        """The pool's instances that count: running, in rotation."""
        c = self.controller
        return [i for i in c.instances.running() if i.service == service and c.in_rotation(i)]

    async def sample(self, service: str) -> dict[str, float]:
        """Take one CPU sample of each member; return each member's average over the window (cores)."""
        now = time.monotonic()
        rates: dict[str, float] = {}
        for inst in self.members(service):
            used = await self.controller.instances.cpu_seconds(inst)
            if used is None:
                continue
            history = self.samples.setdefault(inst.label, collections.deque())
            history.append((now, used))
            while len(history) > 2 and history[1][0] <= now - self.window:
                history.popleft()
            first_t, first_cpu = history[0]
            if now - first_t >= self.interval * 0.5:
                rates[inst.label] = max(0.0, used - first_cpu) / (now - first_t)
                self.cpu[inst.label] = round(rates[inst.label], 3)
        return rates

    async def _run(self, service: str) -> None:
        scale = self.pools[service]
        low_mark = scale.cpu / 2
        hold_until = time.monotonic() + self.window  # a full window before the first decision
        low_since: float | None = None
        while True:
            await asyncio.sleep(self.interval)
            try:
                rates = await self.sample(service)
            except Exception:  # noqa: BLE001 - a bad sample must not end scaling
                log.exception("%s: CPU sampling failed", service)
                continue
            now = time.monotonic()
            if not rates or self._changes:
                continue
            count = len([i for i in self.controller.instances.of(service) if self.controller.in_rotation(i)])
            average = sum(rates.values()) / len(rates)
            self.controller.telemetry.pool_cpu(service, average)
            if average < low_mark:
                low_since = now if low_since is None else low_since
            else:
                low_since = None
            if now < hold_until:
                continue
            numbers = (f"{service}: average CPU {average:.2f} over {self.window:g}s "
                       f"across {len(rates)} instance{'s' if len(rates) != 1 else ''}")
            if average > scale.cpu and count < scale.max:
                self._spawn(service, f"{numbers} > {scale.cpu:g}")
                self.controller.telemetry.scaled(service, "up", average)
                hold_until, low_since = now + self.window, None
            elif (low_since is not None and now - low_since >= scale.cooldown
                  and count > max(scale.min, 1)):
                victim = self._newest(service)
                if victim is not None:
                    log.info("%s < %g for %gs: removing %s (draining %gs first)", numbers, low_mark,
                             scale.cooldown, victim.label, self.drain)
                    self._track(self._remove(victim))
                    self.controller.telemetry.scaled(service, "down", average)
                    hold_until, low_since = now + self.window, None

    def _track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)

    def _newest(self, service: str) -> Instance | None:
        members = self.members(service)
        return max(members, key=lambda i: i.index) if members else None

    def _spawn(self, service: str, why: str) -> str:
        c = self.controller
        index = max((i.index for i in c.instances.of(service)), default=0) + 1
        instance = c.instances.plan(service, index)
        log.info("%s: adding %s", why, instance.label)
        self._track(self._add(instance))
        return instance.label

    async def _add(self, instance: Instance) -> None:
        c = self.controller
        c.instances.add(instance)  # from now on, a shutdown stops it too
        c.instances.save()
        started = time.monotonic()
        try:
            await c.instances.start(instance)
        except StartFailed as exc:
            log.error("%s: did not start: %s; removing it", instance.label, exc.reason)
            c.hook(instance, "on_error", instance, f"start failed: {exc.reason}")
            await self._forget(instance)
            return
        log.info("%s: ready after %.1fs: in rotation", instance.label, time.monotonic() - started)

    async def _remove(self, instance: Instance) -> None:
        c = self.controller
        c.drain(instance)  # out of the registry first
        await asyncio.sleep(self.drain)
        await c.instances.stop(instance)
        code = c.instances.exit_code(instance, "app")
        c.hook(instance, "on_stop", instance, code, "scaled down")
        log.info("%s: stopped (scaled down)", instance.label)
        await self._forget(instance)

    async def _forget(self, instance: Instance) -> None:
        await self.controller.instances.remove(instance)
        self.samples.pop(instance.label, None)
        self.cpu.pop(instance.label, None)
        self.controller.forget(instance)
