"""The admin listener: what the controller and the operator ask of a sidecar, behind a token.

::

    GET  /healthz        public   alive
    GET  /readyz         public   ready (503 while starting)
    GET  /config         token    service, listeners, app, registry, plugins
    GET  /registry       token    the registry, and each backend as this sidecar sees it
    PUT  /registry       token    a new registry: {"services": {name: ["host:port", ...]}}
    POST /certs/reload   token    load cert.pem, key.pem and ca.pem again
    POST /reload/STEP    token    a step of `mesh reload`: prepare, commit, finish, rollback, abort
                                  (`mesh.sidecar.reload`; body {"version": V})
    GET  /tap            token    each request as it passes, one JSON line each (`mesh.observe.tap`);
                                  query: path=GLOB peer=NAME status=5xx direction=inbound bodies=N secrets=1

Every path needs ``Authorization: Bearer <token>`` but those in `PUBLIC`
(what probes and Prometheus read without credentials). `Router.add`
refuses to make any other path public, and the token is checked before the
path is looked up: an endpoint added later is protected without a word, and
a caller without the token learns nothing, not even which paths exist.

The token is the mesh run's: `mesh up` makes one (`AdminToken.new`, 256
bits from `secrets`), writes it to ``.mesh/<name>/admin.token`` (mode 0600,
in the state folder, itself 0700) and gives each sidecar the file's *path*
(``mesh sidecar --admin-token-file PATH``), never the token on a command
line or in an environment an app inherits; on the docker runtime only the
sidecar container mounts the file, and the namespace firewall keeps
everything in the instance, the app included, off the admin port. The
controller and the operator's `mesh` commands read the file
(`AdminToken.read`, `operator_token`) and send `AdminToken.headers`. A
sidecar started without a token file answers only `PUBLIC` and says so in
its log: with no token there is no one it could let in.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from mesh.chain import short_error
from mesh.messages import Request, Response
from mesh.observe.metrics import CONTENT_TYPE
from mesh.observe.tap import Filter
from mesh.sidecar.reload import ReloadRefused

if TYPE_CHECKING:
    from mesh.sidecar.sidecar import Sidecar

__all__ = ["PUBLIC", "TOKEN_FILE", "AdminToken", "Router", "SidecarAdmin", "operator_token"]

log = logging.getLogger("mesh.admin")

# The only paths anyone may read without the token.
PUBLIC = frozenset({"/healthz", "/readyz", "/metrics"})
TOKEN_FILE = "admin.token"

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class AdminToken:
    """The secret of one mesh run, and the file sidecars read it from."""

    path: Path
    value: str

    def __repr__(self) -> str:  # never in a log or a traceback
        return f"AdminToken(path={str(self.path)!r})"

    @classmethod
    def new(cls, folder: Path) -> AdminToken:
        """A fresh token for ``folder/admin.token``; nothing written yet (`write`)."""
        return cls(folder / TOKEN_FILE, secrets.token_urlsafe(32))

    @classmethod
    def read(cls, path: str | Path) -> AdminToken:
        """The token in ``path``; OSError if it cannot be read, ValueError if it is empty."""
        path = Path(path)
        value = path.read_text().strip()
        if not value:
            raise ValueError(f"{path} is empty")
        return cls(path, value)

    def write(self) -> None:
        """Write the file, mode 0600, replacing any earlier run's (write then rename)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(self.value + "\n")
        os.replace(tmp, self.path)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def operator_token(state_dir: Path) -> AdminToken | None:
    """The token of the mesh whose state folder is ``state_dir``, for a `mesh` command; None if none is readable."""
    try:
        return AdminToken.read(state_dir / TOKEN_FILE)
    except (OSError, ValueError):
        return None


class Router:
    """Admin endpoints by method and path; all of them behind the token but `PUBLIC` ones.

    ``token`` None: nothing but `PUBLIC` answers (a sidecar run by hand without a token file).
    """

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None
        self._routes: dict[str, dict[str, Handler]] = {}
        self._public: set[str] = set()

    def add(self, methods: str | tuple[str, ...], path: str, handler: Handler, *, public: bool = False) -> None:
        """Serve ``path`` for ``methods`` with ``handler``; ``public`` only for a path in `PUBLIC`."""
        if public:
            if path not in PUBLIC:
                raise ValueError(f"{path}: only {', '.join(sorted(PUBLIC))} may be public")
            self._public.add(path)
        for method in (methods,) if isinstance(methods, str) else methods:
            self._routes.setdefault(path, {})[method] = handler

    def allowed(self, request: Request) -> Response | None:
        """None if ``request`` may go on; else the answer it gets (401, or 403 without a token here)."""
        if request.path in self._public:
            return None
        if self._token is None:
            return short_error(403, "this sidecar has no admin token (--admin-token-file): "
                                    f"only {' '.join(sorted(self._public))} answer")
        # SECURITY: the admin state is the controller's and the operator's; the app must not steer it.
        values = request.headers.getall("Authorization", [])
        scheme, _, given = values[0].partition(" ") if len(values) == 1 else ("", "", "")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
            return None
        response = short_error(401, "admin endpoints need the mesh's admin token")
        response.headers["WWW-Authenticate"] = 'Bearer realm="mesh admin"'
        return response

    async def __call__(self, request: Request) -> Response:
        refused = self.allowed(request)
        if refused is not None:
            return refused
        methods = self._routes.get(request.path)
        if methods is None:
            return short_error(404, f"admin endpoints: {' '.join(sorted(self._routes))}")
        handler = methods.get(request.method)
        if handler is None:
            response = short_error(405, f"{request.path} takes {', '.join(sorted(methods))}")
            response.headers["Allow"] = ", ".join(sorted(methods))
            return response
        return await handler(request)


class SidecarAdmin:
    """A sidecar's admin endpoints (the table above) on a `Router`."""

    def __init__(self, sidecar: Sidecar, token: str | None) -> None:
        self.sidecar = sidecar
        self.router = Router(token)
        self.router.add(("GET", "HEAD"), "/healthz", self.healthz, public=True)
        self.router.add(("GET", "HEAD"), "/readyz", self.readyz, public=True)
        self.router.add("GET", "/metrics", self.metrics, public=True)
        self.router.add("GET", "/config", self.config)
        self.router.add("GET", "/registry", self.registry)
        self.router.add("PUT", "/registry", self.put_registry)
        self.router.add("POST", "/certs/reload", self.reload_certificates)
        self.router.add("GET", "/tap", self.tap)
        for step in ("prepare", "commit", "finish", "rollback", "abort"):
            self.router.add("POST", f"/reload/{step}", partial(self.reload, step))

    async def __call__(self, request: Request) -> Response:
        return await self.router(request)

    async def healthz(self, request: Request) -> Response:
        return Response(200, "ok\n")

    async def readyz(self, request: Request) -> Response:
        if not self.sidecar.ready:
            return Response(503, "starting\n")
        return Response(200, "ready\n")

    async def metrics(self, request: Request) -> Response:
        # Counts only, no request content: readable without the token, as Prometheus scrapes it.
        return Response(200, self.sidecar.observer.metrics.exposition(), {"Content-Type": CONTENT_TYPE})

    async def config(self, request: Request) -> Response:
        s = self.sidecar
        return Response.json({"service": s.service, "mesh": s.config.name, "version": s.version,
                              "listeners": s.addresses(), "app": f"{s.app.host}:{s.app.port}",
                              "registry": s.registry.as_dict(), "lb": s.balancer.policy,
                              "plugins": [name for name, _ in s.inbound.plugins],
                              "outbound": [name for name, _ in s.outbound.plugins]})

    async def registry(self, request: Request) -> Response:
        # "backends": each instance as this sidecar sees it (load, failures, ejection).
        s = self.sidecar
        return Response.json({"services": s.registry.as_dict(), "backends": s.balancer.snapshot()})

    async def put_registry(self, request: Request) -> Response:
        registry = self.sidecar.registry
        try:
            data = json.loads(await request.read(limit=1 << 20))
            registry.update(data["services"])
        except (ValueError, KeyError, TypeError) as exc:
            return short_error(400, f"expected {{\"services\": {{name: [host:port]}}}}: {exc}")
        log.info("registry updated: %s", " ".join(
            f"{name}={len(addresses)}" for name, addresses in registry.as_dict().items()))
        return Response(204)

    async def tap(self, request: Request) -> Response:
        s = self.sidecar
        if s.inbound.meter is None:
            return short_error(409, "this sidecar observes nothing (--no-metrics and no access log): "
                                    "there is nothing to tap")
        try:
            wants = Filter.parse(dict(parse_qsl(request.query, keep_blank_values=True)))
            subscriber = s.tap.subscribe(wants)
        except ValueError as exc:
            return short_error(400, str(exc))
        except RuntimeError as exc:
            return short_error(503, str(exc))
        log.info("tap: a listener subscribed (%d now)", len(s.tap.subscribers))
        first = {"tap": "started", "service": s.service, "instance": s.observer.instance}
        return Response(200, s.tap.stream(subscriber, first),
                        {"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})

    async def reload(self, step: str, request: Request) -> Response:
        reloads = self.sidecar.reloads
        try:
            data = json.loads(await request.read(limit=1 << 16) or b"{}")
        except ValueError:
            data = None
        wanted = data.get("version") if isinstance(data, dict) else None
        if not isinstance(wanted, str) and step not in ("prepare", "abort"):
            return short_error(400, 'expected {"version": "..."}')
        try:
            if step == "prepare":
                return Response.json({"version": await reloads.prepare(wanted)})
            if step == "abort":
                await reloads.abort()
            else:
                assert isinstance(wanted, str)
                await {"commit": reloads.commit, "finish": reloads.finish, "rollback": reloads.rollback}[step](wanted)
        except ReloadRefused as exc:
            return short_error(409, str(exc))
        return Response(204)

    async def reload_certificates(self, request: Request) -> Response:
        s = self.sidecar
        if s.identity is None:
            return short_error(404, "this sidecar runs without mutual TLS")
        try:
            s.identity.reload()
        except (OSError, ValueError) as exc:
            log.error("reloading certificates failed: %s", exc)
            return short_error(500, f"reloading certificates failed: {type(exc).__name__}")
        from mesh.sidecar.identity import fresh_pool

        # Connections kept alive were checked against the trust of before: none carries another request.
        s.pool = await fresh_pool(s.pool)
        log.info("certificates reloaded from %s", s.identity.folder)
        return Response(204)
