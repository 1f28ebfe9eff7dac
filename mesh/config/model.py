"""The shape of a loaded mesh.toml: one dataclass per table, checked as it is built (`mesh.config`)."""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from mesh.options import Duration, Size
from mesh.plugin import Plugin

__all__ = ["Defaults", "Egress", "HealthCheck", "Instances", "MeshConfig", "MeshSection", "Outlier", "PluginSpec",
           "RETRIES_DEFAULT", "Retries", "RouteConfig", "Scale", "ServiceConfig", "ServiceRoute", "SidecarPorts",
           "Tracing", "host_pattern", "normalize_host", "start_order"]

_RETRY_WORDS = ("connect-failure", "reset", "timeout", "5xx")


@dataclass(frozen=True)
class PluginSpec:
    """One entry of a ``plugins`` or ``outbound`` list: which class, which options, where."""

    use: str
    options: dict[str, Any]
    where: str
    cls: type

    @property
    def label(self) -> str:
        return f"{self.where} ({self.use})"

    def create(self) -> Plugin:
        return self.cls(**self.options)


@dataclass
class Scale:
    min: int = 1
    max: int = 1
    cpu: float = 0.75
    cooldown: Duration = Duration(30)

    def __post_init__(self) -> None:
        if not 0 <= self.min <= self.max:
            raise ValueError(f"expected 0 <= min <= max, found min={self.min}, max={self.max}")
        if not 0 < self.cpu <= 1:
            raise ValueError(f"cpu: expected a share of one CPU between 0 and 1, found {self.cpu}")


@dataclass
class Instances:
    """``instances = {...}``: one instance per key (`mesh.control.keyed`).

    ``volume``: the key's own folder, kept across sleeps and runs: a folder in the state folder
    (process runtime) or a named volume mounted at this path (docker runtime); the app finds it
    in ``MESH_VOLUME``.
    """

    key: str
    sleep_after: Duration = Duration(60)
    max: int = 100
    start_timeout: Duration = Duration(30)
    volume: str | None = None

    def __post_init__(self) -> None:
        kind = self.key.partition(":")[0]
        if kind not in ("header", "path", "claim") or ":" not in self.key:
            raise ValueError(f"key: expected 'header:NAME', 'path:N' or 'claim:NAME', "
                             f"found {self.key!r}")
        if self.max < 1:
            raise ValueError(f"max: expected at least 1, found {self.max}")
        if self.volume is not None and not _mount_path(self.volume):
            raise ValueError(f"volume: expected an absolute path like '/data' (where the app's container "
                             f"mounts the key's volume), found {self.volume!r}")


def _mount_path(path: str) -> bool:
    """An absolute path in its plain form, not ``/`` itself: ``/data``, ``/var/lib/app``."""
    return (path.startswith("/") and path != "/" and path.isprintable()
            and posixpath.normpath(path) == path and not path.startswith("//"))


@dataclass
class HealthCheck:
    """How the controller checks a service's ``health`` path while it runs."""

    interval: Duration = Duration(1)
    timeout: Duration = Duration(1)
    unhealthy_threshold: int = 2
    healthy_threshold: int = 2

    def __post_init__(self) -> None:
        if self.interval <= 0:
            raise ValueError(f"interval: expected more than 0s, found {self.interval:g}s")
        for key in ("unhealthy_threshold", "healthy_threshold"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: expected at least 1, found {getattr(self, key)}")


@dataclass
class Retries:
    """A ``retries`` table (route or ``[mesh.defaults]``); a key left out (None) comes from the next level."""

    attempts: int | None = None
    per_try_timeout: Duration | None = None
    on: list[str | int] | None = None
    idempotent_only: bool | None = None
    backoff: Duration | None = None
    max_backoff: Duration | None = None
    budget: float | None = None
    min_per_second: float | None = None

    def __post_init__(self) -> None:
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"attempts: expected at least 1 (1: no retries), found {self.attempts}")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"budget: expected a share of requests (0.2: 20%), found {self.budget}")
        if self.min_per_second is not None and self.min_per_second < 0:
            raise ValueError(f"min_per_second: expected 0 or more, found {self.min_per_second}")
        if self.on is not None:
            conditions: list[str | int] = []
            for i, item in enumerate(self.on):
                word = str(item).strip().lower()
                if word not in _RETRY_WORDS and not (word.isdigit() and 100 <= int(word) <= 599):
                    raise ValueError(f"on[{i}]: expected one of {', '.join(_RETRY_WORDS)} or an HTTP "
                                     f"status like '503', found {item!r}")
                conditions.append(word)
            self.on = conditions

    def over(self, base: Retries) -> Retries:
        """These keys where set, ``base``'s elsewhere."""
        return Retries(**{k: (v if v is not None else getattr(base, k)) for k, v in vars(self).items()})


# What a retries table means where nothing sets a key.
RETRIES_DEFAULT = Retries(attempts=3, per_try_timeout=Duration(0),
                          on=["connect-failure", "reset", "502", "503", "504"], idempotent_only=True,
                          backoff=Duration(0.025), max_backoff=Duration(0.25), budget=0.2,
                          min_per_second=10.0)


@dataclass
class Outlier:
    """Passive outlier detection: eject an instance after consecutive failures (0: never)."""

    consecutive_failures: int = 5
    base_ejection: Duration = Duration(5)
    max_ejection: Duration = Duration(60)
    max_ejection_percent: int = 50

    def __post_init__(self) -> None:
        if self.consecutive_failures < 0:
            raise ValueError(f"consecutive_failures: expected 0 (off) or more, found {self.consecutive_failures}")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError(f"max_ejection_percent: expected 0 to 100, found {self.max_ejection_percent}")
        if self.max_ejection < self.base_ejection:
            raise ValueError(f"max_ejection ({self.max_ejection:g}s) is shorter than "
                             f"base_ejection ({self.base_ejection:g}s)")


@dataclass
class Defaults:
    """``[mesh.defaults]``: outbound settings for every route that does not set its own."""

    timeout: Duration = Duration(15)
    max_pending: int = 1024
    lb: Literal["p2c", "round-robin"] = "p2c"
    retries: Retries = field(default_factory=Retries)
    outlier: Outlier = field(default_factory=Outlier)

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ValueError(f"max_pending: expected at least 1, found {self.max_pending}")


@dataclass
class ServiceRoute:
    """One ``[[services.NAME.routes]]`` entry: plugins for the requests to some of a service's paths.

    The first entry whose ``paths`` (``*`` globs) and ``methods`` match a request picks its
    plugins; with ``inherit`` the service's own ``plugins`` run around them, without it they
    do not run for that request (`mesh.sidecar.route_chains`).
    """

    paths: list[str]
    methods: list[str] = field(default_factory=list)
    plugins: list[dict[str, Any]] = field(default_factory=list)
    inherit: bool = True
    plugin_specs: list[PluginSpec] = field(default_factory=list, init=False)


@dataclass
class SidecarPorts:
    """A service's ``sidecar`` table: its sidecar's listeners on these ports instead of free ones.

    Each key left out stays a free port chosen at every start. Only for a service with one
    instance (``replicas = 1``, neither keyed nor a pool): one port takes one listener.
    """

    admin_port: int | None = None
    mesh_port: int | None = None
    outbound_port: int | None = None

    def __post_init__(self) -> None:
        pinned = self.pinned()
        for role, port in pinned.items():
            if not 1 <= port <= 65535:
                raise ValueError(f"{role}_port: expected a port between 1 and 65535, found {port}")
        if len(set(pinned.values())) < len(pinned):
            raise ValueError(f"expected a different port for each listener, found "
                             f"{', '.join(f'{role}_port = {port}' for role, port in pinned.items())}")

    def pinned(self) -> dict[str, int]:
        """Listener (``admin``, ``mesh``, ``outbound``) -> its pinned port, for those pinned."""
        found = {"admin": self.admin_port, "mesh": self.mesh_port, "outbound": self.outbound_port}
        return {role: port for role, port in found.items() if port is not None}


@dataclass
class ServiceConfig:
    """One ``[services.NAME]`` table."""

    command: str | None = None
    build: str | None = None
    image: str | None = None
    port: int | None = None
    expose: int | None = None
    health: str | None = None
    health_check: HealthCheck | None = None
    env: dict[str, str] = field(default_factory=dict)
    plugins: list[dict[str, Any]] = field(default_factory=list)
    outbound: list[dict[str, Any]] = field(default_factory=list)
    routes: list[ServiceRoute] = field(default_factory=list)  # [[services.NAME.routes]], read on their own
    scale: Scale | None = None
    instances: Instances | None = None
    replicas: int = 1
    cpus: float | None = None
    memory: str | None = None
    lifecycle: str | None = None
    timeout: Duration | None = None
    # How long a response body (or a WebSocket tunnel) may go quiet before the sidecar cuts it.
    stream_idle_timeout: Duration = Duration(300)
    # Request bodies up to this size are read in full before the app sees the request (0: stream all).
    request_buffer: Size = Size(1 << 20)
    # A request body streamed past request_buffer must keep this many bytes per second (0: no minimum).
    request_min_rate: Size = Size(1024)
    # Header names with '_' are dropped (as nginx does): CGI/WSGI stacks read X_User as X-User.
    underscores_in_headers: bool = False
    # Started once each of these answered healthy; once a job among them finished with code 0.
    depends_on: list[str] = field(default_factory=list)
    # Runs to completion and listens on no port (`mesh.control.supervisor`).
    job: bool = False
    # Whether an app that exits with a code other than 0 is started again (`restart_policy`).
    restart: Literal["on-failure", "no"] | None = None
    sidecar: SidecarPorts | None = None
    name: str = ""
    plugin_specs: list[PluginSpec] = field(default_factory=list)
    outbound_specs: list[PluginSpec] = field(default_factory=list)

    @property
    def restart_policy(self) -> str:
        """``restart``, else ``"no"`` for a job and ``"on-failure"`` for any other service."""
        return self.restart or ("no" if self.job else "on-failure")

    def pinned_ports(self) -> dict[str, int]:
        """Its sidecar's pinned listeners (`SidecarPorts.pinned`); empty when none is pinned."""
        return self.sidecar.pinned() if self.sidecar is not None else {}


def start_order(services: Mapping[str, ServiceConfig]) -> list[str]:
    """The services' names, each after those in its ``depends_on`` and otherwise in file order.

    For a checked mesh.toml (no cycles, no unknown names: `mesh.config.reader`); an unknown name
    is left out, and a cycle is broken where it is met.
    """
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in services:
            return
        seen.add(name)
        for dependency in services[name].depends_on:
            visit(dependency)
        order.append(name)

    for name in services:
        visit(name)
    return order


@dataclass
class RouteConfig:
    """One ``[[routes]]`` entry: ``source`` may call ``to`` (TOML key ``from``)."""

    source: str
    to: str
    paths: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    timeout: Duration | None = None
    stream_idle_timeout: Duration | None = None
    mode: Literal["enforce", "audit"] = "enforce"
    retries: Retries | None = None
    max_pending: int | None = None
    # Run in the calling sidecar, on calls this route selects (`mesh.sidecar.route_chains`).
    plugins: list[dict[str, Any]] = field(default_factory=list)
    plugin_specs: list[PluginSpec] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.max_pending is not None and self.max_pending < 1:
            raise ValueError(f"max_pending: expected at least 1, found {self.max_pending}")


# A DNS label as egress rules compare it (lowercase; '_' as some internal names have it).
_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


def normalize_host(text: str) -> str | None:
    """``text`` as egress rules compare hosts, or None if it is neither a host name nor an IP address.

    Lowercase, one trailing dot dropped; an IPv4 address in its dotted form; an IPv6 address
    (with or without brackets) short and in brackets, ``[::1]``; a name as given (an
    international one in its ASCII form, ``xn--...``: never decoded). A name whose last label is
    all digits must be an IPv4 address (``127.1`` and ``2130706433`` are none).
    """
    host = text.lower()
    if host.startswith("[") or ":" in host:
        if host.startswith("[") != host.endswith("]"):
            return None
        inner = host[1:-1] if host.startswith("[") else host
        if "%" in inner:  # a zone id names an interface of this machine, not a host
            return None
        try:
            return f"[{ipaddress.IPv6Address(inner).compressed}]"
        except ValueError:
            return None
    if host.endswith("."):
        host = host[:-1]
    if not host or len(host) > 253 or not host.isascii():
        return None
    labels = host.split(".")
    if not all(_DNS_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            return None
    return host


def host_pattern(text: str) -> str:
    """An ``[[egress]]`` ``hosts`` entry, normalized (`normalize_host`): a host, or ``*.`` and a domain.

    Raises ValueError saying what is wrong.
    """
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if "*" in name:
        raise ValueError(f"expected a host or '*.' before a domain (like '*.example.com'), found {text!r}")
    if not name.isascii():
        raise ValueError(f"expected an international name in its ASCII form ('xn--...'), found {text!r}")
    head, sep, tail = name.rpartition(":")
    if sep and tail.isdigit() and ":" not in head and not name.startswith("["):
        raise ValueError(f"expected a host without a port (ports go in 'ports'), found {text!r}")
    host = normalize_host(name)
    if host is None:
        raise ValueError(f"expected a host name, an IP address or '*.domain', found {text!r}")
    if wildcard and (host.startswith("[") or host.replace(".", "").isdigit()):
        raise ValueError(f"expected '*.' before a domain name, not an IP address, found {text!r}")
    return f"*.{host}" if wildcard else host


@dataclass
class Egress:
    """One ``[[egress]]`` entry: ``source`` may call ``hosts`` outside the mesh (TOML key ``from``).

    ``hosts`` are exact (``api.example.com``, ``127.0.0.2``) or ``*.example.com`` (its
    subdomains at any depth, not ``example.com`` itself). Without ``ports``: 80 for plain HTTP,
    443 for CONNECT. ``paths`` and ``methods`` narrow plain HTTP calls; CONNECT is opaque, so an
    entry with ``paths`` never allows it, and one with ``methods`` only if they list CONNECT
    (`mesh.sidecar.egress`).
    """

    source: str
    hosts: list[str]
    ports: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    mode: Literal["enforce", "audit"] = "enforce"

    def __post_init__(self) -> None:
        if not self.hosts:
            raise ValueError("hosts: expected at least one host, like 'api.example.com' or '*.example.com'")
        self.hosts = [host_pattern(host) for host in self.hosts]
        for port in self.ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"ports: expected ports between 1 and 65535, found {port}")
        for path in self.paths:
            if not path.startswith("/"):
                raise ValueError(f"paths: expected paths starting with '/', found {path!r}")
        self.methods = [method.upper() for method in self.methods]


@dataclass
class Tracing:
    """``[mesh.tracing]``: where sidecars send their spans (OTLP/HTTP), and which share of new traces they sample."""

    otlp: str | None = None
    sample: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.sample <= 1:
            raise ValueError(f"sample: expected a share of new traces between 0 and 1 (0.1: 10%), "
                             f"found {self.sample}")
        if self.otlp is not None:
            example = "'http://127.0.0.1:4318/v1/traces'"
            try:
                url = urlsplit(self.otlp)
                ok = url.scheme in ("http", "https") and bool(url.hostname) and url.port != 0
            except ValueError:  # a port that is not a number, or out of range
                ok = False
            if not ok:
                raise ValueError(f"otlp: expected the URL of a collector's OTLP/HTTP traces endpoint, like "
                                 f"{example}, found {self.otlp!r}")
            if url.path in ("", "/"):
                raise ValueError(f"otlp: expected a URL with the traces path, like {example}, "
                                 f"found {self.otlp!r} (add '/v1/traces')")


@dataclass
class MeshSection:
    name: str = "mesh"
    plugin_path: list[str] = field(default_factory=list)
    mode: Literal["enforce", "audit"] = "enforce"
    defaults: Defaults = field(default_factory=Defaults)
    tracing: Tracing | None = None


@dataclass
class MeshConfig:
    """A loaded, checked mesh.toml."""

    path: Path
    name: str
    plugin_path: list[Path]
    services: dict[str, ServiceConfig]
    routes: list[RouteConfig]
    mode: str = "enforce"
    defaults: Defaults = field(default_factory=Defaults)
    # None: sidecars still make spans and propagate `traceparent`, sample every new trace, export nothing.
    tracing: Tracing | None = None
    egress: list[Egress] = field(default_factory=list)  # [[egress]]: calls to hosts outside the mesh

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def state_dir(self) -> Path:
        """Where `mesh up` keeps what it runs (pids, ports, certificates)."""
        return self.root / ".mesh" / self.name


