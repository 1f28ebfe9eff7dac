"""Lifecycle: restarts of crashed apps, and the user's lifecycle hooks.

Restarts (the controller's `Supervisor`, on every runtime):

- an app that exits with a non-zero code, or is killed by a signal, is
  started again after a backoff of 0.5s, 1s, 2s, ... capped at 30s; the
  backoff starts over once an app has stayed up for 60s. Its sidecar keeps
  running on the process runtime; the instance is out of rotation until
  the new app is ready. ``mesh ps --json`` shows ``restarts`` per instance.
- an app that exits with code 0 finished on purpose (a batch job): it is
  not restarted, its sidecar is stopped too, and its state is ``exited``.
- a sidecar that exits unasked takes its instance with it: the whole
  instance is stopped and started again, with the same backoff.

Hooks: ``[services.X] lifecycle = "file.py:Class"`` (a file on the mesh's
``plugin_path``, or ``package.module:Class``) names a class built once per
`mesh up` with no arguments. Every method is optional; `Lifecycle` holds
the defaults, and subclassing it is the easy way::

    from mesh.lifecycle import Lifecycle

    class Audit(Lifecycle):
        async def on_start(self, instance):                    # ready, in rotation
            ...
        async def on_stop(self, instance, exit_code, reason):  # reason: "exited", "crashed",
            ...                                                # "scaled down", "shutdown"
        async def on_error(self, instance, error):             # error: a message (str)
            ...

``instance`` is the runtime's `mesh.runtime.Instance` (``service``,
``index``, ``label``, ``ports``, ``key`` for a keyed instance, ``pids`` on
the process runtime, ``containers`` on docker).
A hook runs as its own task, bounded by `HOOK_TIMEOUT`; one that raises or
hangs is logged and changes nothing else: the mesh keeps running.

Two more hooks decide rather than observe:

- ``on_idle(instance)``: asked by the controller (`mesh.keyed`) when a keyed
  instance has been idle for ``sleep_after``; returning ``"sleep"`` (the
  default) stops it, ``"keep"`` keeps it (it is asked again after another
  ``sleep_after``). A hook that raises, answers anything else or takes over
  `IDLE_HOOK_TIMEOUT` (5 s) puts the instance to sleep.
- ``choose_instance(request, instances)``: custom scheduling. Every sidecar
  loads the hooks of each service that overrides it (`mesh.sidecar`) and
  asks it before its balancer picks an instance for a call to that service
  (`mesh.balancer`): ``instances`` are the ones in rotation (less those a
  retry already tried, when others remain), each with ``address``,
  ``host``, ``port`` and ``outstanding`` (requests in flight from this
  sidecar). Returning None (the default), an instance not
  offered, or raising leaves the choice to the balancer. It runs on every
  request: keep it quick and synchronous.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PluginError
from .runtime import Instance, StartFailed

if TYPE_CHECKING:
    from .controller import Controller

__all__ = ["HOOKS", "Lifecycle", "Supervisor", "check_lifecycle", "load_lifecycle"]

log = logging.getLogger("mesh.lifecycle")

HOOKS = ("on_start", "on_stop", "on_error", "on_idle", "choose_instance")
HOOK_TIMEOUT = 30.0
IDLE_HOOK_TIMEOUT = 5.0  # on_idle is asked on the way to a decision: keep it short


class Lifecycle:
    """The default behaviour of every hook; subclass it and override what you need."""

    async def on_start(self, instance: Instance) -> None:
        """The instance is ready and in rotation (after `mesh up`, a restart or a scale-up)."""

    async def on_stop(self, instance: Instance, exit_code: int | None, reason: str) -> None:
        """The instance's app stopped: ``reason`` is ``exited`` (code 0, not restarted),
        ``crashed`` (it will be restarted), ``scaled down`` or ``shutdown``."""

    async def on_error(self, instance: Instance, error: str) -> None:
        """Something went wrong with the instance: a crash, or a (re)start that failed."""

    async def on_idle(self, instance: Instance) -> str:
        """A keyed instance is idle: ``"sleep"`` stops it (the default), ``"keep"`` keeps it."""
        return "sleep"

    def choose_instance(self, request: Any, instances: Sequence[Any]) -> Any:
        """Pick one of ``instances`` for ``request``; None leaves the choice to the balancer."""
        return None


def load_lifecycle(use: str, plugin_path: Sequence[Path] = ()) -> type:
    """The class ``use`` names (``file.py:Class`` on plugin_path, or ``module:Class``); PluginError if not."""
    from .loader import load_object

    cls = load_object(use, plugin_path)
    if not isinstance(cls, type):
        raise PluginError(f"'{use}' is not a class")
    if not any(callable(getattr(cls, name, None)) for name in HOOKS):
        raise PluginError(f"'{use}' has none of the lifecycle hooks ({', '.join(HOOKS)})")
    for name in HOOKS[:4]:
        method = getattr(cls, name, None)
        if method is not None and not inspect.iscoroutinefunction(method):
            raise PluginError(f"'{use}': {name} must be 'async def'")
    try:
        inspect.signature(cls).bind()
    except TypeError:
        raise PluginError(f"'{use}': the class must be constructible with no arguments") from None
    return cls


def check_lifecycle(use: str, where: str, plugin_path: Sequence[Path], problems: list[str]) -> None:
    """For `mesh.config`: one problem line if ``use`` does not name a usable hook class."""
    try:
        load_lifecycle(use, plugin_path)
    except PluginError as exc:
        problems.append(f"{where}: {exc}")


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"code {code} (killed by {signal.Signals(-code).name})"
    if code > 128:
        with contextlib.suppress(ValueError):
            return f"code {code} (killed by {signal.Signals(code - 128).name}?)"
    return f"code {code}"


def _known(controller: Controller, instance: Instance) -> bool:
    return instance in controller.instances


class Supervisor:
    """The controller's restarts, exits and hook calls (see the module docstring)."""

    backoff = 0.5       # first restart delay, doubling per crash in a row
    max_backoff = 30.0
    stable_after = 60.0  # up this long: the next crash starts the backoff over

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.hooks: dict[str, Any] = {}
        self.restarts: dict[str, int] = {}      # label -> how many times its app was restarted
        self.exited: dict[str, int] = {}        # label -> exit code, for apps done on purpose
        self.draining: set[str] = set()         # labels out of rotation on their way out
        self._crashes: dict[str, int] = {}      # label -> crashes in a row (for the backoff)
        self._up_since: dict[str, float] = {}
        self._restarting: dict[str, asyncio.Future[Any]] = {}
        self._hook_tasks: set[asyncio.Future[Any]] = set()
        self.closing = False
        config = controller.config
        for name, service in config.services.items():
            if service.lifecycle:
                try:
                    self.hooks[name] = load_lifecycle(service.lifecycle, config.plugin_path)()
                except Exception as exc:  # config.load checked it; a hook that breaks later is logged
                    log.error("services.%s.lifecycle: %s; running without hooks", name, exc)

    # what the controller asks

    def in_rotation(self, instance: Instance) -> bool:
        return instance.label not in self.draining and instance.label not in self.exited

    def fields(self, instance: Instance) -> dict[str, Any]:
        """Extra state.json fields of an instance (its state is ``exited`` once done on purpose)."""
        extra: dict[str, Any] = {"restarts": self.restarts.get(instance.label, 0)}
        if instance.label in self.exited:
            extra["state"] = "exited"
        elif instance.label in self.draining:
            extra["state"] = "draining"
        return extra

    def started(self, instance: Instance) -> None:
        self._up_since[instance.label] = time.monotonic()
        self.hook(instance, "on_start", instance)

    def forget(self, instance: Instance) -> None:
        for table in (self.restarts, self.exited, self._crashes, self._up_since):
            table.pop(instance.label, None)
        self.draining.discard(instance.label)

    # hooks

    def hook(self, instance: Instance, name: str, *args: Any) -> None:
        """Run one hook of the instance's service in the background; its errors are only logged."""
        hooks = self.hooks.get(instance.service)
        method = getattr(hooks, name, None) if hooks is not None else None
        if method is None:
            return
        task = asyncio.ensure_future(self._call(instance, name, method, args))
        self._hook_tasks.add(task)
        task.add_done_callback(self._hook_tasks.discard)

    async def _call(self, instance: Instance, name: str, method: Any, args: tuple[Any, ...]) -> None:
        try:
            async with asyncio.timeout(HOOK_TIMEOUT):
                await method(*args)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            log.error("%s: lifecycle hook %s did not return within %gs; carrying on",
                      instance.label, name, HOOK_TIMEOUT)
        except Exception:
            log.exception("%s: lifecycle hook %s raised; carrying on", instance.label, name)

    async def sleep_when_idle(self, instance: Instance) -> bool:
        """Ask ``on_idle`` whether an idle keyed instance should sleep; yes unless it says "keep"."""
        hooks = self.hooks.get(instance.service)
        method = getattr(hooks, "on_idle", None) if hooks is not None else None
        if method is None:
            return True
        try:
            async with asyncio.timeout(IDLE_HOOK_TIMEOUT):
                answer = await method(instance)
        except asyncio.CancelledError:
            raise
        except Exception:  # a broken hook must not keep instances up forever: sleep
            log.exception("%s: lifecycle hook on_idle failed; putting it to sleep", instance.label)
            return True
        if answer not in ("sleep", "keep", None):
            log.error("%s: on_idle returned %r, not 'sleep' or 'keep'; putting it to sleep",
                      instance.label, answer)
        return answer != "keep"

    # exits

    def on_exit(self, instance: Instance, role: str, code: int) -> None:
        """The runtime's report: the instance's app or sidecar ended unasked."""
        c = self.controller
        if self.closing or instance.label in self.draining or not _known(c, instance):
            return
        who = "app" if role == "app" else "sidecar"
        c.instances.changed()
        if role == "app" and code == 0:
            self.exited[instance.label] = 0
            c.instances.problems[instance.label] = "app exited with code 0"
            log.info("%s: the app exited with code 0 (done on purpose): not restarted; stopping its sidecar",
                     instance.label)
            self._track(instance, self._finish(instance))
            c.instances.save()
            return
        tail = "\n".join(f"  {line}" for line in c.runtime.tail(instance, role))
        error = f"{who} exited with {describe_exit(code)}"
        c.instances.problems[instance.label] = f"{error}; restarting"
        log.error("%s: the %s%s", instance.label, error,
                  f"; its last output:\n{tail}" if tail else "")
        self.hook(instance, "on_stop", instance, code, "crashed")
        self.hook(instance, "on_error", instance, error)
        if instance.label not in self._restarting:
            self._track(instance, self._restart(instance, role))
        c.instances.save()

    def _track(self, instance: Instance, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._restarting[instance.label] = task
        task.add_done_callback(lambda t: self._restarting.pop(instance.label, None)
                               if self._restarting.get(instance.label) is t else None)

    async def _finish(self, instance: Instance) -> None:
        c = self.controller
        try:
            await c.instances.stop(instance, "sidecar", "app")
        except Exception as exc:  # noqa: BLE001 - shutdown stops it again
            log.warning("%s: stopping its sidecar failed: %s", instance.label, exc)
        log.info("%s: sidecar stopped; the instance exited", instance.label)
        self.hook(instance, "on_stop", instance, 0, "exited")
        c.instances.changed()
        c.instances.save()

    def _delay(self, label: str) -> float:
        now = time.monotonic()
        if now - self._up_since.get(label, now) >= self.stable_after:
            self._crashes[label] = 0
        crashes = self._crashes.get(label, 0)
        self._crashes[label] = crashes + 1
        return min(self.max_backoff, self.backoff * 2 ** crashes)

    async def _restart(self, instance: Instance, role: str) -> None:
        c = self.controller
        label = instance.label
        while not self.closing:
            delay = self._delay(label)
            count = self.restarts.get(label, 0) + 1
            log.warning("%s: restarting its %s in %gs (restart %d)", label,
                        "app" if role == "app" else "whole instance", delay, count)
            await asyncio.sleep(delay)
            if self.closing or not _known(c, instance):
                return
            self.restarts[label] = count
            try:
                await c.instances.restart(instance, role)  # certificates of the moment
            except StartFailed as exc:
                c.instances.problems[label] = f"restart failed: {exc.reason}"
                tail = "\n".join(f"  {line}" for line in exc.tail)
                log.error("%s: restart %d failed: %s%s", label, count, exc.reason,
                          f"; last output:\n{tail}" if tail else "")
                self.hook(instance, "on_error", instance, f"restart failed: {exc.reason}")
                c.instances.save()
                continue
            except Exception as exc:  # noqa: BLE001 - a bug here must not stop the controller
                log.exception("%s: restart %d failed", label, count)
                self.hook(instance, "on_error", instance, f"restart failed: {exc}")
                continue
            c.instances.problems.pop(label, None)
            log.info("%s: restarted (restart %d): ready, back in rotation", label, count)
            self.started(instance)
            c.instances.changed()
            c.instances.save()
            return

    async def close(self) -> None:
        """Stop restarting (the mesh is stopping); wait for restarts in progress to give up."""
        self.closing = True
        tasks = list(self._restarting.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def shutdown_hooks(self, instances: list[Instance], timeout: float = 5.0) -> None:
        """After every instance stopped: on_stop(..., "shutdown") for those still running until then,
        then wait (bounded) for every hook in flight."""
        for instance in instances:
            if instance.label in self.exited:
                continue
            self.hook(instance, "on_stop", instance,
                      self.controller.runtime.exit_code(instance, "app"), "shutdown")
        if self._hook_tasks:
            await asyncio.wait(set(self._hook_tasks), timeout=timeout)
