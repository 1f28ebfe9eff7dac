"""Which instances each service has, as their sidecars' mesh addresses."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

__all__ = ["Registry"]


class Registry:
    """Service name → instance addresses (``host:port`` of each instance's mesh listener).

    The controller writes it; sidecars read it at start and take updates
    through their admin listener without restarting.
    """

    def __init__(self, services: dict[str, list[str]] | None = None) -> None:
        self._services: dict[str, list[tuple[str, int]]] = {}
        self._cursors: dict[str, itertools.count[int]] = {}
        self.update(services or {})

    def update(self, services: dict[str, list[str]]) -> None:
        parsed = {}
        for name, addresses in services.items():
            parsed[name] = [_split(a) for a in addresses]
        self._services = parsed
        self._cursors = {name: itertools.count() for name in parsed}

    def __contains__(self, service: str) -> bool:
        return service in self._services

    def instances(self, service: str) -> list[tuple[str, int]]:
        return self._services.get(service, [])

    def pick(self, service: str) -> tuple[str, int] | None:
        """The next instance of ``service`` in round-robin order, or None if it has none."""
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


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
