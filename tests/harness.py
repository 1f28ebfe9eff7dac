"""Meshes under test: small apps, free ports, waiting, and whole meshes brought up and torn down.

- ``free_port()``; ``fetch(url, ...)``, one request past any proxy, its answer (an HTTP error's too,
  status 0 when none came); ``Load``, a bounded load of GETs from threads; ``eventually`` and
  ``wait_until``, to wait for a condition (async and blocking) instead of sleeping.
- App snippets: ``app(code)`` makes the source of a tiny HTTP app served on ``$PORT``, and the apps
  the tests write into their meshes' folders (``ENV_APP``, ``KEYED_APP``, ...); ``App``, an aiohttp
  app a test steers as it goes, and ``cluster``, `run_mesh` with several sidecars per service.
- ``Mesh``: a named mesh's mesh.toml and apps in a folder; `mesh` commands against it (``up`` in the
  foreground, ``run("up", "-d")``, ``ps()``), its state and admin token, or a controller run in this
  process (``start``/``stop``). It records every pid, process group and run id it meets, and on the
  docker runtime every container, network and image of the mesh; ``cleanup()`` kills the controller
  it started and all of those, by what it recorded, never by a name pattern.
- Fixtures (tests/conftest.py makes them visible everywhere): ``make_mesh(name, toml, app, ...)``,
  whose meshes are cleaned up when the test ends, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from aiohttp import web

from mesh import config
from mesh.control.controller import Console, Controller
from mesh.control.runtimes.loopback import free_ports
from mesh.control.runtimes.procfs import group_alive, pid_alive, run_processes
from mesh.control.state import StateDir
from mesh.sidecar.admin import operator_token
from mesh.sidecar.identity import Identity
from mesh.sidecar.resilience import DEADLINE_HEADER
from mesh.sidecar.sidecar import Ports, Sidecar
from mesh.testing import run_mesh

from .docker_support import Leftovers

# --- ports, requests, waiting ----------------------------------------------------------------------

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A free loopback port, below the ephemeral range: no connection's source port takes it meanwhile."""
    return free_ports(1)[0]


class Answer(NamedTuple):
    status: int  # 0: no answer came (the error is in ``body``)
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def fetch(url: str, *, method: str | None = None, data: bytes | None = None,
          headers: Mapping[str, str] | None = None, timeout: float = 60) -> Answer:
    """One request to ``url``, past any proxy; an HTTP error is an answer like any other."""
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with NO_PROXY.open(request, timeout=timeout) as response:
            return Answer(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers), error.read())
    except OSError as error:
        return Answer(0, {}, repr(error).encode())


Message = str | Callable[[], str]


async def eventually(condition: Callable[[], Any], *, timeout: float = 30.0, every: float = 0.02,
                     what: Message = "") -> float:
    """Wait until ``condition()`` (a value, or an awaitable of one) is true; return how long it took.

    The bound is generous enough for a slow, busy machine; ``what`` (or what it returns) says what
    was not true when it runs out.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return loop.time() - started
        if loop.time() - started > timeout:
            raise AssertionError(f"not true within {timeout:g}s: {_said(what) or condition}")
        await asyncio.sleep(every)


def wait_until(condition: Callable[[], Any], *, timeout: float = 30.0, every: float = 0.05,
               what: Message = "") -> float:
    """`eventually` for code that blocks: wait until ``condition()`` is true; return how long it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not true within {timeout:g}s: {_said(what) or condition}")
        time.sleep(every)
    return time.monotonic() - started


def _said(what: Message) -> str:
    return what() if callable(what) else what


# --- apps ------------------------------------------------------------------------------------------

_APP_BASE = '''
import hashlib, json, os, shutil, socket, sys, threading, time, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class Base(BaseHTTPRequestHandler):
    def reply(self, status, body, content_type=None):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

'''


def app(code: str, *, host: str = "127.0.0.1") -> str:
    """The source of a small HTTP app: ``code`` defines ``Handler(Base)`` (``self.reply(status, body)``
    answers) and whatever runs before it serves on ``host``:$PORT."""
    return (_APP_BASE + textwrap.dedent(code)
            + f'\nThreadingHTTPServer(("{host}", int(os.environ["PORT"])), Handler).serve_forever()\n')


# What the app sees (environment, `python`, working folder, the caller); EXIT_AFTER seconds, it exits.
ENV_APP = app('''
    KEYS = ["PORT", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "MESH_SERVICE",
            "MESH_INSTANCE", "COLOUR"]

    class Handler(Base):
        def do_GET(self):
            self.reply(200, json.dumps({"env": {k: os.environ.get(k) for k in KEYS},
                                        "python": shutil.which("python"), "cwd": os.getcwd(),
                                        "peer": self.headers.get("x-mesh-peer")}).encode())

    if os.environ.get("EXIT_AFTER"):
        code = int(os.environ.get("EXIT_CODE", "4"))
        threading.Timer(float(os.environ["EXIT_AFTER"]), lambda: os._exit(code)).start()
    print("app", os.environ["MESH_SERVICE"], os.environ["MESH_INSTANCE"], "serving", flush=True)
''')

# Who answered (host, pid, service, the X-Session key, the caller); /call: the keyed service "sandbox".
KEYED_APP = app('''
    class Handler(Base):
        def do_GET(self):
            if self.path == "/call":  # to the keyed service, by name, through this instance's sidecar
                request = urllib.request.Request("http://sandbox/",
                                                 headers={"X-Session": self.headers.get("x-session", "")})
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        return self.reply(response.status, response.read())
                except urllib.error.HTTPError as error:
                    return self.reply(error.code, error.read())
            self.reply(200, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                        "service": os.environ["MESH_SERVICE"],
                                        "session": self.headers.get("x-session"),
                                        "peer": self.headers.get("x-mesh-peer")}).encode())
''')

_BURN = '''
    class Handler(Base):
        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/healthz":
                return self.reply(200, b"ok")
            end = time.process_time() + int(parse_qs(url.query).get("ms", ["0"])[0]) / 1000
            while time.process_time() < end:   # burn CPU
                pass
            self.reply(200, os.environ["MESH_INSTANCE"].encode())
'''
# GET /burn?ms=N burns N ms of CPU, then answers its instance's number.
BURN_APP = app(_BURN)
DOCKER_BURN_APP = app(_BURN, host="0.0.0.0")

# Names itself service.instance, writes its pid to pids/<name>; POST /sick and /well turn /healthz.
HEALTH_APP = app('''
    NAME = f"{os.environ['MESH_SERVICE']}.{os.environ['MESH_INSTANCE']}"
    os.makedirs("pids", exist_ok=True)
    with open(f"pids/{NAME}", "w") as f:
        f.write(str(os.getpid()))
    sick = threading.Event()

    class Handler(Base):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path == "/healthz":
                return self.reply(500 if sick.is_set() else 200, b"sick" if sick.is_set() else b"ok")
            self.reply(200, NAME.encode())

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/sick":
                sick.set()
            elif self.path == "/well":
                sick.clear()
            self.reply(200, NAME.encode())
''')

# `python echo.py NAME`: echoes, uploads and downloads big bodies, calls and relays by name (HTTP_PROXY).
ECHO_APP = app('''
    NAME = sys.argv[1]

    class Handler(Base):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path == "/healthz":
                return self.reply(200, b"ok", "text/plain")
            if self.path.startswith("/big"):
                return self.reply(200, b"d" * (32 << 20), "application/octet-stream")
            if self.path.startswith("/call/"):
                # Through HTTP_PROXY, by name: urllib honours the environment. The trace goes on, as an
                # instrumented app passes it.
                target = self.path[len("/call/"):]
                headers = {"traceparent": self.headers["traceparent"]} if "traceparent" in self.headers else {}
                try:
                    with urllib.request.urlopen(urllib.request.Request(f"http://{target}", headers=headers),
                                                timeout=20) as r:
                        return self.reply(r.status, r.read(), "text/plain")
                except urllib.error.HTTPError as e:
                    return self.reply(e.code, e.read(), "text/plain")
            self.reply(200, f"{NAME} {self.path} peer={self.headers.get('x-mesh-peer')}".encode(), "text/plain")

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path.startswith("/relay/"):
                request = urllib.request.Request(f"http://{self.path[len('/relay/'):]}", data=body, method="POST")
                with urllib.request.urlopen(request, timeout=20) as r:
                    return self.reply(r.status, r.read(), "text/plain")
            self.reply(200, f"{NAME} got {len(body)} {hashlib.sha256(body).hexdigest()}".encode(), "text/plain")
''')

# For the docker runtime, on every address on purpose (the namespace's firewall, not the bind, must keep
# others out): what it sees; /call/<path>: GET back/<path> through its sidecar; EXIT_AT_ONCE: exit 3.
DOCKER_APP = app('''
    KEYS = ["PORT", "HTTP_PROXY", "NO_PROXY", "MESH_SERVICE", "MESH_INSTANCE", "COLOUR"]

    class Handler(Base):
        def do_GET(self):
            if self.path == "/healthz":
                return self.reply(200, b"ok")
            if self.path.startswith("/call/"):  # through this instance's sidecar, by name
                try:
                    with urllib.request.urlopen("http://back/" + self.path[6:], timeout=10) as response:
                        return self.reply(response.status, response.read())
                except urllib.error.HTTPError as error:
                    return self.reply(error.code, error.read())
            self.reply(200, json.dumps({"path": self.path, "peer": self.headers.get("x-mesh-peer"),
                                        "env": {k: os.environ.get(k) for k in KEYS}}).encode())

    if os.environ.get("EXIT_AT_ONCE"):
        print("boom: this app gives up at once", flush=True)
        sys.exit(3)
    print(os.environ["MESH_SERVICE"], "listening on 0.0.0.0:%d" % int(os.environ["PORT"]), flush=True)
''', host="0.0.0.0")

DOCKERFILE = 'FROM mesh/base\nCOPY app.py /app/\nCMD ["python3", "/app/app.py"]\n'


def docker_build(source: str, folder: str = "app") -> dict[str, str]:
    """The files of a ``build = "app"`` service: a Dockerfile FROM mesh/base and the app."""
    return {f"{folder}/Dockerfile": DOCKERFILE, f"{folder}/app.py": source}


# Run in an app container, which shares its sidecar's namespace: what untrusted code would try against
# the sidecar's admin listener (argv: the sidecar's other addresses). Prints what it found, as JSON.
ATTACK = r"""
import json, os, socket, sys
found = {"uid": os.getuid(), "token file": os.path.exists("/mesh/admin.token")}
for host in ["127.0.0.1"] + sys.argv[1:]:
    for method, path, body in (("GET", "/config", b""), ("PUT", "/registry", b'{"services": {}}')):
        try:
            with socket.create_connection((host, 15000), timeout=5) as sock:
                sock.sendall(("%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                              % (method, path, len(body))).encode() + body)
                found[f"{method} {host}"] = sock.recv(100).decode("latin-1").split("\r\n")[0] or "closed"
        except OSError as exc:
            found[f"{method} {host}"] = type(exc).__name__
try:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
    found["raw socket"] = "open"
except OSError as exc:
    found["raw socket"] = type(exc).__name__
print(json.dumps(found))
"""


class Load:
    """A bounded load: ``clients`` threads GET ``url`` until stopped, ``seconds`` have passed or
    ``requests`` were sent in all; ``sent`` counts them."""

    def __init__(self, url: str, *, requests: int, seconds: float, clients: int = 3, timeout: float = 60) -> None:
        self.url, self.requests, self.seconds, self.timeout = url, requests, seconds, timeout
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            with self._lock:
                if self.sent >= self.requests:
                    return
                self.sent += 1
            fetch(self.url, timeout=self.timeout)

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop, and wait for the requests under way."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout)


# --- in-process meshes (`run_mesh`) ----------------------------------------------------------------

def routed_toml(name: str = "res", *, target: str = "api", route: str = "", defaults: str = "",
                web: str = "", services: str = "") -> str:
    """A mesh.toml of two services for `run_mesh`, web and ``target``, and a route from web to it;
    each argument is more TOML, added where its name says."""
    return f"""
[mesh]
name = "{name}"
{defaults}

[services.web]
command = "x"
{web}

[services.{target}]
command = "x"
{services}

[[routes]]
from = "web"
to = "{target}"
{route}
"""


class App:
    """One app instance: counts hits, answers ``status`` (after ``fail_first`` 503s), waits ``delay``."""

    def __init__(self, name: str, *, status: int = 200, delay: float = 0.0, fail_first: int = 0) -> None:
        self.name = name
        self.status = status
        self.delay = delay
        self.fail_first = fail_first
        self.hits = 0
        self.bodies: list[bytes] = []
        self.deadlines: list[int] = []
        self.extra: Callable[[web.Request], Awaitable[web.Response]] | None = None

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            self.bodies.append(await request.read())
            if DEADLINE_HEADER in request.headers:
                self.deadlines.append(int(request.headers[DEADLINE_HEADER]))
            if self.extra is not None:
                return await self.extra(request)
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail_first:
                self.fail_first -= 1
                return web.Response(status=503, text=f"{self.name} not yet")
            return web.Response(status=self.status, text=self.name)

        application = web.Application()
        application.router.add_route("*", "/{tail:.*}", handle)
        return application


async def serve(aiohttp_server: Any, *apps: App) -> list[int]:
    """Serve each app on a port of its own; their ports."""
    return [(await aiohttp_server(a.app())).port for a in apps]


@asynccontextmanager
async def cluster(toml: str, apps: dict[str, list[int]], **options: Any) -> AsyncIterator[Any]:
    """`run_mesh` with several instances per service: ``apps`` maps a service to its instances' app ports.

    Yields the mesh and ``{service: [sidecar, ...]}``, every instance registered with every sidecar.
    """
    async with run_mesh(toml, {name: ports[0] for name, ports in apps.items()}, **options) as mesh:
        instances = {name: [mesh.sidecars[name]] for name in mesh.sidecars}
        extra: list[Sidecar] = []
        registry = next(iter(mesh.sidecars.values())).registry
        try:
            for name, ports in apps.items():
                for port in ports[1:]:
                    identity = None
                    if mesh.ca is not None:
                        identity = Identity(mesh.config.state_dir / "certs" / name, mesh.config.name)
                    sidecar = Sidecar(mesh.config, name, Ports(app=port, public=0), registry=registry,
                                      identity=identity)
                    await sidecar.start()
                    extra.append(sidecar)
                    instances[name].append(sidecar)
            registry.update({name: [s.listeners["mesh"].address for s in sidecars]
                             for name, sidecars in instances.items()})
            yield mesh, instances
        finally:
            for sidecar in reversed(extra):
                await sidecar.stop()


# --- meshes in a folder: `mesh up`, `mesh ps`, `mesh down`, or a controller here --------------------

def unique_name(prefix: str = "t") -> str:
    """A mesh name no other run uses (the docker runtime names containers and networks after it)."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def recorded(state: dict[str, Any], key: str = "pids") -> list[int]:
    """Every pid (or, with ``key="pgids"``, process group) the instances of ``state`` list."""
    return [p for inst in state["instances"] for p in inst.get(key, {}).values()]


def by_label(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {inst["label"]: inst for inst in state["instances"]}


def assert_all_gone(state: dict[str, Any]) -> None:
    """Nothing of what ``state`` lists runs: no pid, no process group, no process of its run."""
    assert not [p for p in recorded(state) if pid_alive(p)]
    assert not [g for g in recorded(state, "pgids") if group_alive(g)]
    assert run_processes(state["run"]) == []


class Mesh:
    """A mesh ``name`` in ``folder``: its mesh.toml (``[mesh] name = ...``, then ``toml``; or ``toml``
    alone, the whole file, when ``name`` is None), its apps (``app`` as app.py, and ``files``), and
    what it runs.

    Every state it reads, every `mesh` command run against it, records the pids, process groups and
    run id of what the mesh started, and (with a docker ``engine``) its containers, networks and
    images by their labels; ``cleanup()`` kills its controller (the one holding the state folder's
    lock, never this process) and removes the rest by what it recorded. ``env`` adds to the
    environment of the `mesh` commands.
    """

    def __init__(self, folder: Path, name: str | None, toml: str, app: str | None = ENV_APP, *,
                 files: Mapping[str, str] | None = None, engine: Any = None,
                 env: Mapping[str, str] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for file, text in {**({"app.py": app} if app is not None else {}), **(files or {})}.items():
            (folder / file).parent.mkdir(parents=True, exist_ok=True)
            (folder / file).write_text(text)
        if name is not None:
            toml = f'[mesh]\nname = "{name}"\n{toml}'
        (folder / "mesh.toml").write_text(toml)
        self.folder = folder
        self.name: str = tomllib.loads(toml)["mesh"]["name"]
        self.files = StateDir(folder / ".mesh" / self.name)
        self.engine = engine
        self.record = Leftovers(engine) if engine is not None else None
        self.env = {**os.environ, **env} if env else None
        self.popen: subprocess.Popen[bytes] | None = None
        self.popens: list[subprocess.Popen[bytes]] = []
        self.controller: Controller | None = None
        self.task: asyncio.Future[int] | None = None
        self.out = io.StringIO()  # the console of a controller run here
        self.pids: set[int] = set()
        self.groups: set[int] = set()
        self.runs: set[str] = set()

    @property
    def state_dir(self) -> Path:
        return self.files.path

    # `mesh` commands

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        """`mesh <args> <folder>`, to its end."""
        try:
            return subprocess.run([sys.executable, "-m", "mesh", *args, str(self.folder)],
                                  capture_output=True, text=True, timeout=timeout, cwd=self.folder,
                                  stdin=subprocess.DEVNULL, env=self.env)
        finally:
            self.remember()

    def up(self, *args: str) -> subprocess.Popen[bytes]:
        """`mesh up <folder> <args>` in the foreground, in a session of its own; its output goes to up.out."""
        with open(self.folder / "up.out", "wb") as out:
            self.popen = subprocess.Popen([sys.executable, "-m", "mesh", "up", str(self.folder), *args],
                                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, cwd=self.folder, env=self.env)
        self.popens.append(self.popen)
        return self.popen

    def output(self) -> str:
        """What the foreground `mesh up` printed."""
        return (self.folder / "up.out").read_text(errors="replace")

    def log(self) -> str:
        """up.log, where `mesh up -d` writes."""
        return self.files.log.read_text(errors="replace") if self.files.log.exists() else ""

    def ps(self) -> dict[str, Any]:
        done = self.run("ps", "--json", timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        state: dict[str, Any] = json.loads(done.stdout)
        self.remember(state, engine=False)
        return state

    def keyed(self, service: str) -> list[dict[str, Any]]:
        """The per-key instances of a keyed ``service`` (not its front), per `mesh ps --json`."""
        return [i for i in self.ps()["instances"] if i["service"] == service and i["instance"] != "front"]

    # state

    def state(self) -> dict[str, Any] | None:
        """The controller's state: of the one run here, or state.json (None before there is one)."""
        state = self.controller.state() if self.controller is not None else self.files.read_state()
        if state is not None:
            self.remember(state, engine=False)
        return state

    def instance(self, label: str) -> dict[str, Any]:
        return by_label(self.state() or {"instances": []})[label]

    def wait_phase(self, phase: str, timeout: float = 60) -> dict[str, Any]:
        """The state once the foreground `mesh up` reports ``phase`` (failing the test if it exits first)."""
        assert self.popen is not None, "mesh up is not running"
        popen = self.popen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if state and state["controller"]["pid"] == popen.pid and state["phase"] == phase:
                return state
            if popen.poll() is not None:
                pytest.fail(f"mesh up exited with {popen.returncode}:\n{self.output()}")
            time.sleep(0.05)
        pytest.fail(f"mesh up not {phase} after {timeout}s:\n{self.output()}")

    def admin_headers(self) -> dict[str, str]:
        """The run's admin token, as the operator's `mesh` commands send it."""
        token = operator_token(self.state_dir)
        assert token is not None, f"no admin token in {self.state_dir}"
        return token.headers()

    # a controller in this process

    def make_controller(self, *, timeout: float = 20, **options: Any) -> Controller:
        self.controller = Controller(config.load(self.folder), timeout=timeout, console=Console(self.out),
                                     **options)
        return self.controller

    async def start(self, **options: Any) -> Controller:
        """Run a controller here (``make_controller``'s, or a new one) until it is ``running``."""
        controller = self.controller or self.make_controller(**options)
        task = self.task = asyncio.ensure_future(controller.run())
        await eventually(lambda: controller.phase != "starting" or task.done(), what=self.out.getvalue)
        assert controller.phase == "running", self.out.getvalue()
        self.state()
        return controller

    async def stop(self) -> None:
        """Stop the controller run here; it must end with 0."""
        if self.controller is not None and self.task is not None and not self.task.done():
            self.state()
            self.controller.stop()
            assert await asyncio.wait_for(self.task, 60) == 0

    # what it started

    def remember(self, state: dict[str, Any] | None = None, *, engine: bool = True) -> None:
        """Record what ``state`` (else state.json) lists, and (unless ``engine`` is false) what the
        engine holds of this mesh."""
        state = state if state is not None else self.files.read_state()
        if state is not None:
            if state.get("run"):
                self.runs.add(state["run"])
            for inst in state.get("instances", []):
                self.pids.update(p for role, p in inst.get("pids", {}).items() if role != "controller")
                self.groups.update(inst.get("pgids", {}).values())
        if self.record is not None and engine:
            for container in self.containers():
                if container["Id"] not in self.record.containers:
                    self.record.container(container["Id"])
            for network in self.networks():
                if network["Id"] not in self.record.networks:
                    self.record.network(network["Id"])
            for image in self.engine.api.images(filters={"label": [f"mesh.mesh={self.name}"]}):
                self.record.image(image["Id"])

    def _labelled(self) -> dict[str, list[str]]:
        return {"label": [f"mesh.state={self.state_dir.resolve()}"]}

    def containers(self) -> list[dict[str, Any]]:
        """The engine's containers of this mesh (by its state folder's label), running or not."""
        return list(self.engine.api.containers(all=True, filters=self._labelled()))

    def networks(self) -> list[dict[str, Any]]:
        return list(self.engine.api.networks(filters=self._labelled()))

    def assert_all_gone(self) -> None:
        """Nothing this mesh was ever seen to run still runs: no pid, no process group, no process of a run."""
        assert not [p for p in self.pids if pid_alive(p)]
        assert not [g for g in self.groups if group_alive(g)]
        assert [p for run in self.runs for p in run_processes(run)] == []

    def kill_controller(self) -> None:
        """SIGKILL the controller of a `mesh up -d` (never this process), and wait for its lock to go."""
        pid = self.files.controller_pid()
        if self.files.running() and pid and pid != os.getpid():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
            wait_until(lambda: not self.files.running(), what=f"the controller {pid} let go of its lock")

    def cleanup(self) -> list[str]:
        """Kill what this mesh started that is still there, and remove what the engine holds of it,
        all by what was recorded; what could not be removed."""
        for popen in self.popens:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        self.state()
        with contextlib.suppress(AssertionError):
            self.kill_controller()
        for group in self.groups:
            if group_alive(group):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, signal.SIGKILL)
        for run in self.runs:
            for pid in run_processes(run):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if self.record is None:
            return []
        self.remember()
        return self.record.remove_all()


class MeshMaker:
    """What ``make_mesh`` is: ``make_mesh(name, toml, app=ENV_APP, *, folder=tmp_path, files=, engine=, env=)``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.made: list[Mesh] = []

    def __call__(self, name: str | None, toml: str, app: str | None = ENV_APP, *, folder: Path | None = None,
                 **options: Any) -> Mesh:
        mesh = Mesh(folder or self.folder, name, toml, app, **options)
        self.made.append(mesh)
        return mesh

    async def cleanup(self) -> None:
        failures: list[str] = []
        for mesh in self.made:
            with contextlib.suppress(Exception):
                await mesh.stop()
            failures += mesh.cleanup()
        assert not failures, f"could not remove what the test created: {failures}"


@pytest.fixture
async def make_mesh(tmp_path: Path) -> AsyncIterator[MeshMaker]:
    """Makes meshes in the test's folder; at its end, everything they started is stopped or removed."""
    maker = MeshMaker(tmp_path)
    try:
        yield maker
    finally:
        await maker.cleanup()
