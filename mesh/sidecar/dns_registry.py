"""Instances from DNS: a sidecar that keeps its registry current by resolving each service's name again and again.

Where an engine names every running task of a service in DNS (Docker Swarm's
``tasks.<service>`` on a mesh's overlay network, for services with
``endpoint_mode = dnsrr``), no controller has to push registries: the sidecar
asks the resolver itself, about once a second, and puts what it finds into its
`mesh.sidecar.registry.Registry`, so calls by name, the balancer's choices,
retries and ejection work as with a pushed registry::

    mesh sidecar ... --registry-dns api=tasks.shop_api:15001 --registry-dns web=tasks.shop_web:15001

Each answer replaces that service's instances (the registry's ``version``
grows only when the set changed, so the balancer keeps its statistics of the
instances that stay). A name that does not exist means no instance is
running (Swarm lists only tasks that run and pass their health check); a
resolver that does not answer changes nothing, and is said once in the log.
Services not named here keep what ``--registry`` or ``PUT /registry`` gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass

from mesh.sidecar.registry import Registry

__all__ = ["DEFAULT_EVERY", "DnsName", "DnsRegistry", "parse_names", "resolve", "serving"]

log = logging.getLogger("mesh.registry")

DEFAULT_EVERY = 1.0  # seconds between two resolutions of the same name

# What the resolver says when a name has no address: no instance runs (not a failure).
_NO_ADDRESS = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}

Resolver = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True)
class DnsName:
    """A service whose instances are the addresses of ``host``, each reached on ``port``."""

    service: str
    host: str
    port: int


def parse_names(values: Sequence[str], services: Collection[str]) -> list[DnsName]:
    """``SERVICE=HOST:PORT`` texts (``--registry-dns``) as `DnsName`; raise ValueError saying what is wrong."""
    names: dict[str, DnsName] = {}
    for value in values:
        service, equals, address = value.partition("=")
        host, colon, port = address.rpartition(":")
        if not equals or not colon or not service or not host or not port.isdigit():
            raise ValueError(f"expected SERVICE=HOST:PORT, found {value!r}")
        if service not in services:
            raise ValueError(f"{value!r}: unknown service {service!r} (known: {', '.join(services)})")
        if service in names:
            raise ValueError(f"{value!r}: service {service!r} is named twice")
        number = int(port)
        if not 0 < number < 65536:
            raise ValueError(f"{value!r}: expected a port from 1 to 65535, found {number}")
        names[service] = DnsName(service, host.strip("[]"), number)
    return list(names.values())


async def resolve(host: str, port: int) -> list[str]:
    """The ``host:port`` of each address ``host`` has, sorted; empty when it has none.

    Raises `OSError` when the resolver gives no answer (its server is down, a timeout).
    """
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        if exc.errno in _NO_ADDRESS:
            return []
        raise
    # As `Registry.as_dict` writes them (an IPv6 address unbracketed: the port is after the last colon).
    return [f"{address}:{port}" for address in sorted({str(sockaddr[0]) for *_, sockaddr in found})]


class DnsRegistry:
    """Keeps ``registry``'s instances of each of ``names`` equal to what DNS says (see the module docstring)."""

    def __init__(self, registry: Registry, names: Sequence[DnsName], every: float = DEFAULT_EVERY,
                 resolver: Resolver = resolve) -> None:
        if every <= 0:
            raise ValueError(f"expected more than 0 seconds between resolutions, found {every:g}")
        self.registry = registry
        self.names = list(names)
        self.every = every
        self.resolver = resolver
        self._failing: set[str] = set()  # services whose name did not resolve last time

    async def refresh(self) -> bool:
        """Resolve every name once and update the registry; whether any service's instances changed."""
        answers = await asyncio.gather(*(self.resolver(n.host, n.port) for n in self.names),
                                       return_exceptions=True)
        current = self.registry.as_dict()
        found: dict[str, list[str]] = {}
        for name, answer in zip(self.names, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, OSError):
                    raise answer
                if name.service not in self._failing:
                    log.warning("registry: cannot resolve %s for %s (%s); keeping its %d instances",
                                name.host, name.service, answer, len(current.get(name.service, [])))
                    self._failing.add(name.service)
                continue
            if name.service in self._failing:
                log.info("registry: %s resolves again", name.host)
                self._failing.discard(name.service)
            if sorted(current.get(name.service, [])) != answer:
                found[name.service] = answer
        if not found:
            return False
        self.registry.update({**current, **found})
        log.info("registry: %s", " ".join(f"{service}={len(addresses)}" for service, addresses in found.items()))
        return True

    async def watch(self) -> None:
        """`refresh` every ``every`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.refresh()
            except Exception:  # a bug here must not end the watching: the next round tries again
                log.exception("registry: resolving the services' names failed")


async def serving(main: Awaitable[None], watcher: DnsRegistry | None, first: float = 5.0) -> None:
    """Await ``main`` (a sidecar serving) while ``watcher`` keeps its registry current.

    The names are resolved once before ``main`` starts (for at most ``first`` seconds),
    so the sidecar's first calls already find the instances running then.
    """
    if watcher is None:
        await main
        return
    with contextlib.suppress(TimeoutError, OSError):
        await asyncio.wait_for(watcher.refresh(), first)
    watching = asyncio.ensure_future(watcher.watch())
    try:
        await main
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
