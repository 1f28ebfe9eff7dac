"""The controller's supervision of what it started: restarts, exits and the lifecycle hooks' calls.

Restarts (the controller's `Supervisor`, on every runtime):

- an app that exits with a non-zero code, or is killed by a signal, is
  started again after a backoff of 0.5s, 1s, 2s, ... capped at 30s; the
  backoff starts over once an app has stayed up for 60s. Its sidecar keeps
  running on the process runtime; the instance is out of rotation until
  the new app is ready. ``mesh ps --json`` shows ``restarts`` per instance.
- an app that exits with code 0 finished on purpose (a batch job): it is
  not restarted, its sidecar is stopped too, and its state is ``exited``.
- ``restart = "no"`` (the default of a job, ``job = true``) restarts nothing:
  an app that exits with another code is left exited too, with its sidecar
  stopped; ``restart = "on-failure"`` (the default of any other service)
  restarts it as above. ``mesh ps --json`` shows an exited instance's
  ``exit_code``, and `mesh up` says how each job ended ("job report exited
  with code 0", "job report failed with code 3").
- a sidecar that exits unasked takes its instance with it: the whole
  instance is stopped and started again, with the same backoff (with
  ``restart = "no"``: stopped, and left exited).

The hooks themselves (`mesh.lifecycle.Lifecycle`) are user code: each runs
as its own task, bounded by `HOOK_TIMEOUT`; one that raises or hangs is
logged and changes nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from mesh.control.runtimes.base import Instance, StartFailed
from mesh.lifecycle import load_lifecycle

if TYPE_CHECKING:
    from mesh.control.controller import Controller

__all__ = ["HOOK_TIMEOUT", "IDLE_HOOK_TIMEOUT", "Supervisor", "describe_exit"]

log = logging.getLogger("mesh.lifecycle")

HOOK_TIMEOUT = 30.0
IDLE_HOOK_TIMEOUT = 5.0  # on_idle is asked on the way to a decision: keep it short


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
        self.exited: dict[str, int] = {}        # label -> exit code, for apps done and not restarted
        self._exit_seen = asyncio.Event()       # set (and replaced) whenever an instance is exited for good
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
            extra["exit_code"] = self.exited[instance.label]
        elif instance.label in self.draining:
            extra["state"] = "draining"
        return extra

    def started(self, instance: Instance) -> None:
        self._up_since[instance.label] = time.monotonic()
        self.hook(instance, "on_start", instance)

    async def exited_for_good(self, instance: Instance) -> int:
        """The exit code of the instance's app once it exited and will not be restarted."""
        while instance.label not in self.exited:
            await self._exit_seen.wait()
        return self.exited[instance.label]

    def drain(self, instance: Instance) -> None:
        """Out of rotation from now on: it is on its way out (exits are no longer restarts)."""
        self.draining.add(instance.label)

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
        service = c.config.services.get(instance.service)
        job = service is not None and service.job
        policy = service.restart_policy if service is not None else "on-failure"
        if job and role == "app":
            ended = "exited with code 0" if code == 0 else f"failed with {describe_exit(code)}"
            again = code != 0 and policy == "on-failure"
            c.console.line("mesh", f"job {instance.label} {ended}" + ("; restarting it" if again else ""))
        if (role == "app" and code == 0) or policy == "no":
            self._exited(instance, role, code, job)
            return
        tail = "\n".join(f"  {line}" for line in c.instances.tail(instance, role))
        error = f"{who} exited with {describe_exit(code)}"
        c.instances.problems[instance.label] = f"{error}; restarting"
        log.error("%s: the %s%s", instance.label, error,
                  f"; its last output:\n{tail}" if tail else "")
        self.hook(instance, "on_stop", instance, code, "crashed")
        self.hook(instance, "on_error", instance, error)
        if instance.label not in self._restarting:
            self._track(instance, self._restart(instance, role))
        c.instances.save()

    def _exited(self, instance: Instance, role: str, code: int, job: bool) -> None:
        """Not restarted: its state is ``exited``, and its sidecar (or what is left of it) stops."""
        c = self.controller
        self.exited[instance.label] = code
        event, self._exit_seen = self._exit_seen, asyncio.Event()
        event.set()
        how = describe_exit(code)
        problems = c.instances.problems
        if role != "app":
            problems[instance.label] = f"sidecar exited with {how}; not restarted (restart = \"no\")"
            log.warning("%s: its sidecar exited with %s: not restarted; stopping its app", instance.label, how)
        elif code == 0:
            if job:
                problems.pop(instance.label, None)  # what a job is for
            else:
                problems[instance.label] = "app exited with code 0"
            log.info("%s: the app exited with code 0 (done on purpose): not restarted; stopping its sidecar",
                     instance.label)
        else:
            problems[instance.label] = f"job failed with {how}" if job else \
                f'app exited with {how}; not restarted (restart = "no")'
            log.warning("%s: the app exited with %s: not restarted (restart = \"no\"); stopping its sidecar",
                        instance.label, how)
        self._track(instance, self._finish(instance, role))
        c.instances.save()

    def _track(self, instance: Instance, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._restarting[instance.label] = task
        task.add_done_callback(lambda t: self._restarting.pop(instance.label, None)
                               if self._restarting.get(instance.label) is t else None)

    async def _finish(self, instance: Instance, role: str) -> None:
        c = self.controller
        try:
            await c.instances.stop(instance, "sidecar", "app")
        except Exception as exc:  # noqa: BLE001 - shutdown stops it again
            log.warning("%s: stopping its sidecar failed: %s", instance.label, exc)
        if role != "app":  # the app was stopped after its sidecar ended: how it ended, if the runtime knows
            code = c.instances.exit_code(instance, "app")
            if code is not None:
                self.exited[instance.label] = code
        log.info("%s: sidecar stopped; the instance exited", instance.label)
        self.hook(instance, "on_stop", instance, self.exited.get(instance.label, 0), "exited")
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
            c.telemetry.restarted(instance.service, role)
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
                      self.controller.instances.exit_code(instance, "app"), "shutdown")
        if self._hook_tasks:
            await asyncio.wait(set(self._hook_tasks), timeout=timeout)
