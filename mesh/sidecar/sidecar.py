"""The sidecar beside one service instance: its listeners and the way a request flows.

::

    other sidecars ──▶ mesh listener ─┐ (the certificate's peer)
    outside (expose) ▶ public listener ┴▶ inbound chain ──▶ app (loopback)
                                           └ a plugin's UPSTREAM ──▶ outbound chain
    app ─────────────▶ outbound listener ▶ outbound chain ─▶ route check ─▶ peer's mesh listener
                                         │                  └ egress check ─▶ host outside the mesh
                                         └ CONNECT ─────────── egress check ─▶ tunnel to host:port
    operator ────────▶ admin listener (loopback): /healthz /readyz /config /registry

A service's inbound chain starts with the built-in layers of
`mesh.sidecar.inbound` (identity, route policy, the caller's deadline), then its
``plugins``; its outbound chain is its ``outbound`` plugins, then the
built-in layers of `mesh.sidecar.resilience` (deadline, circuit breaker, retry).
Per-route plugins join them where `mesh.sidecar.route_chains` says.
The listeners only record what the connection says (`mesh.sidecar.inbound`):
the layers decide.

Between sidecars it is mutual TLS: the receiving sidecar takes the caller's
service from its verified certificate as ``request.peer``, checks route
policy on it, and passes it to the app as ``x-mesh-peer`` (an
``x-mesh-peer`` from anywhere else is removed first). The calling side
checks that the certificate it reached names the service it called.

Without an `Identity` (``mesh sidecar`` with no ``--tls``) the mesh
listener is plain HTTP and trusts the caller's ``x-mesh-peer``: for a
single machine in development only, and said so in the log.

At the end of the outbound chain the terminal checks the route, lets the
`mesh.sidecar.balancer.Balancer` pick an instance (power of two choices, outlier
ejection) and sends the request over a pooled connection keyed by that
instance and its identity. A request an inbound plugin sends to another
service (``request.state[UPSTREAM]``, as ``router`` does) takes the same
outbound chain as the app's own calls. The registry of instances comes
from ``--registry FILE`` at start and from ``PUT /registry`` on the admin
listener (the controller pushes every change), or, with ``--registry-dns``,
from names resolved about once a second (`mesh.sidecar.dns_registry`: Docker
Swarm's ``tasks.<service>``). A deadline that arrives in
``x-mesh-deadline-ms`` bounds the call to the app.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from mesh import config as config_mod
from mesh.chain import Chain, short_error
from mesh.config import MeshConfig
from mesh.config.version import version
from mesh.errors import UpstreamError
from mesh.http.client import ConnectFailed, Endpoint, Limits, Pool
from mesh.http.headers import PEER_HEADER, request_id, set_forwarded, strip_keeping_upgrade
from mesh.http.server import Connection, Listener, ServerLimits
from mesh.keys import AVOID, BACKEND, DEADLINE, LISTENER, RETRIES, TIMEOUT, TRY_TIMEOUT, UPSTREAM
from mesh.messages import Request, Response
from mesh.observe.accesslog import AccessLog
from mesh.observe.tracing import Tracer
from mesh.plugin import Context
from mesh.sidecar import dns_registry, handoff
from mesh.sidecar.admin import AdminToken, SidecarAdmin
from mesh.sidecar.balancer import Backend, Balancer
from mesh.sidecar.egress import EGRESS, EgressPolicy, EgressProxy
from mesh.sidecar.identity import HANDSHAKE_FAILURES, Identity
from mesh.sidecar.inbound import INBOUND, Inbound, policy_denials
from mesh.sidecar.observing import ROUTE, SPAN, UPSTREAM_STARTED, Observer, route_label
from mesh.sidecar.registry import Registry
from mesh.sidecar.reload import Generation, Reloads
from mesh.sidecar.resilience import DEADLINE_HEADER, OUTBOUND, Outbound, Retry
from mesh.sidecar.route_chains import inbound_chain, outbound_chain
from mesh.sidecar.routes import Policy
from mesh.sidecar.upstream_metrics import UpstreamMetrics

__all__ = ["Ports", "Sidecar", "main"]

log = logging.getLogger("mesh.sidecar")


@dataclass
class Ports:
    """Where a sidecar listens (0: any free port) and where its app listens."""

    app: int
    mesh: int = 0
    outbound: int = 0
    admin: int = 0
    public: int | None = None


def _choosers(config: MeshConfig) -> dict[str, Any]:
    """Each service whose lifecycle hooks override ``choose_instance``: that method."""
    from mesh.lifecycle import Lifecycle, load_lifecycle

    choosers = {}
    for name, spec in config.services.items():
        if spec.lifecycle:
            hooks = load_lifecycle(spec.lifecycle, config.plugin_path)()
            method = getattr(type(hooks), "choose_instance", None)
            if method is not None and method is not Lifecycle.choose_instance:
                choosers[name] = hooks.choose_instance
    return choosers


def _version_of(config: MeshConfig) -> str:
    try:
        return version(config)
    except OSError:  # a config made in code, with no file behind it
        return "unversioned"


class Sidecar:
    def __init__(self, config: MeshConfig, service: str, ports: Ports, *,
                 registry: Registry | None = None, host: str = "127.0.0.1",
                 app_host: str = "127.0.0.1", public_host: str = "127.0.0.1",
                 limits: ServerLimits | None = None, upstream_limits: Limits | None = None,
                 identity: Identity | None = None, admin_token: str | None = None,
                 access_log: AccessLog | None = None, instance: str = "", metrics: bool = True,
                 sockets: dict[str, socket.socket] | None = None) -> None:
        """``admin_token``: what the admin listener wants in ``Authorization: Bearer ...``
        (`mesh.sidecar.admin`); without one it answers only /healthz, /readyz and /metrics.
        ``sockets``: listener name (``mesh``, ``outbound``, ``admin``, ``public``) -> a listening socket to
        serve instead of binding its port (`mesh.sidecar.handoff`); `serve_public` takes one later."""
        self.config = config
        self.service = service
        self.spec = config.services[service]
        self.ports = ports
        self.registry = registry or Registry()
        self.identity = identity
        self.pool = Pool(upstream_limits, verify_peer=self._verify_peer)
        self.app = Endpoint(app_host, ports.app)
        self.balancer = Balancer(self.registry, config.defaults.lb, config.defaults.outlier,
                                 endpoint=self._endpoint, choosers=_choosers(config))
        self.tracer = Tracer(service, config.tracing)
        self.observer = Observer(service, frozenset(config.services), instance, access_log, self.tracer)
        self.denials = policy_denials(self.observer.plugin_metrics("policy"))  # what _to_peer refuses
        self.egress = EgressProxy(config, service, upstream_limits, denials=self.denials)
        self.observer.metrics.register(UpstreamMetrics(self))
        self.tap = self.observer.tap  # while someone taps with bodies, the entry points keep them (Observer.tapped)
        # Without metrics or an access log nothing is recorded per request (the benchmark's baseline).
        observer = self.observer if metrics or self.observer.access_log is not None else None
        self._meter = observer
        # What mesh.toml sets that `mesh reload` can change, set by `use` (mesh.sidecar.reload).
        self.policy: Policy
        self.timeout: Any
        self.outbound_settings: Outbound
        self.inbound_settings: Inbound
        self.inbound: Chain
        self.outbound: Chain
        self._app_retry: Chain
        self.reloads = Reloads(self, self.generation(config, _version_of(config)))
        self.use(self.reloads.current)

        def done(direction: str) -> Any:
            return partial(observer.done, direction) if observer is not None else None

        self._app_backend = Backend(service, app_host, ports.app, self.app)
        limits = replace(limits or ServerLimits(), underscores_in_headers=self.spec.underscores_in_headers)
        # What protects the app from slow clients applies where requests come in for it.
        inbound = replace(limits, request_buffer=self.spec.request_buffer,
                          request_min_rate=self.spec.request_min_rate)
        sockets = sockets or {}
        self.listeners = {
            "mesh": Listener(self._from_mesh, name="mesh", host=host, port=ports.mesh, limits=inbound,
                             tls=identity.server if identity else None, on_done=done("inbound"),
                             sock=sockets.get("mesh")),
            "outbound": Listener(self._from_app, name="outbound", host="127.0.0.1", port=ports.outbound,
                                 limits=limits, on_done=done("outbound"), proxy=True, sock=sockets.get("outbound")),
            "admin": Listener(self._admin, name="admin", host="127.0.0.1", port=ports.admin, limits=limits,
                              sock=sockets.get("admin")),
        }
        self._public = partial(Listener, self._from_outside, name="public", host=public_host, limits=inbound,
                               on_done=done("public"))
        if ports.public is not None or "public" in sockets:
            self.listeners["public"] = self._public(port=ports.public or 0, sock=sockets.get("public"))
        self.ready = False
        self.admin = SidecarAdmin(self, admin_token)

    # lifecycle

    def generation(self, config: MeshConfig, version: str) -> Generation:
        """What ``config`` sets in this sidecar: its chains built, not started, not in use (`use`)."""
        spec = config.services[self.service]
        policy = Policy(config.routes, config.mode)
        inbound = inbound_chain(spec, self._to_app, self._meter)
        outbound = outbound_chain(config, self.service, self._to_peer, self._meter)
        # A call to the own app that a plugin asked to have retried (request.state[RETRIES]) is retried
        # by the same layer as outbound calls; by default (no RETRIES) it is never sent twice.
        app_retry = Chain([("mesh.app (retry)", Retry(attempts=1))], self._try_app)
        attributes = {"config": config, "spec": spec, "policy": policy, "timeout": spec.timeout,
                      "outbound_settings": Outbound(config, self.service),
                      "inbound_settings": Inbound(config, self.service, policy),
                      "inbound": inbound, "outbound": outbound, "_app_retry": app_retry,
                      "egress_policy": EgressPolicy(config.egress, config.mode, frozenset(config.services))}
        return Generation(config, version, attributes, (inbound, outbound, app_retry))

    def use(self, generation: Generation) -> None:
        """Serve ``generation`` from the next request on: one synchronous step, never half of it."""
        for name, value in generation.attributes.items():
            if name == "egress_policy":
                self.egress.policy = value
            else:
                setattr(self, name, value)

    def context(self, generation: Generation) -> Context:
        """What ``generation``'s plugins get at start."""
        config, attributes = generation.config, generation.attributes
        ctx = Context(service=self.service, mesh=config.name, root=config.root)
        ctx.state[OUTBOUND] = attributes["outbound_settings"]
        ctx.state[INBOUND] = attributes["inbound_settings"]
        return ctx

    @property
    def version(self) -> str:
        """The version of mesh.toml and plugin code this sidecar serves (`mesh.config.version`)."""
        return self.reloads.version

    async def start(self) -> None:
        log_file = self.observer.access_log
        if log_file is not None:
            log_file.start()
        current = self.reloads.current
        await current.start(self.context(current))
        try:
            for listener in self.listeners.values():
                await listener.start()
        except BaseException:
            await self.stop()
            raise
        self.ready = True

    async def serve_public(self, sock: socket.socket) -> None:
        """Serve outside traffic from now on, on ``sock``: a listening socket handed over while it runs."""
        if "public" in self.listeners:
            raise RuntimeError("the public listener is already serving")
        listener = self.listeners["public"] = self._public(sock=sock)
        await listener.start()
        log.info("sidecar %s: public listener serving on %s (a socket handed over)", self.service, listener.address)

    async def stop(self) -> None:
        self.ready = False
        self.tap.close()  # its streams end, so the admin listener can close
        for listener in self.listeners.values():
            await listener.stop()
        await self.reloads.close()
        await self.reloads.current.stop()
        await self.pool.close()
        await self.egress.close()
        if self.observer.access_log is not None:
            self.observer.access_log.close()
        await self.tracer.close()

    def addresses(self) -> dict[str, str]:
        return {name: listener.address for name, listener in self.listeners.items()}

    # inbound

    def _prepare(self, request: Request) -> None:
        strip_keeping_upgrade(request.headers)
        request.id = request_id(request.headers, request.id)
        request.service = self.service

    # The listeners record what only the connection knows; the inbound chain's layers decide (mesh.sidecar.inbound).

    async def _from_outside(self, request: Request, raw: Connection) -> Response:
        request.headers.popall(PEER_HEADER, None)  # SECURITY: only the mesh says who a peer is
        request.state[LISTENER] = "public"
        request.state[SPAN] = self.tracer.begin(request.headers)
        self._prepare(request)
        set_forwarded(request.headers, request.client, request.scheme)
        if self.tap.bodies:
            return await self.observer.tapped(self.inbound, request)
        return await self.inbound(request)

    async def _from_mesh(self, request: Request, raw: Connection) -> Response:
        if self.identity is not None:
            if not raw.peer:  # its certificate, read once per connection (no renegotiation: `identity`)
                raw.peer = (self.identity.peer(raw.transport),)
            request.peer = raw.peer[0]  # SECURITY: the certificate says who calls
        else:
            request.peer = request.headers.get(PEER_HEADER)  # development only: the caller says
        request.state[LISTENER] = "mesh"
        request.state[SPAN] = self.tracer.begin(request.headers)
        self._prepare(request)
        set_forwarded(request.headers, request.client, request.scheme)
        if self.tap.bodies:
            return await self.observer.tapped(self.inbound, request)
        return await self.inbound(request)

    # The terminals and what they call are plain functions that hand back a coroutine: the pool's on
    # the way to a peer, `_app_answer` (the pool's and the app's 503 while it is not up) to the app.

    def _to_app(self, request: Request) -> Awaitable[Response]:
        state = request.state
        upstream = state.get(UPSTREAM)
        if upstream and upstream != self.service:
            # A plugin sends it to another service (router's `to`): a call this service makes, through
            # its outbound chain (deadline, breaker, retry, balancer) like the app's own calls.
            return self.outbound.handler(request)
        if TIMEOUT in state or RETRIES in state:
            # A plugin bounds or retries this request: the timeout counts from now, all tries included.
            timeout = state.get(TIMEOUT)
            if timeout:
                deadline = time.monotonic() + timeout
                current = state.get(DEADLINE)
                if current is None or deadline < current:
                    state[DEADLINE] = deadline
            if RETRIES in state:
                return self._app_retry.handler(request)
        return self._call_app(request, self.timeout)

    def _call_app(self, request: Request, timeout: float | None) -> Awaitable[Response]:
        """One call to the app: its head within ``timeout``, and before the request's deadline."""
        deadline = request.state.get(DEADLINE)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamError(504, "the caller's deadline passed before the app was called")
            if timeout is None or remaining < timeout:
                timeout = remaining
            request.headers[DEADLINE_HEADER] = str(int(remaining * 1000) or 1)
        request.state[UPSTREAM_STARTED] = time.monotonic()
        return self._app_answer(request, timeout)

    async def _app_answer(self, request: Request, timeout: float | None) -> Response:
        """The app's answer. A connection its loopback port refuses means the app is not up (starting,
        restarting): 503 with ``Retry-After`` (`mesh.chain.error_response`), as Envoy answers a failed
        connect; 502 stays for an app that answers what is not HTTP or breaks off."""
        try:
            # How long the app's response body (or a WebSocket) may go quiet: this service's own setting.
            return await self._forward(self.app, request, timeout, self.spec.stream_idle_timeout)
        except ConnectFailed as exc:
            if exc.status != 502:
                raise
            raise ConnectFailed(503, f"the app is not up yet (starting or restarting): {exc.reason}") from None

    async def _try_app(self, request: Request) -> Response:
        """One try of a call to the app that the `Retry` layer may send again (``self._app_retry``)."""
        state = request.state
        state[BACKEND] = self._app_backend  # it reached the app: a failure now may be worth a retry
        return await self._call_app(request, state.get(TRY_TIMEOUT) or self.timeout)

    def _forward(self, endpoint: Endpoint, request: Request, timeout: float | None,
                 idle: float) -> Awaitable[Response]:
        """Send ``request`` to ``endpoint``: its head within ``timeout``, quiet in its body at most ``idle``.

        A WebSocket handshake goes the same way (the pool sends it as it is and, on a valid
        101, returns a tunnel); interim responses go straight to the client (``request._interim``).
        """
        return self.pool.request(endpoint, request.method, request.target, request.headers,
                                 request.body, timeout=timeout, idle_timeout=idle,
                                 informational=request._interim)

    # outbound

    async def _from_app(self, request: Request, raw: Connection) -> Response:
        host = request.headers.get("Host", "")
        target = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        target = target.lower()
        if not target:
            return short_error(400, "no service named: send Host: <service> or http://<service>/...")
        request.headers.popall(PEER_HEADER, None)
        self._prepare(request)
        request.peer = self.service
        state = request.state
        state[LISTENER] = "outbound"
        if request.method == "CONNECT":  # a tunnel outside the mesh: only the egress rules, no plugins
            state[SPAN] = self.tracer.begin(request.headers)
            return await self.egress.connect(request)
        if target in self.config.services:
            state[UPSTREAM] = target
        else:  # a host outside the mesh: the egress rules decide at the end of the chain (_to_peer)
            refused = self.egress.accept(request)
            if refused is not None:
                return refused
        state[SPAN] = self.tracer.begin(request.headers)
        if self.tap.bodies:
            return await self.observer.tapped(self.outbound, request)
        return await self.outbound(request)

    async def _to_peer(self, request: Request) -> Response:
        state = request.state
        target = state.get(UPSTREAM) or ""
        if target not in self.config.services:
            if not target and state.get(EGRESS):
                return await self.egress.forward(request)
            raise UpstreamError(502, f"unknown service '{target}'")
        decision = self.policy.check(self.service, target, request.method, request.path)
        if not decision.allowed:
            self.denials.inc(direction="outbound", route=route_label(self.service, target), result="denied")
            return short_error(403, decision.reason, request.id)
        state[ROUTE] = route_label(self.service, target)
        backend = self.balancer.pick(target, state.get(AVOID), request)
        if backend is None:
            raise UpstreamError(503, f"service '{target}' has no instance running")
        # The bound of this try: the retry layer's per-try timeout, else the route's; never past the deadline.
        timeout = state.get(TRY_TIMEOUT) or decision.timeout or self.config.services[target].timeout
        idle = decision.stream_idle_timeout  # the route's, else the target service's own
        if idle is None:
            idle = self.config.services[target].stream_idle_timeout
        deadline = state.get(DEADLINE)
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamError(504, f"the deadline passed before '{target}' was called")
            if timeout is None or remaining < timeout:
                timeout = remaining
        headers = request.headers
        if timeout:
            headers[DEADLINE_HEADER] = str(int(timeout * 1000) or 1)
        if self.identity is not None:
            headers.popall(PEER_HEADER, None)
        else:
            headers[PEER_HEADER] = self.service
        state[BACKEND] = backend
        backend.outstanding += 1
        state[UPSTREAM_STARTED] = time.monotonic()
        try:
            response = await self._forward(backend.endpoint, request, timeout, idle)
        except UpstreamError:
            self.balancer.failed(backend)
            raise
        finally:
            backend.outstanding -= 1
        if 502 <= response.status <= 504:
            self.balancer.failed(backend)
        else:
            self.balancer.succeeded(backend)
        return response

    def _endpoint(self, service: str, host: str, port: int) -> Endpoint:
        """How to reach an instance of ``service``: the key of its connection pool."""
        if self.identity is not None:
            return Endpoint(host, port, self.identity.client, service)
        return Endpoint(host, port)

    def _verify_peer(self, endpoint: Endpoint, transport: Any) -> str | None:
        assert self.identity is not None
        found = self.identity.peer(transport)
        if found != endpoint.peer:
            HANDSHAKE_FAILURES["client", "wrong_peer"] += 1
            return (f"{endpoint.host}:{endpoint.port} presented the identity of "
                    f"{found or 'no mesh service'!r}, not {endpoint.peer!r}")
        return None

    # admin

    async def _admin(self, request: Request, raw: Connection) -> Response:
        return await self.admin(request)


# `mesh sidecar`: run one sidecar alone, as a container or a pod does.


def add_arguments(parser: Any) -> None:
    parser.add_argument("--config", required=True, help="mesh.toml (or its folder)")
    parser.add_argument("--service", required=True, help="the service this sidecar belongs to")
    parser.add_argument("--app-port", type=int, help="where the app listens (default: the service's port)")
    parser.add_argument("--app-host", default="127.0.0.1", help="address of the app (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address of the mesh listener, where other sidecars call (default: %(default)s)")
    parser.add_argument("--mesh-port", type=int, default=15001, metavar="PORT",
                        help="port of the mesh listener (default: %(default)s)")
    parser.add_argument("--outbound-port", type=int, default=15002, metavar="PORT",
                        help="port of the outbound listener on 127.0.0.1, the app's HTTP_PROXY "
                             "(default: %(default)s)")
    parser.add_argument("--admin-port", type=int, default=15000, metavar="PORT",
                        help="port of the admin listener on 127.0.0.1: /healthz, /readyz, /metrics "
                             "and the operator's endpoints (default: %(default)s)")
    parser.add_argument("--public-port", type=int, help="serve outside traffic here (default: the service's expose)")
    parser.add_argument("--public-host", default="127.0.0.1",
                        help="address of the public listener (default: %(default)s)")
    handoff.add_arguments(parser)
    parser.add_argument("--registry", help="JSON file: {\"services\": {name: [\"host:port\", ...]}}")
    parser.add_argument("--registry-dns", action="append", default=[], metavar="SERVICE=HOST:PORT",
                        help="keep SERVICE's instances equal to the addresses HOST resolves to, each on PORT, "
                             "resolved again every --registry-dns-every seconds (Docker Swarm: "
                             "tasks.<swarm service>); repeat for each service")
    parser.add_argument("--registry-dns-every", type=float, default=1.0, metavar="SECONDS",
                        help="seconds between two resolutions of a --registry-dns name (default: %(default)s)")
    parser.add_argument("--tls", metavar="DIR",
                        help="folder with cert.pem, key.pem and ca.pem: mutual TLS between sidecars "
                             "(without it the mesh listener is plain HTTP: development only)")
    parser.add_argument("--access-log", metavar="FILE",
                        help="append one JSON line per request to FILE (rotated at 10 MiB, two old files kept); "
                             "'-' for stderr (default: no access log)")
    parser.add_argument("--no-metrics", dest="metrics", action="store_false",
                        help="record nothing per request for /metrics (it then shows no request series); "
                             "for measuring what metrics cost")
    parser.add_argument("--instance", default="", metavar="LABEL",
                        help="this instance's label, in access log lines (default: none)")
    parser.add_argument("--admin-token-file", metavar="FILE",
                        help="file holding the token the admin listener wants (Authorization: Bearer); "
                             "without it only /healthz, /readyz and /metrics answer")


def access_log(where: str | None) -> AccessLog | None:
    """``--access-log``: a file, ``-`` for stderr, or nothing."""
    if not where:
        return None
    return AccessLog(stderr=True) if where == "-" else AccessLog(where)


async def serve(sidecar: Sidecar, public: handoff.Receiver | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop; with ``public``, serve the public listener
    on the socket handed over there once it arrives (if it cannot: stop, and raise why)."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await sidecar.start()
    log.info("sidecar %s ready: %s", sidecar.service,
             " ".join(f"{k}={v}" for k, v in sidecar.addresses().items()))
    taking = asyncio.ensure_future(public.pass_to(sidecar.serve_public, stopping.set)) if public else None
    try:
        await stopping.wait()
    finally:
        log.info("sidecar %s draining", sidecar.service)
        if taking is not None:
            taking.cancel()
        await sidecar.stop()
    if public is not None and public.error is not None:
        raise RuntimeError(f"the public listener's socket: {public.error}")


def main(args: Any) -> int:
    from mesh.errors import ConfigError, PluginError

    try:
        config = config_mod.load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 2
    if args.service not in config.services:
        print(f"--service: unknown service {args.service!r} (known: {', '.join(config.services)})")
        return 2
    spec = config.services[args.service]
    app_port = args.app_port or spec.port
    if app_port is None:
        print(f"--app-port: services.{args.service} has no 'port'; give --app-port")
        return 2
    try:
        sockets, public_handoff = handoff.sockets_from(args)
    except ValueError as exc:
        print(exc)
        return 2
    public = args.public_port if args.public_port is not None else spec.expose
    if args.public_port is None and (spec.instances is not None or "public" in sockets or public_handoff):
        public = None  # given a socket; or keyed: the service's front serves its expose port, not its instances
    ports = Ports(app=app_port, mesh=args.mesh_port, outbound=args.outbound_port,
                  admin=args.admin_port, public=public)
    registry = Registry.read(args.registry) if args.registry else Registry()
    try:
        dns_names = dns_registry.parse_names(args.registry_dns, config.services)
        watcher = dns_registry.DnsRegistry(registry, dns_names, args.registry_dns_every) if dns_names else None
    except ValueError as exc:
        print(f"--registry-dns: {exc}")
        return 2
    try:
        identity = Identity(args.tls, config.name) if args.tls else None
    except (OSError, ValueError) as exc:
        print(f"--tls {args.tls}: cannot load cert.pem, key.pem and ca.pem: {exc}")
        return 2
    if identity is None:
        log.warning("no --tls: the mesh listener is plain HTTP and trusts x-mesh-peer (development only)")
    token = None
    if args.admin_token_file:
        try:
            token = AdminToken.read(args.admin_token_file).value
        except (OSError, ValueError) as exc:
            print(f"--admin-token-file {args.admin_token_file}: cannot read the admin token: {exc}")
            return 2
    else:
        log.warning("no --admin-token-file: the admin listener refuses everything but /healthz, "
                    "/readyz and /metrics (it has no token to check callers against)")
    sidecar = Sidecar(config, args.service, ports, registry=registry, host=args.host,
                      app_host=args.app_host, public_host=args.public_host, identity=identity,
                      admin_token=token, instance=args.instance, access_log=access_log(args.access_log),
                      metrics=args.metrics, sockets=sockets)
    from mesh.runner import run

    try:
        run(dns_registry.serving(serve(sidecar, public_handoff), watcher))
    except (PluginError, OSError, RuntimeError) as exc:
        print(f"sidecar {args.service}: {exc}")
        return 1
    return 0
