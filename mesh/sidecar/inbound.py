"""Built-in inbound layers: who calls, whether the call is allowed, by when it must be answered.

They are ordinary `Plugin`s, like the outbound layers of `mesh.sidecar.resilience`.
A sidecar puts the ones a service's ``plugins`` list does not already hold
in front of the user's plugins, so a service's inbound chain is by default::

    identity -> policy -> caller-deadline -> user plugins... -> app (loopback)

and ``GET /config`` on the admin listener lists them under ``plugins`` as
``mesh.defaults (identity)``, ``mesh.defaults (policy)`` and
``mesh.defaults (caller-deadline)``. (A plugin that sets
``request.state[UPSTREAM]`` sends the request on through this service's
outbound chain instead of to the app.)

Both inbound listeners run this chain. Before it, the listener records
on the request what only the connection knows:

- ``request.peer``: on the mesh listener, the service named by the
  caller's verified client certificate (without mutual TLS, in
  development only, what the caller's ``x-mesh-peer`` says); on the
  public listener None, and every ``x-mesh-peer`` from outside is removed.
- ``request.state[LISTENER]``: ``"mesh"`` or ``"public"``.

Replacing one works as for the outbound layers: list it yourself and it
runs where it is listed, in place of the default one; a subclass
(``use = "my_policy.py:MyPolicy"`` with ``class MyPolicy(mesh.sidecar.inbound.RoutePolicy)``)
replaces it the same way. Each does its work in ``before(request)`` (a
`mesh.chain.RequestLayer`: a `Response` answers there, None passes the
request on); a subclass may override that, or ``handle`` as any plugin does. So ``plugins = [{ use = "audit.py:Audit" },
{ use = "policy" }]`` runs Audit before the route check, on the calls
policy refuses too; ``{ use = "policy", mode = "audit" }`` logs the calls
no route allows and lets them through, for this service only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

from mesh.chain import RequestLayer, short_error
from mesh.config import MeshConfig, RouteConfig
from mesh.http.headers import PEER_HEADER
from mesh.keys import DEADLINE, LISTENER, StateKey
from mesh.messages import Request, Response
from mesh.observe.metrics import PluginMetrics
from mesh.plugin import Context, Plugin
from mesh.sidecar.observing import ROUTE, route_label
from mesh.sidecar.resilience import DEADLINE_HEADER, deadline_from
from mesh.sidecar.routes import Policy

__all__ = ["BUILTIN", "CallerDeadline", "INBOUND", "Inbound", "PeerIdentity", "RoutePolicy", "policy_denials",
           "with_defaults"]

MESH = "mesh"  # request.state[LISTENER] of a call from another sidecar


class Inbound:
    """What the inbound layers need from mesh.toml, resolved once: the service, its routes, whether it is keyed."""

    def __init__(self, config: MeshConfig | None = None, service: str = "", policy: Policy | None = None) -> None:
        self.service = service
        self.routes: list[RouteConfig] = list(config.routes) if config is not None else []
        self.mode = config.mode if config is not None else "enforce"
        spec = config.services.get(service) if config is not None else None
        self.keyed = spec is not None and spec.instances is not None
        self.policy = policy if policy is not None else Policy(self.routes, self.mode)
        self.services = frozenset(config.services) if config is not None else frozenset()


INBOUND: StateKey[Inbound] = StateKey("mesh.inbound")  # Context.state: this sidecar's `Inbound`
_NO_CONFIG = Inbound()


class _Layer(RequestLayer):
    """What the inbound layers share: they act only on the request (a `RequestLayer`, so no await
    of their own on the way), with this sidecar's `Inbound`, found at start."""

    _inbound: Inbound = _NO_CONFIG

    async def start(self, ctx: Context) -> None:
        self._inbound = ctx.state.get(INBOUND, _NO_CONFIG)


class PeerIdentity(_Layer):
    """Decide who calls: ``request.peer`` for the plugins, ``x-mesh-peer`` for the app.

    The listener put on ``request.peer`` what the connection says. This
    layer removes every ``x-mesh-peer`` the request carries and, when there
    is a peer, sets one naming it, so the app can trust the header. One
    exception: a keyed service's front calls the service's instances as the
    service itself and names, in ``x-mesh-peer``, the caller it checked; on
    a keyed service, from the service's own identity, that name is the peer.
    """

    def before(self, request: Request) -> Response | None:
        headers = request.headers
        named = headers.popall(PEER_HEADER, None)  # SECURITY: the connection says who calls, not a header
        peer = request.peer
        inbound = self._inbound
        if named and peer is not None and peer == inbound.service and inbound.keyed:
            # The front of this keyed service checked the caller and names it.
            peer = request.peer = named[0]
        if peer:
            headers[PEER_HEADER] = peer
        return None


class RoutePolicy(_Layer):
    """Answer 403, with the reason, a call from another service that no ``[[routes]]`` entry allows.

    Only calls from other sidecars (the mesh listener) are checked: outside
    callers reach an ``expose``d service without a route. ``mode``
    (``"enforce"`` or ``"audit"``) replaces ``[mesh] mode`` for calls to
    this service; in ``audit`` a call no route allows is logged and goes on.
    Both are counted in `policy_denials` (``result``: ``denied`` or ``audited``).
    """

    def __init__(self, mode: Literal["enforce", "audit"] | None = None) -> None:
        self.mode = mode
        self._policy = _NO_CONFIG.policy
        self._denials = policy_denials(Context().metrics)

    async def start(self, ctx: Context) -> None:
        await super().start(ctx)
        inbound = self._inbound
        self._policy = inbound.policy if self.mode is None else Policy(inbound.routes, self.mode)
        self._denials = policy_denials(ctx.metrics)

    def before(self, request: Request) -> Response | None:
        if request.state.get(LISTENER) == MESH:
            peer = request.peer
            service = self._inbound.service
            decision = self._policy.check(peer, service, request.method, request.path)
            if decision.reason:
                caller = peer if peer is None or peer in self._inbound.services else "other"
                self._denials.inc(direction="inbound", route=route_label(caller, service),
                                  result="audited" if decision.allowed else "denied")
            if not decision.allowed:
                return short_error(403, decision.reason, request.id)
            request.state[ROUTE] = route_label(peer, service)
        return None


class CallerDeadline(_Layer):
    """Take the caller's deadline from ``x-mesh-deadline-ms`` into ``request.state[DEADLINE]``.

    Only from another sidecar (the mesh listener), where the header says how
    many milliseconds the caller has left. The call to the app is then
    bounded by it as well as by the service's ``timeout``, and the app gets
    the header with what is left, to bound the calls it makes in turn; if
    it passed before the app is called, the answer is 504.
    """

    def before(self, request: Request) -> Response | None:
        if request.state.get(LISTENER) == MESH:
            value = request.headers.get(DEADLINE_HEADER)
            if value is not None and (deadline := deadline_from(value, time.monotonic())) is not None:
                request.state[DEADLINE] = deadline
        return None


def policy_denials(metrics: PluginMetrics) -> Any:
    """``mesh_policy_denials_total{direction, route, result}``: calls no route allows, counted where the
    policy met them (``inbound`` here, ``outbound`` at the caller's sidecar, which counts only ``denied``
    ones: a call it lets through in audit mode is counted by the callee)."""
    return metrics.counter("denials", "Calls no route allows: refused (denied) or let through in audit mode "
                                      "(audited)", ["direction", "route", "result"])


# The built-in layers in the order they run, outermost first, by their mesh.toml names.
BUILTIN: tuple[tuple[str, type[_Layer]], ...] = (
    ("identity", PeerIdentity),
    ("policy", RoutePolicy),
    ("caller-deadline", CallerDeadline),
)


def with_defaults(plugins: Sequence[tuple[str, Plugin]]) -> list[tuple[str, Plugin]]:
    """A default instance of each built-in layer ``plugins`` do not hold, followed by ``plugins``."""
    chain = [(f"mesh.defaults ({name})", cls()) for name, cls in BUILTIN
             if not any(isinstance(plugin, cls) for _, plugin in plugins)]
    return chain + list(plugins)
