"""Reading mesh.toml: every key checked, every problem reported at once (`mesh.config`)."""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from pathlib import Path
from typing import Any

from mesh.config.model import (
    Egress,
    MeshConfig,
    MeshSection,
    PluginSpec,
    RouteConfig,
    ServiceConfig,
    ServiceRoute,
    host_pattern,
)
from mesh.errors import ConfigError, PluginError
from mesh.loader import load_class
from mesh.options import bind, check, construct, describe
from mesh.plugin import Plugin

__all__ = ["BUILTIN_PLUGINS", "build_plugins", "load", "parse", "resolve"]

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")

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


_TOP = ("mesh", "services", "routes", "egress")


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
        service = bind(ServiceConfig, {k: v for k, v in raw.items() if k not in ("name", "routes")},
                       where=where, root=root, problems=problems)
        if "name" in raw or "plugin_specs" in raw or "outbound_specs" in raw:
            problems.append(f"{where}: unknown option 'name'")
        # Plugins are checked even when another key of the service is wrong.
        chains = {}
        for key in ("plugins", "outbound"):
            entries = raw.get(key, [])
            if isinstance(entries, list) and all(isinstance(e, dict) for e in entries):
                chains[key] = _plugin_specs(entries, f"{where}.{key}", plugin_path, root, problems)
        service_routes = _service_routes(raw.get("routes", []), name, plugin_path, root, problems)
        if service is None:
            continue
        service.name = name
        _check_service(service, where, problems)
        if service.lifecycle is not None:  # hooks: loaded like plugins, from plugin_path
            from mesh.lifecycle import check_lifecycle

            check_lifecycle(service.lifecycle, f"{where}.lifecycle", plugin_path, problems)
        service.plugin_specs = chains.get("plugins", [])
        service.outbound_specs = chains.get("outbound", [])
        service.routes = service_routes
        services[name] = service

    exposed: dict[int, str] = {}
    for name, service in services.items():
        if service.expose is not None:
            if service.expose in exposed:
                problems.append(f"services.{name}.expose: port {service.expose} is already "
                                f"exposed by services.{exposed[service.expose]}")
            exposed[service.expose] = name
    _check_pinned(services, problems)
    _check_start_order(services, tuple(table), problems)

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
        keys = sorted("from" if f.name == "source" else f.name for f in dataclasses.fields(RouteConfig) if f.init)
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
            elif key == "to" and isinstance(service, str) and service in services and services[service].job:
                problems.append(f"{where}.to: services.{service} is a job (job = true): it takes no requests")
        _check_narrowing(raw, where, problems)
        source, target = raw.get("from"), raw.get("to")
        specs = _route_plugins(raw.get("plugins", []), f"{where}.plugins", plugin_path, root, problems,
                               inbound=f"configure it in services.{target}.plugins",
                               outbound=f"set this route's timeout, max_pending or retries, or configure it "
                                        f"in services.{source}.outbound")
        if route is not None:
            route.methods = [m.upper() for m in route.methods]
            route.plugin_specs = specs
            routes.append(route)

    egress = _egress(data.get("egress", []), tuple(table), root, problems)

    if problems:
        raise ConfigError(problems)
    return MeshConfig(path=file, name=section.name, plugin_path=plugin_path,
                      services=services, routes=routes, mode=section.mode, defaults=section.defaults,
                      tracing=section.tracing, egress=egress)


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
    if service.job:
        for key, reason in _NOT_FOR_JOBS.items():
            if getattr(service, key) is not None:
                problems.append(f"{where}.{key}: a job (job = true) {reason}")
    pinned = service.pinned_ports()
    if pinned:
        many = ("a keyed service starts one instance per key" if service.instances is not None
                else "a pool (scale) starts several" if service.scale is not None
                else f"replicas = {service.replicas} starts several" if service.replicas > 1 else "")
        if many:
            problems.append(f"{where}.sidecar: pinned ports need a service with one instance, and {many} "
                            f"(one port takes one listener)")
    if service.name in service.depends_on:
        problems.append(f"{where}.depends_on: a service cannot depend on itself")


# Keys a job cannot have, and why.
_NOT_FOR_JOBS = {
    "port": "listens on no port",
    "expose": "listens on no port: there is nothing to expose",
    "health": "is ready once its sidecar is; it has no health path",
    "health_check": "is ready once its sidecar is; it has no health checks",
    "instances": "runs `replicas` copies once; it cannot be keyed",
    "scale": "runs `replicas` copies once; it cannot be a pool",
}


def _check_start_order(services: dict[str, ServiceConfig], names: tuple[str, ...], problems: list[str]) -> None:
    """Each ``depends_on`` names another service of the mesh, and no service waits for itself through others."""
    for name, service in services.items():
        for i, dependency in enumerate(service.depends_on):
            if dependency not in names:
                problems.append(f"services.{name}.depends_on[{i}]: unknown service {dependency!r}"
                                f"{_did_you_mean(dependency, names)}")
    state: dict[str, str] = {}  # name -> "open" while its dependencies are visited, then "done"
    cycles: set[frozenset[str]] = set()

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dependency in services[name].depends_on:
            if dependency == name or dependency not in services:
                continue
            if state.get(dependency) == "open":
                cycle = path[path.index(dependency):] + [dependency]
                if frozenset(cycle) not in cycles:
                    cycles.add(frozenset(cycle))
                    problems.append(f"services.{cycle[0]}.depends_on: the services wait for each other, "
                                    f"none would start: {' -> '.join(cycle)}")
            elif dependency not in state:
                visit(dependency, [*path, dependency])
        state[name] = "done"

    for name in services:
        if name not in state:
            visit(name, [name])


def _check_pinned(services: dict[str, ServiceConfig], problems: list[str]) -> None:
    """No two listeners of the mesh pinned to one port: ``expose`` and the sidecars' pinned ports."""
    taken: dict[int, str] = {}
    for name, service in services.items():
        if service.expose is not None:
            taken.setdefault(service.expose, f"services.{name}.expose")
    for name, service in services.items():
        for role, port in service.pinned_ports().items():
            key = f"services.{name}.sidecar.{role}_port"
            if port in taken:
                problems.append(f"{key}: port {port} is already taken by {taken[port]}")
            taken.setdefault(port, key)


def _check_narrowing(raw: dict[str, Any], where: str, problems: list[str]) -> None:
    """A route's ``paths`` start with '/', its ``methods`` are HTTP methods (their types: `bind`'s)."""
    paths = raw.get("paths", [])
    for j, pattern in enumerate(paths if isinstance(paths, list) else []):
        if isinstance(pattern, str) and not pattern.startswith("/"):
            problems.append(f"{where}.paths[{j}]: expected a path starting with '/', found {pattern!r}")
    methods = raw.get("methods", [])
    for j, method in enumerate(methods if isinstance(methods, list) else []):
        if isinstance(method, str) and method.upper() not in _METHODS:
            problems.append(f"{where}.methods[{j}]: unknown HTTP method {method!r}")


def _service_routes(raw: Any, service: str, plugin_path: list[Path], root: Path,
                    problems: list[str]) -> list[ServiceRoute]:
    """``[[services.NAME.routes]]``: each entry's keys, paths, methods and plugins, all checked."""
    where = f"services.{service}.routes"
    if not isinstance(raw, list):
        found = "a table" if isinstance(raw, dict) else type(raw).__name__
        problems.append(f"{where}: expected [[{where}]] entries (an array of tables), found {found}")
        return []
    routes = []
    for i, table in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(table, dict):
            problems.append(f"{at}: expected a table, found {type(table).__name__}")
            continue
        route = bind(ServiceRoute, table, where=at, root=root, problems=problems)
        if table.get("paths") == []:
            problems.append(f"{at}.paths: expected at least one path like '/api/*' (plugins for every "
                            f"path go in services.{service}.plugins), found none")
        _check_narrowing(table, at, problems)
        specs = _route_plugins(table.get("plugins", []), f"{at}.plugins", plugin_path, root, problems,
                               inbound=f"configure it in services.{service}.plugins",
                               outbound=f"configure it in services.{service}.outbound")
        if route is not None:
            route.methods = [m.upper() for m in route.methods]
            route.plugin_specs = specs
            routes.append(route)
    return routes


def _route_plugins(entries: Any, where: str, plugin_path: list[Path], root: Path, problems: list[str], *,
                   inbound: str, outbound: str) -> list[PluginSpec]:
    """A route's ``plugins``, loaded as a service's are; the built-in layers stay in the service's chains."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return []  # `bind` names the type
    specs = _plugin_specs(entries, where, plugin_path, root, problems)
    for spec in specs:
        if spec.use in BUILTIN_PLUGINS:
            home = inbound if BUILTIN_PLUGINS[spec.use].startswith("mesh.sidecar.inbound:") else outbound
            problems.append(f"{spec.label}: a built-in layer runs in the service's own chain, "
                            f"not in a route's plugins ({home})")
    return specs


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


def _egress(raw_entries: Any, services: tuple[str, ...], root: Path, problems: list[str]) -> list[Egress]:
    """``[[egress]]``: each entry's keys, service, hosts, ports, paths and methods, all checked."""
    if not isinstance(raw_entries, list):
        problems.append("egress: expected [[egress]] entries (an array of tables)")
        return []
    keys = sorted("from" if name == "source" else name for name in Egress.__dataclass_fields__)
    entries = []
    for i, raw in enumerate(raw_entries):
        where = f"egress[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a table, found {type(raw).__name__}")
            continue
        for key in raw:
            if key not in keys:
                close = ["from"] if key == "source" else difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
                problems.append(f"{where}: unknown option '{key}'" + (
                    f", did you mean '{close[0]}'?" if close else f" (known: {', '.join(keys)})"))
        before = len(problems)
        renamed = {("source" if k == "from" else k): v for k, v in raw.items() if k in keys}
        kwargs = check(Egress, renamed, where=where, root=root, problems=problems)
        for j in range(before, len(problems)):
            problems[j] = problems[j].replace(f"{where}.source", f"{where}.from")
        # Each value is checked even when another key of the entry is wrong.
        source = raw.get("from")
        if isinstance(source, str) and source not in services:
            problems.append(f"{where}.from: unknown service {source!r}{_did_you_mean(source, services)}")
        hosts = raw.get("hosts")
        if hosts == []:
            problems.append(f"{where}.hosts: expected at least one host, like 'api.example.com' or "
                            f"'*.example.com', found none")
        for j, host in enumerate(hosts if isinstance(hosts, list) else []):
            if not isinstance(host, str):
                continue
            try:
                pattern = host_pattern(host)
            except ValueError as exc:
                problems.append(f"{where}.hosts[{j}]: {exc}")
                continue
            if pattern in services:
                problems.append(f"{where}.hosts[{j}]: {host!r} is a service of this mesh: calls to it "
                                f"go through [[routes]], not egress")
        ports = raw.get("ports", [])
        for j, port in enumerate(ports if isinstance(ports, list) else []):
            if isinstance(port, int) and not isinstance(port, bool) and not 1 <= port <= 65535:
                problems.append(f"{where}.ports[{j}]: expected a port between 1 and 65535, found {port}")
        _check_narrowing(raw, where, problems)
        if kwargs is not None and len(problems) == before:
            entry = construct(Egress, kwargs, where=where, problems=problems)
            if entry is not None:
                entries.append(entry)
    return entries
