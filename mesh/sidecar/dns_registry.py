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
running (Swarm lists only tasks that run and pass their health check). A
resolver that does not answer changes nothing for ``stale_after`` seconds
(said once in the log); after that the service has no instance: Docker's
embedded DNS passes a name it does not know (a service none of whose tasks
runs) on to the node's own resolvers, and where those do not answer, that
silence is the only sign the name is gone. Services not named here keep
what ``--registry`` or ``PUT /registry`` gave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial

from mesh.sidecar.registry import Registry

__all__ = ["DEFAULT_EVERY", "STALE_AFTER", "DnsName", "DnsRegistry", "parse_names", "resolve", "serving"]

log = logging.getLogger("mesh.registry")

DEFAULT_EVERY = 1.0  # seconds between two resolutions of the same name
STALE_AFTER = 3.0    # seconds a name may go unanswered before its service has no instance

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
        # On a thread of the default executor, whatever the loop: a slow answer is left behind at once
        # when the caller gives up waiting.
        found = await asyncio.get_running_loop().run_in_executor(
            None, partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
    except socket.gaierror as exc:
        if exc.errno in _NO_ADDRESS:
            return []
        raise
    # As `Registry.as_dict` writes them (an IPv6 address unbracketed: the port is after the last colon).
    return [f"{address}:{port}" for address in sorted({str(sockaddr[0]) for *_, sockaddr in found})]


class DnsRegistry:
    """Keeps ``registry``'s instances of each of ``names`` equal to what DNS says (see the module docstring)."""

    def __init__(self, registry: Registry, names: Sequence[DnsName], every: float = DEFAULT_EVERY,
                 resolver: Resolver = resolve, *, stale_after: float = STALE_AFTER,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every <= 0:
            raise ValueError(f"expected more than 0 seconds between resolutions, found {every:g}")
        self.registry = registry
        self.names = list(names)
        self.every = every
        self.resolver = resolver
        self.stale_after = stale_after
        self.clock = clock
        self._failing: dict[str, float] = {}  # service -> since when its name gets no answer

    async def refresh(self) -> bool:
        """Resolve every name once, at the same time, and update the registry; whether any changed."""
        return any(await asyncio.gather(*(self.refresh_one(name) for name in self.names)))

    async def refresh_one(self, name: DnsName) -> bool:
        """Resolve ``name`` once and update its service's instances; whether they changed."""
        try:
            answer = await self.resolver(name.host, name.port)
        except OSError as exc:
            known = self.registry.as_dict().get(name.service, [])
            now = self.clock()
            since = self._failing.setdefault(name.service, now)
            if since == now and known:  # (none known: most likely a service none of whose tasks runs yet)
                log.warning("registry: no answer for %s (%s); %s keeps its %d instances for %gs",
                            name.host, exc, name.service, len(known), self.stale_after)
            if now - since < self.stale_after:
                return False
            answer = []
        else:
            self._failing.pop(name.service, None)
        current = self.registry.as_dict()  # as it is now: another name may have changed it meanwhile
        if sorted(current.get(name.service, [])) == answer:
            return False
        self.registry.update({**current, name.service: answer})
        log.info("registry: %s=%d", name.service, len(answer))
        return True

    async def watch(self) -> None:
        """Each name resolved again every ``every`` seconds, on its own (a slow answer holds up no
        other name), until cancelled."""
        await asyncio.gather(*(self._watch_one(name) for name in self.names))

    async def _watch_one(self, name: DnsName) -> None:
        while True:
            await asyncio.sleep(self.every)
            try:
                await self.refresh_one(name)
            except Exception:  # a bug here must not end the watching: the next round tries again
                log.exception("registry: resolving %s failed", name.host)


async def serving(main: Awaitable[None], watcher: DnsRegistry | None, first: float = 2.0) -> None:
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
