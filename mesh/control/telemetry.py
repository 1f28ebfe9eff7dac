"""The controller's own metrics: what it did to the instances, on its ``/metrics``.

The controller serves them (`mesh.control.dashboard`) in the Prometheus text
format, without credentials, like a sidecar's ``/metrics`` (counts only).
Every series carries ``mesh``::

    mesh_controller_instances{service, state}                  gauge: instances by state, counted when scraped
    mesh_controller_cold_start_seconds{service, kind}          histogram: a keyed instance's start until ready,
                                                               kind "cold" (its key's first) or "wake" (after sleeping)
    mesh_controller_start_failures_total{service}              keyed instances that did not start
    mesh_controller_sleeps_total{service}                      keyed instances put to sleep when idle
    mesh_controller_restarts_total{service, role}              apps (role "app") or whole instances ("sidecar")
                                                               started again after they exited unasked
    mesh_controller_autoscale_decisions_total{service, direction}   "up" (an instance added) or "down" (removed)
    mesh_controller_autoscale_cpu{service}                     gauge: the pool's average CPU (cores per instance)
                                                               over the autoscaler's window, at its last sample
    mesh_controller_autoscale_decision_cpu{service, direction} gauge: that average when it last decided so

``state`` is what `mesh ps` shows: ``starting``, ``running``, ``sleeping``,
``draining``, ``exited`` or ``stopped`` (each service has every state, 0 or
more). The keyed services, the supervisor and the autoscaler report with one
call each (`started`, `start_failed`, `slept`, `restarted`, `pool_cpu`, `scaled`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from mesh.observe.metrics import Metrics

__all__ = ["INSTANCE_STATES", "START_BUCKETS", "ControllerMetrics"]

INSTANCE_STATES = ("starting", "running", "sleeping", "draining", "exited", "stopped")
# Seconds: a process that is ready at once to a container image that takes its time.
START_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)

Rows = Callable[[], Iterable[dict[str, Any]]]


class _Instances:
    """``mesh_controller_instances``, counted from the controller's instance rows when scraped."""

    name = "mesh_controller_instances"

    def __init__(self, mesh: str, services: Sequence[str], rows: Rows) -> None:
        self.mesh = mesh
        self.services = tuple(services)
        self.rows = rows

    def counts(self) -> dict[tuple[str, str], int]:
        counts = {(service, state): 0 for service in self.services for state in INSTANCE_STATES}
        for row in self.rows():
            if row.get("instance") == "front":  # a keyed service's front is no instance
                continue
            key = (str(row.get("service")), str(row.get("state")))
            counts[key] = counts.get(key, 0) + 1
        return counts

    def families(self) -> Iterable[Any]:
        family = GaugeMetricFamily(self.name, "Instances of each service, by state",
                                   labels=["mesh", "service", "state"])
        for (service, state), count in self.counts().items():
            family.add_metric([self.mesh, service, state], count)
        yield family


class ControllerMetrics:
    """The controller's metrics (see the module docstring).

    ``rows`` gives the instance rows of state.json (``service``, ``instance``,
    ``state``); they are read when ``/metrics`` is scraped.
    """

    def __init__(self, mesh: str, services: Sequence[str], rows: Rows) -> None:
        self.metrics = m = Metrics(mesh=mesh)
        self.instances = _Instances(mesh, services, rows)
        m.register(self.instances)
        self.starts = m.histogram("controller_cold_start_seconds",
                                  "A keyed instance's start until ready: its key's first (cold) or after "
                                  "sleeping (wake)", ["service", "kind"], buckets=START_BUCKETS)
        self.start_failures = m.counter("controller_start_failures", "Keyed instances that did not start",
                                        ["service"])
        self.sleeps = m.counter("controller_sleeps", "Keyed instances put to sleep when idle", ["service"])
        self.restarts = m.counter("controller_restarts",
                                  "Apps (role app) or whole instances (role sidecar) started again after they "
                                  "exited unasked", ["service", "role"])
        self.decisions = m.counter("controller_autoscale_decisions",
                                   "Autoscaling decisions: an instance added (up) or removed (down)",
                                   ["service", "direction"])
        self.cpu = m.gauge("controller_autoscale_cpu",
                           "A pool's average CPU in cores per instance over the autoscaler's window, "
                           "at its last sample", ["service"])
        self.decision_cpu = m.gauge("controller_autoscale_decision_cpu",
                                    "A pool's average CPU in cores per instance when the autoscaler last "
                                    "decided to scale it this way", ["service", "direction"])

    # what the controller's helpers report

    def started(self, service: str, kind: str, seconds: float) -> None:
        """A keyed instance is ready after ``seconds``: ``kind`` "cold" (its key's first start) or "wake"."""
        self.starts.observe(seconds, service=service, kind=kind)

    def start_failed(self, service: str) -> None:
        self.start_failures.inc(service=service)

    def slept(self, service: str) -> None:
        self.sleeps.inc(service=service)

    def restarted(self, service: str, role: str) -> None:
        """An instance's app (``role`` "app") or all of it ("sidecar") was started again."""
        self.restarts.inc(service=service, role=role)

    def pool_cpu(self, service: str, average: float) -> None:
        self.cpu.set(round(average, 4), service=service)

    def scaled(self, service: str, direction: str, average: float) -> None:
        """The autoscaler decided to add (``direction`` "up") or remove ("down") an instance at ``average`` CPU."""
        self.decisions.inc(service=service, direction=direction)
        self.decision_cpu.set(round(average, 4), service=service, direction=direction)

    # what the dashboard shows

    def exposition(self) -> bytes:
        return self.metrics.exposition()

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per service: cold starts, wakes (count and mean seconds), failed starts, sleeps, restarts,
        scale ups and downs, and the pool's CPU figure, for the services that have any."""
        found: dict[str, dict[str, Any]] = {}

        def entry(service: str) -> dict[str, Any]:
            return found.setdefault(service, {"cold_starts": 0, "cold_start_s": None, "wakes": 0, "wake_s": None,
                                              "start_failures": 0, "sleeps": 0, "restarts": 0,
                                              "scale_ups": 0, "scale_downs": 0, "cpu": None})

        for (service, kind), row in list(self.starts.rows.items()):
            count = sum(row[:-1])
            name = "cold_start" if kind == "cold" else "wake"
            entry(service)[f"{name}s"] = int(count)
            entry(service)[f"{name}_s"] = round(row[-1] / count, 3) if count else None
        for (service,), value in list(self.start_failures.values.items()):
            entry(service)["start_failures"] = int(value)
        for (service,), value in list(self.sleeps.values.items()):
            entry(service)["sleeps"] = int(value)
        for (service, _role), value in list(self.restarts.values.items()):
            entry(service)["restarts"] += int(value)
        for (service, direction), value in list(self.decisions.values.items()):
            entry(service)["scale_ups" if direction == "up" else "scale_downs"] += int(value)
        for (service,), value in list(self.cpu.values.items()):
            entry(service)["cpu"] = value
        return found
