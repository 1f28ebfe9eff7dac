"""mesh.toml (v1): load, check everything, report every problem at once.

`load` returns a `MeshConfig` or raises `ConfigError` whose ``problems``
list names, for each problem, its key path, what was found and what was
expected, with a did-you-mean for typos. Plugins are loaded and their
options bound while checking, so a file that loads is a file that starts.

Outbound resilience (`mesh.sidecar.resilience`, `mesh.sidecar.balancer`) is configured per
route, with mesh-wide defaults; a route's own key wins over ``[mesh.defaults]``,
which wins over the built-in default::

    [mesh.defaults]                      # or: [mesh] defaults = { ... }
    timeout = "15s"         # a whole outbound call, every try included, until the
                            # response head; "0s": no deadline. Between a route's
                            # `timeout` and this one comes the target service's `timeout`.
    max_pending = 1024      # requests in flight from one sidecar to one target service;
                            # over it: 503 with Retry-After at once (circuit breaking)
    lb = "p2c"              # "p2c" (two random instances, the one with fewer requests
                            # in flight) or "round-robin"
    retries = { attempts = 3,            # tries in all, the first included; 1: never retry
                per_try_timeout = "0s",  # bound of each try ("0s": only the overall timeout)
                on = ["connect-failure", "reset", "502", "503", "504"],
                                         # also "timeout" (a try's timeout; "504" covers it
                                         # too), "5xx", or any status
                idempotent_only = true,  # retry only GET HEAD OPTIONS TRACE PUT DELETE
                                         # (connect failures: every method, nothing was sent)
                backoff = "25ms", max_backoff = "250ms",  # full jitter, doubling per retry
                budget = 0.2,            # retries add at most this share of requests...
                min_per_second = 10 }    # ...beyond this many per second (per target)
    outlier = { consecutive_failures = 5,  # connect failures, resets, timeouts, 502/503/504
                base_ejection = "5s",      # ejected for base * times ejected...
                max_ejection = "60s",      # ...at most this long
                max_ejection_percent = 50 }# never more of a service's instances than this

    [[routes]]
    from = "web"
    to = "orders"
    timeout = "2s"
    retries = { attempts = 5, per_try_timeout = "300ms" }   # the rest from [mesh.defaults]
    max_pending = 100

A service with a ``health`` path is checked by the controller while it runs
(``health_check = { interval = "1s", timeout = "1s", unhealthy_threshold = 2,
healthy_threshold = 2 }``): an unhealthy instance leaves every sidecar's
registry and comes back once healthy.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mesh.errors import ConfigError, PluginError
from mesh.loader import load_class
from mesh.options import Duration, Size, bind, check, construct, describe
from mesh.plugin import Plugin

__all__ = ["BUILTIN_PLUGINS", "Defaults", "HealthCheck", "MeshConfig", "Outlier", "PluginSpec", "Retries",
           "RouteConfig", "ServiceConfig", "load", "build_plugins"]

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_RETRY_WORDS = ("connect-failure", "reset", "timeout", "5xx")

# The built-in layers by the short names mesh.toml uses, inbound (`mesh.sidecar.inbound`) and outbound
# (`mesh.sidecar.resilience`): ``outbound = [{ use = "retry", attempts = 5 }]`` replaces the default retry
# layer, ``plugins = [{ use = "policy", mode = "audit" }]`` the default route policy layer.
BUILTIN_PLUGINS = {
    "identity": "mesh.sidecar.inbound:PeerIdentity",
    "policy": "mesh.sidecar.inbound:RoutePolicy",
    "caller-deadline": "mesh.sidecar.inbound:CallerDeadline",
    "deadline": "mesh.sidecar.resilience:Deadline",
    "breaker": "mesh.sidecar.resilience:CircuitBreaker",
    "retry": "mesh.sidecar.resilience:Retry",
}
_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}


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
    key: str
    sleep_after: Duration = Duration(60)
    max: int = 100
    start_timeout: Duration = Duration(30)

    def __post_init__(self) -> None:
        kind = self.key.partition(":")[0]
        if kind not in ("header", "path", "claim") or ":" not in self.key:
            raise ValueError(f"key: expected 'header:NAME', 'path:N' or 'claim:NAME', "
                             f"found {self.key!r}")
        if self.max < 1:
            raise ValueError(f"max: expected at least 1, found {self.max}")


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
    name: str = ""
    plugin_specs: list[PluginSpec] = field(default_factory=list)
    outbound_specs: list[PluginSpec] = field(default_factory=list)


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

    def __post_init__(self) -> None:
        if self.max_pending is not None and self.max_pending < 1:
            raise ValueError(f"max_pending: expected at least 1, found {self.max_pending}")


@dataclass
class MeshSection:
    name: str = "mesh"
    plugin_path: list[str] = field(default_factory=list)
    mode: Literal["enforce", "audit"] = "enforce"
    defaults: Defaults = field(default_factory=Defaults)


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

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def state_dir(self) -> Path:
        """Where `mesh up` keeps what it runs (pids, ports, certificates)."""
        return self.root / ".mesh" / self.name


_TOP = ("mesh", "services", "routes")


def _did_you_mean(key: str, known: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f", did you mean '{close[0]}'?" if close else f" (expected one of: {', '.join(known)})"


def resolve(path: str | Path | None = None) -> Path:
    """The mesh.toml that PATH names: a file, or a folder holding mesh.toml."""
    target = Path(path or "mesh.toml")
    if target.is_dir():
        target = target / "mesh.toml"
    return target.resolve()


def load(path: str | Path | None = None) -> MeshConfig:
    """Read and check a mesh.toml; raise `ConfigError` listing every problem."""
    file = resolve(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{file}: no such file (give a mesh.toml or a folder holding one)"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML: {exc}"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot read: {exc}"]) from None
    return parse(data, file)


def parse(data: dict[str, Any], file: Path) -> MeshConfig:
    problems: list[str] = []
    root = file.parent
    for key in data:
        if key not in _TOP:
            problems.append(f"{key}: unknown top-level key{_did_you_mean(key, _TOP)}")

    mesh_table = data.get("mesh", {})
    section = MeshSection()
    if not isinstance(mesh_table, dict):
        problems.append(f"mesh: expected a table, found {type(mesh_table).__name__}")
    else:
        section = bind(MeshSection, mesh_table, where="mesh", root=root, problems=problems) or section
    if not _NAME.match(section.name):
        problems.append(f"mesh.name: expected lowercase letters, digits and '-', "
                        f"starting with a letter, found {section.name!r}")
    plugin_path = [(root / p).resolve() for p in section.plugin_path]
    for i, folder in enumerate(plugin_path):
        if not folder.is_dir():
            problems.append(f"mesh.plugin_path[{i}]: no such folder: {folder}")

    services: dict[str, ServiceConfig] = {}
    table = data.get("services", {})
    if not isinstance(table, dict) or not table:
        problems.append("services: expected at least one [services.NAME] table")
        table = {}
    for name, raw in table.items():
        where = f"services.{name}"
        if not _NAME.match(name):
            problems.append(f"{where}: a service name is lowercase letters, digits and '-', "
                            f"starting with a letter")
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a table, found {type(raw).__name__}")
            continue
        service = bind(ServiceConfig, {k: v for k, v in raw.items() if k not in ("name",)},
                       where=where, root=root, problems=problems)
        if "name" in raw or "plugin_specs" in raw or "outbound_specs" in raw:
            problems.append(f"{where}: unknown option 'name'")
        # Plugins are checked even when another key of the service is wrong.
        chains = {}
        for key in ("plugins", "outbound"):
            entries = raw.get(key, [])
            if isinstance(entries, list) and all(isinstance(e, dict) for e in entries):
                chains[key] = _plugin_specs(entries, f"{where}.{key}", plugin_path, root, problems)
        if service is None:
            continue
        service.name = name
        _check_service(service, where, problems)
        if service.lifecycle is not None:  # hooks: loaded like plugins, from plugin_path
            from mesh.lifecycle import check_lifecycle

            check_lifecycle(service.lifecycle, f"{where}.lifecycle", plugin_path, problems)
        service.plugin_specs = chains.get("plugins", [])
        service.outbound_specs = chains.get("outbound", [])
        services[name] = service

    exposed: dict[int, str] = {}
    for name, service in services.items():
        if service.expose is not None:
            if service.expose in exposed:
                problems.append(f"services.{name}.expose: port {service.expose} is already "
                                f"exposed by services.{exposed[service.expose]}")
            exposed[service.expose] = name

    routes: list[RouteConfig] = []
    raw_routes = data.get("routes", [])
    if not isinstance(raw_routes, list):
        problems.append("routes: expected [[routes]] entries (an array of tables)")
        raw_routes = []
    for i, raw in enumerate(raw_routes):
        where = f"routes[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a table, found {type(raw).__name__}")
            continue
        # Unknown keys are named against the keys a mesh.toml uses: `from`, not the field `source`.
        keys = sorted("from" if name == "source" else name for name in RouteConfig.__dataclass_fields__)
        for key in raw:
            if key not in keys:
                close = ["from"] if key == "source" else difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
                problems.append(f"{where}: unknown option '{key}'" + (
                    f", did you mean '{close[0]}'?" if close else f" (known: {', '.join(keys)})"))
        renamed = {("source" if k == "from" else k): v for k, v in raw.items() if k in keys}
        before = len(problems)
        route = bind(RouteConfig, renamed, where=where, root=root, problems=problems)
        for j in range(before, len(problems)):
            problems[j] = problems[j].replace(f"{where}.source", f"{where}.from")
        # Names, paths and methods are checked even when another key of the route is wrong.
        for key in ("from", "to"):
            service = raw.get(key)
            if isinstance(service, str) and service not in services and service not in table:
                problems.append(f"{where}.{key}: unknown service {service!r}"
                                f"{_did_you_mean(service, tuple(table))}")
        paths = raw.get("paths", [])
        for j, pattern in enumerate(paths if isinstance(paths, list) else []):
            if isinstance(pattern, str) and not pattern.startswith("/"):
                problems.append(f"{where}.paths[{j}]: expected a path starting with '/', found {pattern!r}")
        methods = raw.get("methods", [])
        for j, method in enumerate(methods if isinstance(methods, list) else []):
            if isinstance(method, str) and method.upper() not in _METHODS:
                problems.append(f"{where}.methods[{j}]: unknown HTTP method {method!r}")
        if route is not None:
            route.methods = [m.upper() for m in route.methods]
            routes.append(route)

    if problems:
        raise ConfigError(problems)
    return MeshConfig(path=file, name=section.name, plugin_path=plugin_path,
                      services=services, routes=routes, mode=section.mode, defaults=section.defaults)


def _check_service(service: ServiceConfig, where: str, problems: list[str]) -> None:
    if not (service.command or service.build or service.image):
        problems.append(f"{where}: expected 'command' (process runtime) or 'build'/'image' "
                        f"(docker runtime), found none")
    if service.build and service.image:
        problems.append(f"{where}: give 'build' or 'image', not both")
    for key in ("port", "expose"):
        value = getattr(service, key)
        if value is not None and not 1 <= value <= 65535:
            problems.append(f"{where}.{key}: expected a port between 1 and 65535, found {value}")
    if service.health is not None and not service.health.startswith("/"):
        problems.append(f"{where}.health: expected a path starting with '/', found {service.health!r}")
    if service.scale is not None and service.instances is not None:
        problems.append(f"{where}: 'scale' (a pool) and 'instances' (one per key) exclude each other")
    if service.health_check is not None and service.health is None:
        problems.append(f"{where}.health_check: checks the 'health' path, and the service has none")
    if service.replicas < 1:
        problems.append(f"{where}.replicas: expected at least 1, found {service.replicas}")


def _plugin_specs(entries: list[dict[str, Any]], where: str, plugin_path: list[Path],
                  root: Path, problems: list[str]) -> list[PluginSpec]:
    specs = []
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        use = entry.get("use")
        if not isinstance(use, str) or not use:
            problems.append(f"{at}: expected a 'use' key naming the plugin "
                            f"(a short name, 'module:Class' or 'file.py:Class'), found "
                            f"{describe(type(use)) if use is not None else 'none'}")
            continue
        try:
            cls = load_class(BUILTIN_PLUGINS.get(use, use), plugin_path)
        except PluginError as exc:
            problems.append(f"{at}: {exc}")
            continue
        options = {k: v for k, v in entry.items() if k != "use"}
        kwargs = check(cls, options, where=at, root=root, problems=problems, label=use)
        if kwargs is None:
            continue
        # Constructors are pure by contract: building one here proves the options work.
        if construct(cls, kwargs, where=at, problems=problems, label=use) is None:
            continue
        specs.append(PluginSpec(use=use, options=kwargs, where=at, cls=cls))
    return specs


def build_plugins(specs: list[PluginSpec]) -> list[tuple[str, Plugin]]:
    """Fresh plugin instances for a chain, named by where they were declared."""
    return [(spec.label, spec.create()) for spec in specs]
