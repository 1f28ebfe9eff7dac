"""Egress: an app's calls to hosts outside the mesh, through its sidecar's outbound listener.

::

    app ─▶ outbound listener ─┬ Host names a service ▶ outbound chain ▶ route check ▶ peer's sidecar
                              ├ any other Host ──────▶ outbound chain ▶ egress check ▶ host:port (HTTP)
                              └ CONNECT host:port ───────────────────▶ egress check ▶ host:port (tunnel)

`EgressPolicy` decides from the mesh's ``[[egress]]`` entries (`mesh.config.Egress`).
A call is allowed when an entry of the calling service names its host
(exactly, or ``*.example.com`` for that domain's subdomains, never
``example.com`` itself), its port (without ``ports``: 80 for plain HTTP, 443
for CONNECT) and, where the entry narrows them, the method and path
(matched as ``[[routes]]`` match them, `mesh.sidecar.routes.Rule`). CONNECT is
opaque: an entry with ``paths`` never allows it, one with ``methods`` only
when they list ``CONNECT``. Everything else is denied: 403, with a reason
naming the host. With ``mode = "audit"`` (the mesh's, or an entry's that
names the host) a denial is logged as a warning and the call goes through.

Hosts are names, compared as `mesh.config.normalize_host` writes them
(lowercase, no trailing dot, punycode as given, IP addresses in one form);
``127.0.0.1`` and ``localhost`` are hosts like any other, denied unless an
entry names them. A Host or CONNECT target with user information, an
empty or malformed host or a bad port is refused with 400.

`EgressProxy` carries the calls it allows. Plain HTTP runs through the
service's outbound chain (its ``outbound`` plugins, deadline, breaker,
retry) and, at its end, goes to the host in origin form with the app's
Host kept, on a connection pool of its own. A CONNECT is answered by the
listener itself, without plugins: 200 once a TCP connection to the host is
open, then bytes both ways (`mesh.http.websocket.Tunnel`). The sidecar
resolves the host when it connects and connects to the addresses it
checked, in turn while one refuses: a host that only a wildcard entry
(or only audit mode) lets through must not resolve to a loopback,
unspecified, link-local or multicast address, so the sidecar's own
listeners and the machine's loopback services are reached only through an
entry naming the host exactly. Metrics count egress calls under the route
``<service>->egress``; the host is in the access log's ``upstream`` field
only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mesh.chain import short_error
from mesh.config import MeshConfig, RouteConfig
from mesh.config.model import Egress, normalize_host
from mesh.errors import UpstreamError
from mesh.http.client import ConnectFailed, Endpoint, Limits, Pool
from mesh.http.websocket import Tunnel, open_tunnel
from mesh.keys import BACKEND, DEADLINE, TRY_TIMEOUT, StateKey
from mesh.messages import Request, Response
from mesh.sidecar.balancer import Backend
from mesh.sidecar.observing import ROUTE, UPSTREAM_STARTED, route_label
from mesh.sidecar.routes import Rule

__all__ = ["EGRESS", "BadTarget", "EgressDecision", "EgressPolicy", "EgressProxy", "parse_authority",
           "resolve"]

log = logging.getLogger("mesh.egress")

# request.state: the call goes to the host its Host header names, outside the mesh (set by the outbound
# listener; the end of the outbound chain sends it there if `EgressPolicy` allows).
EGRESS: StateKey[bool] = StateKey("mesh.egress")

_DEFAULT_PORTS = {"CONNECT": frozenset({443})}
_HTTP_PORTS = frozenset({80})
_EXACT, _WILDCARD = 2, 1

Resolver = Callable[[str, int], Awaitable[list[str]]]


class BadTarget(ValueError):
    """A Host or CONNECT target that names no host and port an egress call could go to (400)."""


def parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` as (the host as `normalize_host` writes it, the port); ``default_port``
    where none is given (None: a port is required). Raises `BadTarget`."""
    if "@" in authority:
        raise BadTarget("a host with user information is refused")
    if authority.startswith("["):
        end = authority.find("]")
        host, rest = authority[:end + 1], authority[end + 1:]
        if end < 0 or (rest and not rest.startswith(":")):
            raise BadTarget("malformed host: expected host:port")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = authority.partition(":")
    if not port_text:
        if default_port is None:
            raise BadTarget("no port: expected host:port")
        port = default_port
    elif port_text.isdigit() and port_text.isascii() and len(port_text) <= 5 and 1 <= int(port_text) <= 65535:
        port = int(port_text)
    else:
        raise BadTarget("malformed port: expected a number from 1 to 65535")
    name = normalize_host(host)
    if name is None:
        raise BadTarget("malformed host: expected a host name or an IP address")
    return name, port


@dataclass(frozen=True)
class EgressDecision:
    """Whether a call may go; ``audited``: only because of audit mode (``reason`` says what it
    broke); ``exact``: an entry of the caller names the host itself (not by a wildcard)."""

    allowed: bool
    audited: bool = False
    reason: str = ""
    exact: bool = False


class _Entry:
    """One ``[[egress]]`` entry, ready to match."""

    __slots__ = ("exact", "suffixes", "ports", "rule", "connect", "audit")

    def __init__(self, entry: Egress) -> None:
        self.exact = frozenset(host for host in entry.hosts if not host.startswith("*."))
        self.suffixes = tuple(host[1:] for host in entry.hosts if host.startswith("*."))  # ".example.com"
        self.ports = frozenset(entry.ports) or None
        self.rule = Rule(RouteConfig(entry.source, "egress", paths=entry.paths, methods=entry.methods))
        self.connect = not entry.paths and (not entry.methods or "CONNECT" in entry.methods)
        self.audit = entry.mode == "audit"

    def names(self, host: str) -> int:
        if host in self.exact:
            return _EXACT
        if not host.startswith("[") and host.endswith(self.suffixes):
            return _WILDCARD
        return 0

    def allows(self, port: int, method: str, path: str) -> bool:
        if port not in (self.ports or _DEFAULT_PORTS.get(method, _HTTP_PORTS)):
            return False
        if method == "CONNECT":
            return self.connect
        return self.rule.matches(method, path)


class EgressPolicy:
    """The ``[[egress]]`` entries of a mesh, by calling service."""

    def __init__(self, entries: list[Egress], mode: str = "enforce", services: frozenset[str] = frozenset()) -> None:
        self.mode = mode
        self.services = services
        self._entries: dict[str, list[_Entry]] = {}
        for entry in entries:
            self._entries.setdefault(entry.source, []).append(_Entry(entry))

    def check(self, service: str, host: str, port: int, method: str, path: str) -> EgressDecision:
        """May ``service`` call ``host`` (normalized) on ``port`` with ``method`` (``CONNECT``: a
        tunnel) and ``path`` (ignored for CONNECT)?"""
        if host in self.services:
            return EgressDecision(False, reason=f"'{host}' is a service of this mesh: call it as "
                                                f"http://{host}/, not through egress")
        allowed = 0
        audit = self.mode == "audit"
        exact = False
        for entry in self._entries.get(service, ()):
            named = entry.names(host)
            if not named:
                continue
            exact = exact or named == _EXACT
            audit = audit or entry.audit
            if named > allowed and entry.allows(port, method, path):
                allowed = named
        if allowed:
            return EgressDecision(True, exact=exact)
        call = "CONNECT" if method == "CONNECT" else f"{method} {path}"
        reason = f"no [[egress]] entry allows '{service}' to call {host}:{port} ({call})"
        if audit:
            log.warning("audit: would deny: %s", reason)
            return EgressDecision(True, audited=True, reason=reason, exact=exact)
        log.warning("denied: %s", reason)
        return EgressDecision(False, reason=reason)


async def resolve(host: str, port: int) -> list[str]:
    """The addresses of ``host`` (as `normalize_host` writes it), in the order to try them."""
    if host.startswith("["):
        return [host[1:-1]]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _local(address: str) -> bool:
    """Whether ``address`` is this machine's or no one's: loopback, unspecified, link-local, multicast."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True  # nothing we can tell apart: fail closed
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast


class EgressProxy:
    """One sidecar's calls to hosts outside the mesh: the policy, the pool, the CONNECT tunnels."""

    def __init__(self, config: MeshConfig, service: str, limits: Limits | None = None, *,
                 denials: Any = None, resolver: Resolver = resolve) -> None:
        self.service = service
        self.policy = EgressPolicy(config.egress, config.mode, frozenset(config.services))
        self.pool = Pool(limits)
        self.limits = self.pool.limits
        self.idle = config.services[service].stream_idle_timeout
        self.route = route_label(service, "egress")
        self.denials = denials  # mesh_policy_denials_total (`mesh.sidecar.inbound.policy_denials`), if counted
        self.resolve = resolver

    async def close(self) -> None:
        await self.pool.close()

    def accept(self, request: Request) -> Response | None:
        """The outbound listener's plain HTTP request for a host outside the mesh: marked for the end
        of the outbound chain (None), or refused now (400: no host and port to call)."""
        if request.scheme in ("https", "wss"):
            return short_error(400, "an https:// request to a proxy is not sent: send CONNECT host:443 "
                                    "(HTTPS_PROXY) and speak TLS through the tunnel", request.id)
        try:
            parse_authority(request.host, 80)
        except BadTarget as exc:
            return short_error(400, f"bad Host: {exc}", request.id)
        request.state[EGRESS] = True
        request.state[ROUTE] = self.route
        return None

    async def forward(self, request: Request) -> Response:
        """The end of the outbound chain for an egress call: check it, then send it to its host."""
        state = request.state
        state[ROUTE] = self.route
        try:
            host, port = parse_authority(request.host, 80)
        except BadTarget as exc:
            return short_error(400, f"bad Host: {exc}", request.id)
        decision = self.policy.check(self.service, host, port, request.method, request.path)
        if not decision.allowed:
            return self._denied(decision.reason, request)
        self._count(decision)
        addresses = await self._addresses(host, port, decision)
        timeout = state.get(TRY_TIMEOUT)
        deadline = state.get(DEADLINE)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamError(504, f"the deadline passed before {host}:{port} was called")
            if timeout is None or remaining < timeout:
                timeout = remaining
        state[BACKEND] = Backend("egress", host, port, None)  # the access log's upstream: host:port
        state[UPSTREAM_STARTED] = time.monotonic()
        for address in addresses[:-1]:
            try:
                return await self._send(request, address, port, timeout)
            except ConnectFailed as exc:  # nothing was sent: the next address may answer (a timeout is final)
                if exc.status != 502:
                    raise
        return await self._send(request, addresses[-1], port, timeout)

    def _send(self, request: Request, address: str, port: int, timeout: float | None) -> Awaitable[Response]:
        return self.pool.request(Endpoint(address, port), request.method, request.target, request.headers,
                                 request.body, timeout=timeout, idle_timeout=self.idle,
                                 informational=request._interim)

    async def connect(self, request: Request) -> Response:
        """A CONNECT from the app: 200 with a tunnel to its host once allowed and connected, else why not."""
        state = request.state
        state[ROUTE] = self.route
        try:
            host, port = parse_authority(request.path, None)
        except BadTarget as exc:
            return short_error(400, f"bad CONNECT target: {exc}", request.id)
        decision = self.policy.check(self.service, host, port, "CONNECT", "")
        if not decision.allowed:
            return self._denied(decision.reason, request)
        self._count(decision)
        try:
            addresses = await self._addresses(host, port, decision)
            state[BACKEND] = Backend("egress", host, port, None)
            state[UPSTREAM_STARTED] = time.monotonic()
            tunnel = await self._open(addresses, port)
        except UpstreamError as exc:
            return short_error(exc.status, exc.reason, request.id)
        except TimeoutError:
            return short_error(504, f"timed out connecting to {host}:{port}", request.id)
        except OSError as exc:
            reason = (exc.strerror or type(exc).__name__).lower()
            return short_error(502, f"cannot connect to {host}:{port}: {reason}", request.id)
        response = Response(200)
        response._upgrade = tunnel
        return response

    async def _open(self, addresses: list[str], port: int) -> Tunnel:
        """A tunnel to the first of ``addresses`` that takes a connection on ``port``."""
        for address in addresses[:-1]:
            try:
                return await open_tunnel(address, port, connect_timeout=self.limits.connect_timeout,
                                         idle_timeout=self.idle)
            except OSError:  # refused or unreachable: the next address may answer (a timeout is final)
                continue
        return await open_tunnel(addresses[-1], port, connect_timeout=self.limits.connect_timeout,
                                 idle_timeout=self.idle)

    async def _addresses(self, host: str, port: int, decision: EgressDecision) -> list[str]:
        """Where to connect for ``host``, in order: resolved now; a local address only for a host named
        exactly. At least one, or `UpstreamError`."""
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                addresses = await self.resolve(host, port)
        except TimeoutError:
            raise UpstreamError(504, f"timed out resolving {host}") from None
        except OSError as exc:
            reason = (exc.strerror or type(exc).__name__).lower()
            raise UpstreamError(502, f"cannot resolve {host}: {reason}") from None
        if not addresses:
            raise UpstreamError(502, f"cannot resolve {host}: no address")
        if not decision.exact:
            for address in addresses:
                if _local(address):
                    reason = (f"{host} resolves to {address}, a local address: only an [[egress]] entry "
                              f"naming {host} itself allows that")
                    log.warning("denied: %s", reason)
                    if self.denials is not None:
                        self.denials.inc(direction="outbound", route=self.route, result="denied")
                    raise UpstreamError(403, reason)
        return addresses

    def _denied(self, reason: str, request: Request) -> Response:
        if self.denials is not None:
            self.denials.inc(direction="outbound", route=self.route, result="denied")
        return short_error(403, reason, request.id)

    def _count(self, decision: EgressDecision) -> None:
        if decision.audited and self.denials is not None:
            self.denials.inc(direction="outbound", route=self.route, result="audited")
