"""What the tasks of a mesh print, from the engine's service logs: to the console and each instance's tail.

A line is told apart by its task (the engine's log details), whose slot names
the instance, and by its prefix (`mesh.control.swarm.task`): the supervisor's
and the sidecar's lines are the sidecar's (``web.2.sidecar | ...``), the rest
the app's (``web.2 | ...``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from mesh.control.runtimes.base import TAIL_LINES, Instance, Output, output_label
from mesh.control.swarm.task import SIDECAR_PREFIX, TASK_PREFIX

if TYPE_CHECKING:
    import docker

__all__ = ["TaskOutput"]


class TaskOutput:
    """The lines of one run's tasks; ``instance(service, slot)`` names the instance a slot stands for."""

    def __init__(self, output: Output, client: Callable[[], docker.DockerClient],
                 instance: Callable[[str, int], Instance | None]) -> None:
        self.output = output
        self.client = client
        self.instance = instance
        self.slots: dict[str, int] = {}  # task id -> slot
        self.loop: asyncio.AbstractEventLoop | None = None
        self._tails: dict[str, dict[str, collections.deque[str]]] = {}

    def from_logs(self, service: str, task: str, text: str) -> None:
        """A line of a task's output (on a log thread): to the loop, by slot and role."""
        slot = self.slots.get(task)
        if slot is None and task:
            with contextlib.suppress(Exception):
                slot = int(self.client().api.inspect_task(task).get("Slot") or 0)
                self.slots[task] = slot
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
                self.loop.call_soon_threadsafe(self.line, service, slot or 0, text)

    def line(self, service: str, slot: int, text: str) -> None:
        inst = self.instance(service, slot)
        role = "sidecar" if text.startswith((SIDECAR_PREFIX, TASK_PREFIX)) else "app"
        text = text.removeprefix(SIDECAR_PREFIX)
        label = output_label(inst, role) if inst is not None else f"{service}.{slot}" + (
            ".sidecar" if role == "sidecar" else "")
        key = inst.label if inst is not None else label
        self._tails.setdefault(key, {}).setdefault(role, collections.deque(maxlen=TAIL_LINES)).append(text)
        self.output(label, text)

    def tail(self, instance: Instance, role: str) -> list[str]:
        label = output_label(instance, role)
        return [f"{label} | {line}" for line in self._tails.get(instance.label, {}).get(role, ())]
