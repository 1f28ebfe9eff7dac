"""Lifecycle hooks: the user's code the controller and the sidecars call (public API).

What calls them: the controller's `mesh.control.supervisor.Supervisor` (on_start, on_stop, on_error),
keyed services (on_idle) and every sidecar's balancer (choose_instance).

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

``instance`` is the runtime's `mesh.control.runtimes.base.Instance` (``service``,
``index``, ``label``, ``ports``, ``key`` for a keyed instance, ``pids`` on
the process runtime, ``containers`` on docker).
A hook runs as its own task, bounded by `mesh.control.supervisor.HOOK_TIMEOUT`; one that raises or
hangs is logged and changes nothing else: the mesh keeps running.

Two more hooks decide rather than observe:

- ``on_idle(instance)``: asked by the controller (`mesh.control.keyed`) when a keyed
  instance has been idle for ``sleep_after``; returning ``"sleep"`` (the
  default) stops it, ``"keep"`` keeps it (it is asked again after another
  ``sleep_after``). A hook that raises, answers anything else or takes over
  `mesh.control.supervisor.IDLE_HOOK_TIMEOUT` (5 s) puts the instance to sleep.
- ``choose_instance(request, instances)``: custom scheduling. Every sidecar
  loads the hooks of each service that overrides it (`mesh.sidecar.sidecar`) and
  asks it before its balancer picks an instance for a call to that service
  (`mesh.sidecar.balancer`): ``instances`` are the ones in rotation (less those a
  retry already tried, when others remain), each with ``address``,
  ``host``, ``port`` and ``outstanding`` (requests in flight from this
  sidecar). Returning None (the default), an instance not
  offered, or raising leaves the choice to the balancer. It runs on every
  request: keep it quick and synchronous.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.errors import PluginError

if TYPE_CHECKING:
    from mesh.control.runtimes.base import Instance

__all__ = ["HOOKS", "Lifecycle", "check_lifecycle", "load_lifecycle"]

HOOKS = ("on_start", "on_stop", "on_error", "on_idle", "choose_instance")


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
    from mesh.loader import load_object

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
