"""The controller's web listener: its ``/metrics`` and the mesh's dashboard, on 127.0.0.1 only.

`mesh up` starts it (`Dashboard.start`) before any instance, on a port of
its own; state.json's ``controller`` names it while it serves::

    "metrics":   "http://127.0.0.1:PORT/metrics"          public: counts only (`mesh.control.telemetry`)
    "dashboard": "http://127.0.0.1:PORT/?token=TOKEN"     the page, for a browser (`mesh dashboard` opens it)

::

    GET /metrics      public   the controller's metrics, Prometheus text format
    GET /             token    the page (dashboard.html: plain HTML and JavaScript, no build step)
    GET /api/state    token    services, instances (state, key, CPU), routes, golden metrics, recent problems
    GET /api/tap      token    the live tap of a service's sidecars, merged: one JSON object a line

Everything but ``/metrics`` needs the dashboard token: 256 bits from
`secrets`, made for each run, kept in ``.mesh/<name>/dashboard.token``
(mode 0600, in the private state folder) and never in an environment an app
inherits. A browser brings it once, in the URL's ``token`` parameter: the
answer sets an HttpOnly, SameSite=Strict cookie and sends it on to the same
page without the token. Scripts may send ``Authorization: Bearer TOKEN``.
A request without it gets 401 and learns nothing, not even which paths
exist. A request whose ``Host`` is not ``127.0.0.1:PORT`` or
``localhost:PORT`` is refused first (a page of another site whose name was
made to resolve to 127.0.0.1 would send its own name). On Docker an app
cannot reach the host's loopback; on the process runtime it can, and the
token keeps out whoever only knows the port (a process of the operator's
user that reads the state folder is not kept out: development only, as for
the admin token).

The numbers of the page (`Dashboard.snapshot`) are taken once a second
while someone looks (a request of ``/api/state`` in the last `IDLE`
seconds): every running sidecar's ``/metrics`` (`mesh.control.golden`) and
each running instance's CPU (the runtime's counter, as the autoscaler reads
it). The tap relays ``GET /tap`` of each running sidecar of the service
(with the mesh's admin token) and follows instances that start later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import importlib.resources
import json
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from mesh.control.golden import Golden, Reading, scrape
from mesh.control.runtimes.base import Instance
from mesh.observe.metrics import CONTENT_TYPE
from mesh.sidecar.admin import AdminToken

if TYPE_CHECKING:
    from mesh.control.controller import Controller

__all__ = ["IDLE", "TOKEN_FILE", "Dashboard", "dashboard_token"]

log = logging.getLogger("mesh.dashboard")

TOKEN_FILE = "dashboard.token"
IDLE = 15.0  # seconds after the page's last poll that the scraping stops
INTERVAL = 1.0
MAX_TAPS = 8  # tap streams open at once
TAP_FILTERS = ("path", "peer", "status", "direction")
HEARTBEAT = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dashboard_token(folder: Path) -> AdminToken:
    """A fresh token for ``folder/dashboard.token`` (written by `Dashboard.start`)."""
    return AdminToken(folder / TOKEN_FILE, secrets.token_urlsafe(32))


def _page() -> str:
    return importlib.resources.files("mesh.control").joinpath("dashboard.html").read_text(encoding="utf-8")


class _Cpu:
    """Each running instance's app CPU in cores, over its last few samples (the runtime's counter)."""

    def __init__(self, span: float = 5.0) -> None:
        self.span = span
        self.samples: dict[Hashable, collections.deque[tuple[float, float]]] = {}
        self.cores: dict[str, float] = {}

    def add(self, label: str, ident: Hashable, now: float, used: float | None) -> None:
        if used is None:
            return
        history = self.samples.setdefault(ident, collections.deque())
        history.append((now, used))
        while len(history) > 2 and history[1][0] <= now - self.span:
            history.popleft()
        first_t, first_used = history[0]
        if now - first_t > 0.2:
            self.cores[label] = round(max(0.0, used - first_used) / (now - first_t), 3)

    def keep(self, idents: set[Hashable], labels: set[str]) -> None:
        for ident in set(self.samples) - idents:
            del self.samples[ident]
        for label in set(self.cores) - labels:
            del self.cores[label]


class Dashboard:
    """The controller's web listener (see the module docstring)."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.token = dashboard_token(controller.files.path)
        self.golden = Golden()
        self.cpu = _Cpu()
        self.port: int | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._collector: asyncio.Future[None] | None = None
        self._looked = -IDLE  # time.monotonic() of the page's last poll
        self._wanted = asyncio.Event()
        self._taps: set[asyncio.Task[Any]] = set()
        self._cookie_value = hmac.new(self.token.value.encode(), b"mesh dashboard cookie", hashlib.sha256).hexdigest()

    # its life

    @property
    def urls(self) -> dict[str, str]:
        """``metrics`` and ``dashboard`` (with the token) while it serves; empty before and after."""
        if self.port is None:
            return {}
        base = f"http://127.0.0.1:{self.port}"
        return {"metrics": f"{base}/metrics", "dashboard": f"{base}/?token={self.token.value}"}

    async def start(self) -> None:
        """Listen on 127.0.0.1 (a port of its own) and write the token file."""
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/metrics", self._metrics, allow_head=True)
        app.router.add_get("/", self._page)
        app.router.add_get("/api/state", self._state)
        app.router.add_get("/api/tap", self._tap)
        self.token.write()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))  # loopback only, whatever the machine's other addresses
            port = int(listener.getsockname()[1])
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
            await runner.setup()
        except BaseException:
            listener.close()
            raise
        try:
            await web.SockSite(runner, listener).start()
        except BaseException:
            await runner.cleanup()
            listener.close()
            raise
        self._runner = runner
        self.port = port
        self._session = aiohttp.ClientSession(trust_env=False)
        self._collector = asyncio.ensure_future(self._collect_every(INTERVAL))

    async def stop(self) -> None:
        """Stop listening (open taps end) and remove the token file."""
        self.port = None
        tasks = [t for t in (self._collector, *self._taps) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        with contextlib.suppress(OSError):
            self.token.path.unlink()

    # who may ask

    def _hosts(self) -> set[str]:
        return {f"127.0.0.1:{self.port}", f"localhost:{self.port}"}

    def _valid(self, given: str | None, expected: str) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), expected.encode())

    @property
    def cookie(self) -> str:
        return f"mesh_dashboard_{self.port}"  # cookies are per host, not per port: one name per listener

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # SECURITY: DNS rebinding: another site's page that made its name resolve to 127.0.0.1 sends that name.
        if request.headers.get("Host", "") not in self._hosts():
            return _refused(403, "this listener answers only to Host 127.0.0.1 or localhost with its port\n")
        if request.path == "/metrics":
            return await handler(request)
        # SECURITY: everything else is the operator's; the token is what keeps a local app out.
        given = request.query.get("token")
        if given is not None:
            if request.method != "GET" or not self._valid(given, self.token.value):
                return _refused(401, "the dashboard needs its token: `mesh dashboard` opens it\n")
            query = {k: v for k, v in request.query.items() if k != "token"}
            target = str(request.rel_url.with_query(query)) if query else request.path
            found = web.Response(status=303, headers={"Location": target})
            found.set_cookie(self.cookie, self._cookie_value, httponly=True, samesite="Strict", path="/")
            _harden(found)
            return found
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        if not (self._valid(request.cookies.get(self.cookie), self._cookie_value)
                or (scheme.lower() == "bearer" and self._valid(bearer.strip(), self.token.value))):
            return _refused(401, "the dashboard needs its token: `mesh dashboard` opens it\n")
        response = await handler(request)
        if not response.prepared:
            _harden(response)
        return response

    # what it serves

    async def _metrics(self, request: web.Request) -> web.Response:
        # Counts only: readable without the token, as Prometheus scrapes it.
        body = self.controller.telemetry.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def _page(self, request: web.Request) -> web.Response:
        nonce = secrets.token_urlsafe(16)
        html = _page().replace("<script>", f'<script nonce="{nonce}">')
        response = web.Response(text=html, content_type="text/html")
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return response

    async def _state(self, request: web.Request) -> web.Response:
        self._looked = time.monotonic()
        self._wanted.set()
        return web.json_response(self.snapshot())

    def snapshot(self) -> dict[str, Any]:
        """What the page shows: the controller's state with CPU, golden metrics and recent problems."""
        c = self.controller
        state = c.state()
        golden = self.golden.services()
        done = c.telemetry.summary()
        services = []
        for name, spec in c.config.services.items():
            rows = [row for row in state["instances"] if row["service"] == name]
            front = next((row for row in rows if row.get("instance") == "front"), None)
            public = (front or {}).get("public") or next((r["public"] for r in rows if r.get("public")), None)
            services.append({
                "name": name, "keyed": spec.instances is not None,
                "key": spec.instances.key if spec.instances is not None else None,
                "scale": ({"min": spec.scale.min, "max": spec.scale.max, "cpu": spec.scale.cpu}
                          if spec.scale is not None else None),
                "public": public, "requests": 0, "from_outside": 0, "rps": 0.0, "success": None, "p50_ms": None,
                "p99_ms": None,
                **golden.get(name, {}),
                "controller": done.get(name, {}),
                "instances": [{
                    "label": row["label"], "instance": row["instance"], "state": row["state"],
                    "key": row.get("key"), "healthy": row.get("healthy"), "problem": row.get("problem"),
                    "restarts": row.get("restarts", 0), "cpu": self.cpu.cores.get(row["label"]),
                } for row in rows if row is not front],
            })
        routes = self.golden.routes()
        edges = []
        declared = list(dict.fromkeys(f"{r.source}->{r.to}" for r in c.config.routes))
        for label in declared + sorted(set(routes) - set(declared)):
            source, _, target = label.partition("->")
            numbers = routes.get(label, {"allowed": 0, "denied": 0, "audited": 0, "rps": 0.0, "success": None,
                                         "p50_ms": None, "p99_ms": None})
            edges.append({"route": label, "from": source, "to": target, "declared": label in declared, **numbers})
        return {"mesh": state["mesh"], "phase": state["phase"], "runtime": state["runtime"],
                "error": state["error"], "time": time.time(), "window": self.golden.window_seconds,
                "metrics": self.urls.get("metrics"), "services": services, "routes": edges,
                "events": self.golden.recent()}

    # collecting the numbers

    async def _collect_every(self, seconds: float) -> None:
        while True:
            if time.monotonic() - self._looked > IDLE:
                self._wanted.clear()
                await self._wanted.wait()
            began = time.monotonic()
            try:
                await self.collect()
            except Exception:  # noqa: BLE001 - a bad round must not end the dashboard
                log.exception("collecting the dashboard's numbers failed")
            await asyncio.sleep(max(0.0, seconds - (time.monotonic() - began)))

    async def collect(self) -> None:
        """Scrape every running sidecar and sample every running app's CPU, once."""
        c = self.controller
        session = self._session
        if session is None:
            return
        running = c.instances.running()
        idents: list[Hashable] = [(i.label, i.ports.get("admin"), i.pids.get("sidecar")) for i in running]

        async def one(inst: Instance) -> tuple[Reading | None, float | None]:
            reading = await scrape(session, f"127.0.0.1:{inst.ports['admin']}")
            try:
                used = await asyncio.wait_for(c.instances.cpu_seconds(inst), 2.0)
            except (TimeoutError, OSError):
                used = None
            return reading, used

        results = await asyncio.gather(*(one(i) for i in running))
        now = time.monotonic()
        self.golden.update({ident: reading for ident, (reading, _) in zip(idents, results, strict=True)}, now)
        for inst, ident, (_, used) in zip(running, idents, results, strict=True):
            self.cpu.add(inst.label, ident, now, used)
        self.cpu.keep(set(idents), {i.label for i in running})

    # the live tap

    def _tap_targets(self, service: str | None) -> list[Instance]:
        return [i for i in self.controller.instances.running() if service in (None, i.service)]

    async def _tap(self, request: web.Request) -> web.StreamResponse:
        service = request.query.get("service") or None
        if service is not None and service not in self.controller.config.services:
            return _refused(404, f"no service {service!r}\n")
        query = {k: request.query[k] for k in TAP_FILTERS if request.query.get(k)}
        if len(self._taps) >= MAX_TAPS:
            return _refused(503, f"{MAX_TAPS} taps are open already\n")
        task = asyncio.current_task()
        assert task is not None
        self._taps.add(task)
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store",
                                               "X-Content-Type-Options": "nosniff"})
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(1024)
        readers: dict[Hashable, asyncio.Task[None]] = {}
        try:
            quiet = time.monotonic()
            while True:
                for inst in self._tap_targets(service):
                    ident = (inst.label, inst.ports.get("admin"), inst.pids.get("sidecar"))
                    if ident not in readers:
                        readers[ident] = asyncio.ensure_future(self._relay(inst, query, queue))
                try:
                    item = await asyncio.wait_for(queue.get(), 1.0)
                except TimeoutError:
                    if time.monotonic() - quiet >= HEARTBEAT:  # a client that left is noticed on writing
                        await response.write(b"\n")
                        quiet = time.monotonic()
                    continue
                await response.write(json.dumps(item).encode() + b"\n")
                quiet = time.monotonic()
        except ConnectionResetError:  # the page went away
            pass
        finally:
            self._taps.discard(task)
            for reader in readers.values():
                reader.cancel()
            await asyncio.gather(*readers.values(), return_exceptions=True)
        return response

    async def _relay(self, inst: Instance, query: dict[str, str], queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Put each record of the instance's ``GET /tap`` on ``queue``; a line saying why when there is none."""
        session = self._session
        if session is None:
            return
        url = f"http://127.0.0.1:{inst.ports['admin']}/tap"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0)
        try:
            async with session.get(url, params=query, headers=self.controller.admin_token.headers(),
                                   timeout=timeout) as answer:
                if answer.status != 200:
                    reason = (await answer.text())[:300].strip()
                    await queue.put({"tap": "unavailable", "service": inst.service, "instance": inst.label,
                                     "status": answer.status, "reason": reason})
                    return
                async for line in answer.content:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict):
                        await queue.put(record)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:  # ValueError: a line too long
            await queue.put({"tap": "unavailable", "service": inst.service, "instance": inst.label,
                             "status": None, "reason": f"{type(exc).__name__}: {exc}"})


def _harden(response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Cache-Control", "no-store")
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"  # the token of a first visit never leaves in a Referer
    headers["X-Frame-Options"] = "DENY"


def _refused(status: int, text: str) -> web.Response:
    response = web.Response(status=status, text=text)
    _harden(response)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="mesh dashboard"'
    return response
