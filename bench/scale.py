#!/usr/bin/env python3
"""What breaks first when a mesh grows: measured with mesh's own code, in one process.

    .venv/bin/python bench/scale.py                       # 1,000 services x 10 instances, about a minute
    .venv/bin/python bench/scale.py --quick               # 100 x 10, fewer repeats, a few seconds
    .venv/bin/python bench/scale.py --fan-out 2000,4000,9000 --json /tmp/scale.json

It writes a mesh.toml of ``--services`` services with ``--instances`` replicas each and
``--calls`` routes out of each service, loads it with `mesh.config.load`, and measures:

- start: what every sidecar and the controller pay when they start: loading mesh.toml, building
  a `Sidecar` (its `Policy` over every route, its `Outbound` settings per target);
- controller: a `Controller` holding every instance (marked running; no process is started)
  builds and serialises the registry, writes registry.json and state.json, runs its
  `_publish` with nothing to push (what it does every second), and runs `_publish` for real
  to ``--fan-out`` sidecars at once, each a bare listener on 127.0.0.1 that answers 204;
- sidecar: a push through the runtime's own `push_registry` (``PUT /registry``) to a few real
  sidecars (mutual TLS identities, the run's admin token) on 127.0.0.1, and their side of it
  alone: the admin handler (parse, `Registry.update`, its log line) and the `Balancer` refresh;
- certificates: the mesh CA's issue rate, the controller's `InstanceSet.certificate`, a
  sidecar's reload over ``POST /certs/reload``, and the real `rotate_ca` over a few instances;
- policy: `Policy.check` and `Outbound.lookup` per request at 100, 1,000 and 10,000 routes and
  at the mesh's own table.

The last block scales the measured parts to every sidecar of the mesh: one change pushed to
all of them, a mesh started, every certificate renewed. Every sidecar and the controller log
at INFO, as `mesh up` runs them: here to /dev/null, so log lines are formatted and written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import logging
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mesh.config import MeshConfig, RouteConfig, ServiceConfig, load
from mesh.control.ca import CA, rotate_ca
from mesh.control.controller import Console, Controller
from mesh.control.runtimes.base import Instance, instance_label
from mesh.control.runtimes.loopback import http_status
from mesh.messages import Request
from mesh.options import Duration
from mesh.runner import run as run_loop
from mesh.sidecar.identity import Identity
from mesh.sidecar.registry import Registry
from mesh.sidecar.resilience import Outbound
from mesh.sidecar.routes import Policy
from mesh.sidecar.sidecar import Ports, Sidecar

PUSH_TIMEOUT = 1.0  # the controller's push: `http_status`'s default timeout
PUSH_LIMIT = 1 << 20  # what a sidecar's PUT /registry reads at most (`SidecarAdmin.put_registry`)
HEALTH_EVERY = 10.0  # seconds between checks of a healthy instance (`mesh.control.instances.STEADY_INTERVAL`)
LINKS = {"1 Gbit/s": 125e6, "10 Gbit/s": 1.25e9}  # bytes per second

ASSUMPTIONS = (
    "services svc-00000, svc-00001, ...: each `replicas` instances, a `health` path, no plugins",
    "each service calls `calls` others chosen at random (seed 1); of every 5 routes 3 allow any call, "
    "1 GET/HEAD on /api/<to>/*, 1 /api/<to>/orders/* and /api/<to>/items/* with its own timeout",
    "each instance has an address of its own (10.x.y.z:15001), as on several hosts or in containers",
    "both ends of every push run in this one process on 127.0.0.1; network time is computed, not measured",
    "mesh logs at INFO into /dev/null, as `mesh up` runs sidecars: log lines are formatted and written",
)


@dataclass(frozen=True)
class Shape:
    """The mesh measured: ``services`` × ``instances`` sidecars, ``calls`` routes out of each service."""

    services: int = 1000
    instances: int = 10
    calls: int = 5

    @property
    def sidecars(self) -> int:
        return self.services * self.instances

    @property
    def routes(self) -> int:
        return self.services * min(self.calls, self.services - 1)


@dataclass(frozen=True)
class Settings:
    """How much of each measurement: repeats, pushes, certificates."""

    repeat: int = 5  # runs of each larger measurement (median)
    checks: int = 20000  # calls per policy measurement (median of 5 runs)
    sidecars: int = 4  # real sidecars the pushes and reloads go to
    pushes: int = 40  # pushes one at a time (bounded by ``budget`` seconds too)
    burst: int = 32  # pushes at once to the real sidecars
    fan_out: tuple[int, ...] = (2000,)  # sidecars the real _publish pushes to at once, a run each
    certs: int = 50  # certificates issued per rate
    rotate: int = 16  # instances the real CA rotation goes over
    budget: float = 20.0  # seconds at most for pushes, reloads, and the rounds of each fan-out

    policy_sizes: tuple[int, ...] = (100, 1000, 10000)

    @classmethod
    def quick(cls) -> Settings:
        return cls(repeat=3, checks=5000, sidecars=2, pushes=6, burst=8, fan_out=(200,), certs=5, rotate=4,
                   budget=5.0, policy_sizes=(100, 1000))


@dataclass
class Row:
    section: str
    name: str
    value: float
    unit: str
    note: str = ""


@dataclass
class Report:
    shape: Shape
    settings: Settings
    rows: list[Row] = field(default_factory=list)

    def add(self, section: str, name: str, value: float, unit: str, note: str = "") -> float:
        self.rows.append(Row(section, name, value, unit, note))
        return value

    def value(self, name: str) -> float:
        """The first row called ``name``."""
        return next(r.value for r in self.rows if r.name == name)


# the mesh


def service_names(count: int) -> list[str]:
    return [f"svc-{i:05d}" for i in range(count)]


def route_tables(names: list[str], calls: int, seed: int = 1) -> list[dict[str, Any]]:
    """The ``[[routes]]`` entries as mesh.toml holds them (see `ASSUMPTIONS`)."""
    rng = random.Random(seed)
    tables: list[dict[str, Any]] = []
    for i, source in enumerate(names):
        for j in rng.sample(range(len(names) - 1), min(calls, len(names) - 1)):
            to = names[j if j < i else j + 1]
            table: dict[str, Any] = {"from": source, "to": to}
            if len(tables) % 5 == 3:
                table.update(paths=[f"/api/{to}/*"], methods=["GET", "HEAD"])
            elif len(tables) % 5 == 4:
                table.update(paths=[f"/api/{to}/orders/*", f"/api/{to}/items/*"], timeout="2s")
            tables.append(table)
    return tables


def mesh_toml(shape: Shape) -> str:
    names = service_names(shape.services)
    out = ['[mesh]\nname = "scale"\n']
    for name in names:
        out.append(f'[services.{name}]\ncommand = "app"\nport = 8000\nhealth = "/healthz"\n'
                   f"replicas = {shape.instances}\n")
    for table in route_tables(names, shape.calls):
        out.append("[[routes]]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items()))
    return "\n".join(out)


def route_configs(tables: list[dict[str, Any]]) -> list[RouteConfig]:
    """The entries as `mesh.config.load` makes them, without the TOML (for tables larger than the mesh's)."""
    return [RouteConfig(source=t["from"], to=t["to"], paths=t.get("paths", []), methods=t.get("methods", []),
                        timeout=Duration(2) if "timeout" in t else None) for t in tables]


def plan(config: MeshConfig) -> list[Instance]:
    """Every instance of the mesh, each with an address of its own."""
    planned: list[Instance] = []
    for name, spec in config.services.items():
        for index in range(1, spec.replicas + 1):
            n = len(planned) + 1
            planned.append(Instance(name, index, instance_label(name, spec, index, spec.replicas),
                                    f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}",
                                    {"app": 8000, "mesh": 15001, "outbound": 15002, "admin": 15000},
                                    spec.health))
    return planned


def changed(registry: dict[str, list[str]]) -> bytes:
    """The registry with one instance out of rotation, as `_publish` serialises it."""
    first = next(name for name, addresses in registry.items() if addresses)
    return json.dumps({"services": {**registry, first: registry[first][1:]}}, sort_keys=True).encode()


def oversized() -> bytes:
    """A registry just over `PUSH_LIMIT`: services of 10 instances, addressed like the mesh's."""
    names = service_names(PUSH_LIMIT // 200 + 10)  # a service of 10 takes about 210 bytes
    return json.dumps({"services": {name: [f"10.0.{i % 256}.{n}:15001" for n in range(10)]
                                    for i, name in enumerate(names)}}, sort_keys=True).encode()


# timing


def per_call(fn: Callable[[], Any], number: int = 1, repeat: int = 5) -> float:
    """Seconds per call of ``fn``: the median of ``repeat`` runs of ``number`` calls."""
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - start) / number)
    return statistics.median(runs)


async def per_await(fn: Callable[[], Awaitable[Any]], repeat: int = 5) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """mesh's loggers at INFO into /dev/null, in the format `mesh.runner.setup_logging` gives them."""
    logger = logging.getLogger("mesh")
    saved = logger.level, logger.propagate
    with open(os.devnull, "w") as sink:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]


# what every sidecar and the controller pay at start


def measure_start(report: Report, folder: Path) -> MeshConfig:
    shape, section = report.shape, "start, per sidecar"
    path = folder / "mesh.toml"
    path.write_text(mesh_toml(shape))
    report.add(section, "mesh.toml size", path.stat().st_size / 1e3, "kB",
               f"{shape.services:,} services, {shape.routes:,} routes")
    started = time.perf_counter()
    config = load(path)
    report.add(section, "mesh.config.load", (time.perf_counter() - started) * 1e3, "ms",
               "every sidecar and the controller, at start")
    report.add(section, "Policy build", per_call(lambda: Policy(config.routes), repeat=3) * 1e3, "ms",
               "every route of the mesh, in every sidecar")
    tracemalloc.start()
    policy = Policy(config.routes)
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del policy
    report.add(section, "Policy memory", size / 1e6, "MB", "traced by tracemalloc")
    callers: dict[str, set[str]] = {}
    for route in config.routes:
        callers.setdefault(route.to, set()).add(route.source)
    mean = statistics.mean(len(callers.get(name, ())) for name in config.services)
    report.add(section, "services calling a service", mean, "", "mean; their sidecars need its instances")
    source = next(iter(config.services))
    report.add(section, "Outbound build", per_call(lambda: Outbound(config, source), repeat=3) * 1e3, "ms",
               "services × routes comparisons")
    report.add(section, "Sidecar(...) build", per_call(lambda: Sidecar(config, source, Ports(app=8000)),
                                                        repeat=3) * 1e3, "ms", "the two above and the rest")
    return config


# the controller: the registry built, serialised, written, published


async def measure_controller(report: Report, config: MeshConfig) -> None:
    settings, section = report.settings, "controller, per change"
    controller = Controller(config, "process", console=Console(io.StringIO()))
    controller.files.make()
    planned = plan(config)
    controller.instances.add(*planned)
    for inst in planned:
        controller.runtime._mark_ready(inst)  # running, as far as the controller can tell
    registry = controller.registry()
    body = json.dumps({"services": registry}, sort_keys=True)
    report.add(section, "instances in the registry", sum(map(len, registry.values())), "")
    report.add(section, "registry() build", per_call(controller.registry, repeat=settings.repeat) * 1e3, "ms")
    report.add(section, "json.dumps of the registry",
               per_call(lambda: json.dumps({"services": registry}, sort_keys=True), repeat=settings.repeat) * 1e3,
               "ms")
    size = report.add(section, "push body", len(body.encode()) / 1e3, "kB", "the whole registry, every push") * 1e3
    report.add(section, "bytes per instance", size / len(planned), "B")
    name = next(iter(registry))
    report.add(section, "one service's entry", len(json.dumps({"services": {name: registry[name]}})), "B",
               "what a push of the one service that changed would carry")
    report.add(section, "registry.json write",
               per_call(lambda: controller.files.write_json(controller.files.registry, json.loads(body)),
                        repeat=settings.repeat) * 1e3, "ms")
    report.add(section, "state.json write (InstanceSet.save)",
               per_call(controller.instances.save, repeat=settings.repeat) * 1e3, "ms",
               f"{controller.files.state.stat().st_size / 1e6:.1f} MB; after every start and health change")
    # Nothing changed: every sidecar took the last registry, one string equal to (not the same as) a new one.
    taken = (body + " ")[:-1]
    controller.instances.pushed.update({inst.label: taken for inst in planned})
    report.add("controller, every second", "_publish() with nothing to push",
               await per_await(controller._publish, settings.repeat) * 1e3, "ms",
               "registry, dumps, and one comparison of the body per sidecar")
    for count in settings.fan_out:
        await measure_publish(report, controller, planned[:count], body)
    await with_sidecars(report, controller, registry, body)


class Sink(asyncio.Protocol):
    """An admin listener that takes any PUT whole and answers 204, parsing nothing."""

    def connection_made(self, transport: Any) -> None:
        self.transport, self.data, self.length = transport, bytearray(), -1

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.length < 0 and (end := self.data.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.data[:end]).lower()
            self.length = end + 4 + int(head.split(b"content-length:")[1].split(b"\r\n")[0])
        if 0 <= self.length <= len(self.data):
            self.transport.write(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
            self.transport.close()


async def measure_publish(report: Report, controller: Controller, fresh: list[Instance], body: str) -> None:
    """The real `_publish` to ``fresh`` sidecars at once (as when they restarted), each behind a `Sink`.

    Round after round, as the controller tries again every second, until each took it (at most
    5 rounds, and ``budget`` seconds)."""
    section = f"controller, a push to {len(fresh):,} sidecars at once (real _publish)"
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Sink, "127.0.0.1", 0, backlog=4096) for _ in range(8)]
    saved = {inst.label: dict(inst.ports) for inst in fresh}
    pushed = controller.instances.pushed
    try:
        for i, inst in enumerate(fresh):
            inst.ports["admin"] = servers[i % len(servers)].sockets[0].getsockname()[1]
            pushed.pop(inst.label, None)
        rounds: list[tuple[float, float, int]] = []  # wall, CPU, how many hold it after the round
        deadline = time.monotonic() + report.settings.budget
        while len(rounds) < 5 and time.monotonic() < deadline:
            wall, cpu = time.perf_counter(), time.process_time()
            await controller._publish()
            took = sum(pushed.get(inst.label) == body for inst in fresh)
            rounds.append((time.perf_counter() - wall, time.process_time() - cpu, took))
            if took == len(fresh):
                break
        wall, cpu, took = rounds[0]
        report.add(section, "first round: wall", wall, "s")
        report.add(section, "first round: took it", took, "",
                   f"answered 204 within the {PUSH_TIMEOUT:g} s timeout; the rest are tried again")
        report.add(section, "controller CPU per push", cpu / len(fresh) * 1e3, "ms",
                   "connect, write head and body, read the status (the sinks' reading included)")
        done = rounds[-1][2] == len(fresh)
        report.add(section, "rounds until every one took it", len(rounds) if done else 0, "",
                   ("" if done else "0: never; ") + "; ".join(f"{w:.2f} s → {t:,}" for w, _, t in rounds))
    finally:
        for inst in fresh:
            inst.ports.update(saved[inst.label])
            pushed[inst.label] = body
        for server in servers:
            server.close()
            await server.wait_closed()


# real sidecars: pushes, health checks, certificate reloads


async def with_sidecars(report: Report, controller: Controller, registry: dict[str, list[str]], body: str) -> None:
    config = controller.config
    sidecars: list[Sidecar] = []
    targets: list[Instance] = []
    try:
        for name in list(config.services)[:report.settings.sidecars]:
            label = f"{name}.bench"
            tls = controller.instances.certificate(label, name)
            sidecar = Sidecar(config, name, Ports(app=8000), registry=Registry(registry),
                              identity=Identity(tls, config.name), admin_token=controller.admin_token.value)
            await sidecar.start()
            sidecars.append(sidecar)
            port = int(sidecar.addresses()["admin"].rsplit(":", 1)[1])
            targets.append(Instance(name, 1, label, "127.0.0.1", {"admin": port}, tls=tls))
        await measure_apply(report, sidecars[0], registry, body)
        await measure_pushes(report, controller, targets, registry, body)
        await measure_certificates(report, controller, targets)
    finally:
        for sidecar in sidecars:
            await sidecar.stop()


async def measure_apply(report: Report, sidecar: Sidecar, registry: dict[str, list[str]], body: str) -> None:
    """A sidecar's side of a push, without HTTP: its admin handler, then the balancer's refresh."""
    section = "sidecar, per push"
    bodies = [body.encode(), changed(registry)]
    handler, refresh = [], []
    target = next(name for name in registry if name != sidecar.service)
    for i in range(2 * report.settings.repeat):
        request = Request("PUT", "/registry", body=bodies[i % 2])
        started = time.perf_counter()
        response = await sidecar.admin.put_registry(request)
        handler.append(time.perf_counter() - started)
        assert response.status == 204, response.status
        started = time.perf_counter()
        sidecar.balancer.pick(target)
        refresh.append(time.perf_counter() - started)
    spent = report.add(section, "PUT /registry handler", statistics.median(handler) * 1e3, "ms",
                       "json.loads, Registry.update, the log line; the sidecar serves nothing meanwhile")
    spent += report.add(section, "Balancer refresh", statistics.median(refresh) * 1e3, "ms",
                        "at the next request: every service's backends again")
    report.add(section, "apply in all", spent, "ms")
    line = " ".join(f"{name}={len(addresses)}" for name, addresses in sidecar.registry.as_dict().items())
    report.add(section, "its log line", len(line) / 1e3, "kB", "'registry updated: ...' at INFO, every push")


async def measure_pushes(report: Report, controller: Controller, targets: list[Instance],
                         registry: dict[str, list[str]], body: str) -> None:
    settings, section = report.settings, "push over HTTP to real sidecars"
    runtime = controller.runtime
    bodies = [body.encode(), changed(registry)]
    walls: list[float] = []
    failed = 0
    cpu, deadline = time.process_time(), time.monotonic() + settings.budget
    while len(walls) < settings.pushes and time.monotonic() < deadline:
        started = time.perf_counter()
        failed += not await runtime.push_registry(targets[len(walls) % len(targets)], bodies[len(walls) % 2])
        walls.append(time.perf_counter() - started)
    report.add(section, "pushes, one at a time", len(walls), "", f"{failed} not answered 204")
    report.add(section, "wall per push", statistics.median(walls) * 1e3, "ms",
               f"median; max {max(walls) * 1e3:.1f} ms; the controller gives up after {PUSH_TIMEOUT:g} s")
    report.add(section, "CPU per push, both ends", (time.process_time() - cpu) / len(walls) * 1e3, "ms",
               "the controller's client, the sidecar's listener and handler")
    started = time.perf_counter()
    results = await asyncio.gather(*(runtime.push_registry(targets[i % len(targets)], bodies[i % 2])
                                     for i in range(settings.burst)))
    wall = time.perf_counter() - started
    report.add(section, f"{settings.burst} pushes at once: answered 204", sum(r is True for r in results), "",
               f"to {len(targets)} sidecars, in {wall:.2f} s")
    report.add(section, "pushes per second, both ends on one core", settings.burst / wall, "/s")
    big = oversized()
    assert len(big) > PUSH_LIMIT
    status = await http_status(targets[0].ports["admin"], "/registry", timeout=10.0, method="PUT", body=big,
                               headers=controller.admin_token.headers())
    report.add(section, f"a push of {len(big) / 1e6:.2f} MB: status", status or 0, "",
               f"PUT /registry reads at most {PUSH_LIMIT:,} bytes")
    await runtime.push_registry(targets[0], bodies[0])
    count = 5 * settings.pushes
    cpu = time.process_time()
    for i in range(count):
        await http_status(targets[i % len(targets)].ports["admin"], "/healthz")
    report.add("controller, health checks", "a health check, CPU of both ends",
               (time.process_time() - cpu) / count * 1e3, "ms", "a GET on a connection of its own")


async def measure_certificates(report: Report, controller: Controller, targets: list[Instance]) -> None:
    settings, section = report.settings, "certificates"
    report.add(section, "CA.create", per_call(lambda: CA.create("scale"), repeat=3) * 1e3, "ms")
    ca = CA.load_or_create(controller.files.path / "ca", controller.config.name)
    report.add(section, "CA.issue", 1 / per_call(lambda: ca.issue("svc-00000", 86400.0), settings.certs, 1),
               "certs/s", "key pair, signature, PEM")
    service = targets[0].service
    numbers = iter(range(1 << 30))
    report.add(section, "InstanceSet.certificate", 1 / per_call(
        lambda: controller.instances.certificate(f"{service}.{next(numbers)}", service), settings.certs, 1),
        "certs/s", "the controller's way: loads the CA from disk, issues, writes 3 files")
    identity = Identity(targets[0].tls or Path(), controller.config.name)
    report.add(section, "Identity.reload", per_call(identity.reload, settings.certs, 1) * 1e3, "ms",
               "in the sidecar: two fresh TLS contexts")
    walls: list[float] = []
    deadline = time.monotonic() + settings.budget
    while len(walls) < settings.certs and time.monotonic() < deadline:
        started = time.perf_counter()
        ok = await controller.runtime.reload_certificates(targets[len(walls) % len(targets)])
        assert ok, "POST /certs/reload was not answered 204"
        walls.append(time.perf_counter() - started)
    report.add(section, "POST /certs/reload, wall", statistics.median(walls) * 1e3, "ms",
               "the controller awaits each sidecar in turn")
    folders = {t.label: (t.service, t.tls or Path()) for t in targets}
    for i in range(len(folders), settings.rotate):
        folders[f"{service}.r{i}"] = (service, controller.instances.certificate(f"{service}.r{i}", service))
    # Each label's reload goes to a real sidecar: its own, or one of them in turn.
    sidecar_of = {label: targets[i % len(targets)] for i, label in enumerate(folders)}

    async def reload(label: str) -> None:
        await controller.runtime.reload_certificates(sidecar_of[label])

    started = time.perf_counter()
    await rotate_ca(controller.files.path / "ca", controller.config.name, folders, 86400.0, reload)
    report.add(section, "rotate_ca, per instance", (time.perf_counter() - started) / len(folders) * 1e3, "ms",
               f"over {len(folders)}: trust, issue, forget, three reloads of each, one after another")


# policy per request


def measure_policy(report: Report) -> None:
    for size in sorted({*report.settings.policy_sizes, report.shape.routes}):
        measure_policy_at(report, size)


def measure_policy_at(report: Report, size: int) -> None:
    calls, number = report.shape.calls, report.settings.checks
    names = service_names(max(-(-size // calls), calls + 1))
    tables = route_tables(names, calls)[:size]
    routes = route_configs(tables)
    section = f"policy at {len(routes):,} routes"
    report.add(section, "Policy build", per_call(lambda: Policy(routes), repeat=3) * 1e3, "ms")
    policy = Policy(routes)
    any_route = next(t for t in tables if "paths" not in t)
    get_only = next((t for t in tables if "methods" in t), any_route)
    two_paths = next((t for t in tables if "timeout" in t), any_route)
    called = {t["to"] for t in tables if t["from"] == names[0]}
    stranger = next((n for n in names[1:] if n not in called), None)
    cases = {
        "allowed, any call": (any_route["from"], any_route["to"], "POST", "/v1/anything"),
        "allowed, method and path": (get_only["from"], get_only["to"], "GET", f"/api/{get_only['to']}/x/1"),
        "allowed, second path pattern": (two_paths["from"], two_paths["to"], "GET", f"/api/{two_paths['to']}/items/7"),
        "denied, path (logged)": (get_only["from"], get_only["to"], "GET", "/admin"),
        "denied, no route (logged)": (names[0], stranger, "GET", "/"),
    }
    for name, (source, target, method, path) in cases.items():
        if target is None or (name.startswith("denied, path") and get_only is any_route):
            continue  # a table too small to hold such a route
        assert policy.check(source, target, method, path).allowed is name.startswith("allowed"), name

        def check(source: str = source, target: str = target, method: str = method, path: str = path) -> None:
            policy.check(source, target, method, path)

        report.add(section, f"check: {name}", per_call(check, number) * 1e6, "µs")
    if size * len(names) > 2e7:  # Outbound's build compares services × routes: minutes beyond
        return
    config = MeshConfig(path=Path("mesh.toml"), name="scale", plugin_path=[],
                        services={n: ServiceConfig(command="app", name=n) for n in names}, routes=routes)
    source, target, path = two_paths["from"], two_paths["to"], f"/api/{two_paths['to']}/items/7"
    report.add(section, "Outbound build", per_call(lambda: Outbound(config, source), repeat=1) * 1e3, "ms",
               f"{len(names):,} services")
    outbound = Outbound(config, source)
    report.add(section, "Outbound.lookup", per_call(lambda: outbound.lookup(target, "GET", path), number) * 1e6, "µs")


# the mesh at full size, from the measured parts


def scale_up(report: Report) -> None:
    sidecars = report.shape.sidecars
    section = f"at {sidecars:,} sidecars (computed from the above)"
    sent = report.add(section, "bytes per change", sidecars * report.value("push body") / 1e6, "GB",
                      "the whole registry to each sidecar")
    for link, rate in LINKS.items():
        report.add(section, f"sending them on a {link} link", sent * 1e9 / rate, "s",
                   f"each push has {PUSH_TIMEOUT:g} s")
    report.add(section, "controller memory while pushing", sent, "GB", "_publish encodes the body once per sidecar")
    entry = report.value("one service's entry")
    report.add(section, "with deltas: bytes per change", sidecars * entry / 1e6, "MB",
               "the changed service's entry to every sidecar")
    told = report.value("services calling a service") * report.shape.instances
    report.add(section, "with subscriptions: sidecars told of a change", told, "",
               "the sidecars of the services that call the one that changed")
    report.add(section, "with deltas and subscriptions: bytes per change", told * entry / 1e3, "kB")
    push = report.value("controller CPU per push") / 1e3
    serialise = (report.value("registry() build") + report.value("json.dumps of the registry")) / 1e3
    report.add(section, "controller CPU per change", serialise + sidecars * push, "s",
               "serialised once, pushed to each")
    report.add(section, "pushes one core makes in 1 s", PUSH_TIMEOUT / push, "",
               "about; all start at once, so beyond it most time out together")
    report.add(section, "sidecar CPU per change, all sidecars", sidecars * report.value("apply in all") / 1e3, "s",
               "each sidecar's handler and refresh")
    idle = report.value("_publish() with nothing to push")
    report.add(section, "idle _publish beyond registry() and dumps", idle - serialise * 1e3, "ms",
               "_publish with nothing to push: running(), one comparison of the whole body per sidecar")
    health = sidecars / HEALTH_EVERY * report.value("a health check, CPU of both ends") / 1e3
    report.add(section, "controller busy with no change", idle / 1e3 + health, "cores",
               f"_publish every second, each instance checked every {HEALTH_EVERY:g} s")
    per_instance = report.value("apply in all") / 1e3 / report.value("instances in the registry")
    report.add(section, "instances at which one apply takes 1 s", 1 / per_instance, "",
               "its push then times out, again every second")
    report.add(section, "instances at which the body passes 1 MiB", PUSH_LIMIT / report.value("bytes per instance"),
               "", "every push refused from then on")
    start = report.value("mesh.config.load") + report.value("Sidecar(...) build")
    report.add(section, "CPU to start every sidecar", sidecars * start / 1e3, "s", "each loads mesh.toml and builds")
    report.add(section, "state.json writes while the mesh starts", sidecars * report.value(
        "state.json write (InstanceSet.save)") / 1e3, "s", "a full write after each instance starts")
    report.add(section, "renewing every certificate: issuing", sidecars / report.value("InstanceSet.certificate"),
               "s", "in the controller's event loop, which runs nothing else meanwhile")
    report.add(section, "renewing every certificate: reloads",
               sidecars * report.value("POST /certs/reload, wall") / 1e3, "s", "one sidecar after another")
    report.add(section, "rotating the CA", sidecars * report.value("rotate_ca, per instance") / 1e3, "s")


# running it


def measure(shape: Shape, settings: Settings) -> Report:
    """Every measurement, into one `Report`; its last block scales them to the whole mesh."""
    report = Report(shape, settings)
    with quiet_logs(), tempfile.TemporaryDirectory(prefix="mesh-scale-") as tmp:
        config = measure_start(report, Path(tmp))
        run_loop(measure_controller(report, config))
        measure_policy(report)
    scale_up(report)
    return report


def machine() -> str:
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs ({model}), load average {load}, Python {platform.python_version()}"


def format_value(value: float) -> str:
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def render(report: Report, heading: str, markdown: bool = False) -> str:
    shape = report.shape
    lines = [f"mesh scale: {shape.services:,} services × {shape.instances} instances = {shape.sidecars:,} sidecars, "
             f"{shape.routes:,} routes; {heading}", "assumptions:", *(f"  - {a}" for a in ASSUMPTIONS)]
    width = max(len(r.name) for r in report.rows)
    section = None
    for row in report.rows:
        if row.section != section:
            section = row.section
            lines += ["", f"**{section}**", "", "| measure | value | unit | note |", "| --- | ---: | --- | --- |"] \
                if markdown else ["", section]
        value = format_value(row.value)
        lines.append(f"| {row.name} | {value} | {row.unit} | {row.note} |" if markdown
                     else f"  {row.name:<{width}}  {value:>10} {row.unit:<7} {row.note}".rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--services", type=int, help="services in the mesh (default 1000; 100 with --quick)")
    parser.add_argument("--instances", type=int, default=10, help="instances of each (default %(default)s)")
    parser.add_argument("--calls", type=int, default=5, help="routes out of each service (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a smaller mesh and fewer repeats")
    parser.add_argument("--fan-out", metavar="N[,N...]",
                        help="sidecars the real _publish pushes to at once, a run for each N (default 2000; 200 "
                             "with --quick; two sockets each, so at most half the open-files limit)")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    shape = Shape(args.services or (100 if args.quick else 1000), args.instances, args.calls)
    if shape.services < 2 or shape.instances < 1 or shape.calls < 1:
        parser.error("expected at least 2 services, 1 instance and 1 call")
    settings = Settings.quick() if args.quick else Settings()
    most = min((resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 500) // 2, shape.sidecars)
    if args.fan_out:
        counts = tuple(int(n) for n in args.fan_out.split(",") if n.strip().isdigit())
        if not counts or not all(1 <= n <= most for n in counts):
            parser.error(f"--fan-out: expected numbers from 1 to {most} (the sidecars, and open files)")
        settings = replace(settings, fan_out=counts)
    else:
        settings = replace(settings, fan_out=tuple(min(n, most) for n in settings.fan_out))
    heading = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; {machine()}"
    report = measure(shape, settings)
    print(render(report, heading, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps({"heading": heading, "shape": asdict(shape),
                                               "settings": asdict(settings), "assumptions": ASSUMPTIONS,
                                               "rows": [asdict(r) for r in report.rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
