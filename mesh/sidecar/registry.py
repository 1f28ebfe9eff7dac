"""Which instances each service has, as their sidecars' mesh addresses."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

__all__ = ["Registry"]


class Registry:
    """Service name → instance addresses (``host:port`` of each instance's mesh listener).

    The controller keeps it: it writes it to a file that sidecars read at
    start, and pushes every change to each sidecar's admin listener
    (``PUT /registry``), so instances come and go without restarts. The
    format, in the file and in the push::

        {"services": {"orders": ["127.0.0.1:41001", {"address": "127.0.0.1:41005"}]}}

    An entry is an address or a table with an ``address`` (other keys are
    ignored, for later use). ``version`` grows with every update, so a
    `mesh.sidecar.balancer.Balancer` built on a registry notices changes without a callback.
    """

    def __init__(self, services: dict[str, list[Any]] | None = None) -> None:
        self._services: dict[str, list[tuple[str, int]]] = {}
        self._cursors: dict[str, itertools.count[int]] = {}
        self.version = 0
        self.update(services or {})

    def update(self, services: dict[str, list[Any]]) -> None:
        """Replace every service's instances; raise ValueError (or TypeError) on a bad entry, changing nothing."""
        if not isinstance(services, dict):
            raise TypeError(f"expected a table of services, found {type(services).__name__}")
        parsed = {}
        for name, entries in services.items():
            if not isinstance(entries, list):
                raise TypeError(f"{name}: expected a list of addresses, found {type(entries).__name__}")
            parsed[str(name)] = [_split(_address(e)) for e in entries]
        self._services = parsed
        self._cursors = {name: itertools.count() for name in parsed}
        self.version += 1

    def __contains__(self, service: str) -> bool:
        return service in self._services

    def services(self) -> list[str]:
        return list(self._services)

    def instances(self, service: str) -> list[tuple[str, int]]:
        return self._services.get(service, [])

    def pick(self, service: str) -> tuple[str, int] | None:
        """The next instance of ``service`` in round-robin order, or None if it has none.

        The sidecar balances with `mesh.sidecar.balancer.Balancer`; this stays for simple callers.
        """
        instances = self._services.get(service)
        if not instances:
            return None
        return instances[next(self._cursors[service]) % len(instances)]

    def as_dict(self) -> dict[str, list[str]]:
        return {name: [f"{h}:{p}" for h, p in insts] for name, insts in self._services.items()}

    @classmethod
    def read(cls, path: str | Path) -> Registry:
        data: dict[str, Any] = json.loads(Path(path).read_text())
        return cls(data.get("services", {}))


def _address(entry: Any) -> str:
    if isinstance(entry, dict):
        entry = entry.get("address")
    if not isinstance(entry, str):
        raise TypeError(f"expected 'host:port' or {{\"address\": \"host:port\"}}, found {entry!r}")
    return entry


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    number = int(port)
    if not host or not 0 < number < 65536:
        raise ValueError(f"expected 'host:port', found {address!r}")
    return host.strip("[]"), number
