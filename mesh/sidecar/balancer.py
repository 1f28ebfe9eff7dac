"""Load balancing and passive outlier detection across a service's instances.

The outbound terminal of a sidecar asks `Balancer.pick` for an instance of
the target service, counts the request on it while it is in flight, and
reports how it went (`Balancer.succeeded` / `Balancer.failed`)::

    backend = balancer.pick("orders", avoid=tried)   # None: no instance in rotation
    backend.outstanding += 1
    ... send to backend.endpoint ...
    backend.outstanding -= 1
    balancer.succeeded(backend)    # or balancer.failed(backend)

Policies (``[mesh.defaults] lb``):

- ``p2c`` (default): power of two choices. Two distinct instances at
  random; the one with fewer requests in flight from this sidecar wins. A
  slow instance piles up requests in flight, so it gets fewer new ones,
  without any shared state between sidecars.
- ``round-robin``: each instance in turn.

Outlier detection (``[mesh.defaults] outlier``): an instance whose last
``consecutive_failures`` requests failed (no connection, reset, timed out,
or 502/503/504 from its sidecar) is ejected: left out of `pick` for
``base_ejection`` times the number of times it was ejected, at most
``max_ejection``. It comes back on probation: one more failure ejects it
again, for longer. Its ejection count is forgotten once it stays in
rotation for ``max_ejection``. Never more than ``max_ejection_percent`` of
a service's instances are out at once (but one may always go when a
service has two or more), and the only instance of a service is never
ejected: with nowhere else to go, a try at it beats a certain 503.

Instances come from a `mesh.sidecar.registry.Registry`; the balancer notices its
``version`` change and keeps the statistics of instances that stay. A
request in flight counts from `pick` until its response head arrives.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from mesh.config import Outlier
from mesh.sidecar.registry import Registry

__all__ = ["Backend", "Balancer"]

log = logging.getLogger("mesh.balancer")

POLICIES = ("p2c", "round-robin")


class Backend:
    """One instance of a service as one sidecar sees it: where it is, its load, its health."""

    __slots__ = ("service", "address", "host", "port", "endpoint", "outstanding", "failures",
                 "ejected_until", "ejections", "returned_at", "requests", "errors")

    def __init__(self, service: str, host: str, port: int, endpoint: Any) -> None:
        self.service = service
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.endpoint = endpoint  # what the connection pool is keyed by (address and identity)
        self.outstanding = 0  # requests in flight from this sidecar
        self.failures = 0  # consecutive
        self.ejected_until = 0.0  # monotonic time; 0: in rotation
        self.ejections = 0  # times ejected, for the growing interval
        self.returned_at = 0.0
        self.requests = 0
        self.errors = 0

    def __repr__(self) -> str:
        return f"<Backend {self.service} {self.address} outstanding={self.outstanding}>"


class _Service:
    __slots__ = ("name", "backends", "active", "ejected", "next_return", "cursor")

    def __init__(self, name: str) -> None:
        self.name = name
        self.backends: list[Backend] = []
        self.active: list[Backend] = []  # in rotation
        self.ejected = 0
        self.next_return = 0.0
        self.cursor = 0

    def refresh(self) -> None:
        self.active = [b for b in self.backends if not b.ejected_until]
        self.ejected = len(self.backends) - len(self.active)
        self.next_return = min((b.ejected_until for b in self.backends if b.ejected_until), default=0.0)


class Balancer:
    """Picks instances of services from a `Registry` and ejects the failing ones."""

    def __init__(self, registry: Registry, policy: str = "p2c", outlier: Outlier | None = None, *,
                 endpoint: Callable[[str, str, int], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 choosers: dict[str, Callable[[Any, list[Backend]], Any]] | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"lb: expected one of {', '.join(POLICIES)}, found {policy!r}")
        self.registry = registry
        self.policy = policy
        self.outlier = outlier or Outlier()
        self._endpoint = endpoint or (lambda service, host, port: (host, port))
        self._clock = clock
        self._random = (rng or random.Random()).random
        self._services: dict[str, _Service] = {}
        self._version = -1
        self._p2c = policy == "p2c"
        # service -> a lifecycle hook's choose_instance(request, instances), asked first
        self.choosers = choosers or {}

    # instances

    def _sync(self) -> None:
        """Take the registry's instances, keeping what we know of those that stay."""
        self._version = self.registry.version
        services = {}
        for name in self.registry.services():
            old = self._services.get(name)
            known = {b.address: b for b in old.backends} if old else {}
            svc = _Service(name)
            for host, port in self.registry.instances(name):
                address = f"{host}:{port}"
                backend = known.get(address)
                if backend is None or any(b is backend for b in svc.backends):
                    backend = Backend(name, host, port, self._endpoint(name, host, port))
                svc.backends.append(backend)
            if old is not None:
                svc.cursor = old.cursor
            svc.refresh()
            services[name] = svc
        self._services = services

    def backends(self, service: str) -> list[Backend]:
        if self._version != self.registry.version:
            self._sync()
        svc = self._services.get(service)
        return list(svc.backends) if svc else []

    # picking

    def pick(self, service: str, avoid: Iterable[Backend] | None = None,
             request: Any = None) -> Backend | None:
        """An instance of ``service`` in rotation, or None if it has none.

        ``avoid`` (the instances a request already tried) is left out when
        any other instance is in rotation. A service whose lifecycle hooks
        define ``choose_instance(request, instances)`` chooses first; None,
        an instance not offered, or an error leaves the choice to the policy.
        """
        if self._version != self.registry.version:
            self._sync()
        svc = self._services.get(service)
        if svc is None:
            return None
        if svc.ejected and self._clock() >= svc.next_return:
            self._return(svc)
        active = svc.active
        if avoid:
            others = [b for b in active if b not in avoid]
            if others:
                active = others
        count = len(active)
        chooser = self.choosers.get(service)
        if chooser is not None and count:
            try:
                chosen = chooser(request, list(active))
            except Exception:
                log.exception("%s: lifecycle hook choose_instance raised; the balancer chooses", service)
                chosen = None
            if chosen is not None and chosen in active:
                return chosen
        if count < 2:
            return active[0] if count else None
        if self._p2c:
            rand = self._random
            i = int(rand() * count)
            j = int(rand() * (count - 1))
            if j >= i:
                j += 1
            a, b = active[i], active[j]
            return a if a.outstanding <= b.outstanding else b
        svc.cursor += 1
        return active[svc.cursor % count]

    # outcomes

    def succeeded(self, backend: Backend) -> None:
        backend.requests += 1
        backend.failures = 0

    def failed(self, backend: Backend) -> None:
        backend.requests += 1
        backend.errors += 1
        backend.failures += 1
        threshold = self.outlier.consecutive_failures
        if threshold and backend.failures >= threshold and not backend.ejected_until:
            self._eject(backend)

    def _eject(self, backend: Backend) -> None:
        if self._version != self.registry.version:
            self._sync()
        svc = self._services.get(backend.service)
        if svc is None or not any(b is backend for b in svc.backends):
            return  # it left the registry while its request was in flight
        total = len(svc.backends)
        allowed = max(1, total * self.outlier.max_ejection_percent // 100) if total > 1 else 0
        if svc.ejected >= allowed:
            return
        now = self._clock()
        if backend.ejections and now - backend.returned_at >= self.outlier.max_ejection:
            backend.ejections = 0  # it stayed healthy long enough: start over
        backend.ejections += 1
        seconds = min(self.outlier.base_ejection * backend.ejections, self.outlier.max_ejection)
        backend.ejected_until = now + seconds
        svc.refresh()
        log.warning("ejected %s instance %s for %gs after %d consecutive failures (ejection %d)",
                    backend.service, backend.address, seconds, backend.failures, backend.ejections)

    def _return(self, svc: _Service) -> None:
        now = self._clock()
        threshold = self.outlier.consecutive_failures
        for backend in svc.backends:
            if backend.ejected_until and now >= backend.ejected_until:
                backend.ejected_until = 0.0
                backend.returned_at = now
                # On probation: the next failure ejects it again.
                backend.failures = max(threshold - 1, 0)
                log.info("%s instance %s is back in rotation", backend.service, backend.address)
        svc.refresh()

    # admin

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Every instance with its load and health, for the admin listener."""
        if self._version != self.registry.version:
            self._sync()
        now = self._clock()
        for svc in self._services.values():
            if svc.ejected and now >= svc.next_return:
                self._return(svc)
        return {name: [{
            "address": b.address,
            "outstanding": b.outstanding,
            "requests": b.requests,
            "errors": b.errors,
            "consecutive_failures": b.failures,
            "ejected": bool(b.ejected_until),
            "ejected_for": round(max(b.ejected_until - now, 0.0), 3) if b.ejected_until else 0,
            "ejections": b.ejections,
        } for b in svc.backends] for name, svc in self._services.items()}
