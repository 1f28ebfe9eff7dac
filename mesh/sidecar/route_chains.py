"""Per-route plugins: a service's chain for some of its paths, and a caller's chain for one route.

A service's ``[[services.NAME.routes]]`` entries give plugins to the
requests for some of its paths (``paths``, optional ``methods``: ``*``
globs on the normalized path, as ``[[routes]]`` narrow). The first entry
that matches a request picks it, after the built-in inbound layers, so
identity, route policy and the caller's deadline run for every request
and no route can skip them::

    inherit = true (default):  identity -> policy -> caller-deadline -> plugins... -> route plugins... -> app
    inherit = false:           identity -> policy -> caller-deadline -> route plugins... -> app
    no entry matches:          identity -> policy -> caller-deadline -> plugins... -> app

(If the service lists a built-in layer itself, everything up to it runs
for every request, before any route's plugins.)

``plugins`` on a ``[[routes]]`` entry run in the calling sidecar, on the
calls that route selects (the first entry from the caller to the target
whose ``paths`` and ``methods`` match, as for its ``timeout`` and
``retries``), after the caller's own ``outbound`` plugins and before the
built-in outbound layers, so they run once per call, not once per try::

    outbound plugins... -> route plugins... -> deadline -> breaker -> retry -> route check, balancer -> peer

Every plugin is one instance per sidecar, shared by all the requests
that reach it: a service's rate limit inherited by a route is the same
bucket. The chain entries are named where they were declared
(``services.web.routes[0].plugins[1] (jwt)``), measured like the others,
and started with the rest of their chain, in this order (stopped in
reverse). A service without routes, or a caller whose routes have no
plugins, gets the plain `Chain` of before: no layer, no check added.
"""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import NamedTuple

from mesh.chain import Chain, Meter, build_chain
from mesh.config import MeshConfig, PluginSpec, RouteConfig, ServiceConfig, build_plugins
from mesh.keys import UPSTREAM, StateKey
from mesh.messages import Request, Response
from mesh.plugin import Handler, Plugin
from mesh.sidecar.inbound import BUILTIN as INBOUND_BUILTIN
from mesh.sidecar.inbound import with_defaults as with_inbound_defaults
from mesh.sidecar.observing import plugin_label
from mesh.sidecar.resilience import with_defaults as with_outbound_defaults
from mesh.sidecar.routes import Rule

__all__ = ["ChainOrder", "RoutedChain", "chain_order", "inbound_chain", "outbound_chain", "show"]

Plugins = list[tuple[str, Plugin]]

# request.state: the inner chain of the inherited route a request matched, for the end of the service's chain
_INHERITED: StateKey[Handler] = StateKey("mesh.route_chain")


class RoutedChain(Chain):
    """A `Chain` whose ``front`` layers hand each request to ``dispatch``, which picks the rest.

    ``plugins`` lists every plugin of every path in chain order: the order they start in.
    """

    def __init__(self, front: Plugins, dispatch: Handler, plugins: Plugins, meter: Meter | None) -> None:
        super().__init__(front, dispatch, meter)
        self.plugins = tuple(plugins)


class _Inbound(NamedTuple):
    """A service's inbound chain in parts: what runs for every request, its plugins, and each route's."""

    front: Plugins
    plugins: Plugins
    routes: list[tuple[Rule, bool, Plugins]]  # (paths and methods, inherit, the route's plugins)


def _rule(paths: list[str], methods: list[str]) -> Rule:
    """``paths`` and ``methods`` matched as a ``[[routes]]`` entry's are (a `Rule` reads only those)."""
    return Rule(RouteConfig(source="", to="", paths=paths, methods=methods))


def _inbound(service: ServiceConfig) -> _Inbound:
    chain = with_inbound_defaults(build_plugins(service.plugin_specs))
    builtin = tuple(cls for _, cls in INBOUND_BUILTIN)
    split = max((i + 1 for i, (_, plugin) in enumerate(chain) if isinstance(plugin, builtin)), default=0)
    routes = [(_rule(route.paths, route.methods), route.inherit, build_plugins(route.plugin_specs))
              for route in service.routes]
    return _Inbound(chain[:split], chain[split:], routes)


def _outbound(config: MeshConfig, service: str) -> tuple[Plugins, Plugins, list[tuple[RouteConfig, Plugins]]]:
    """The service's ``outbound`` plugins, the built-in layers after them, and its routes with their plugins."""
    own = build_plugins(config.services[service].outbound_specs)
    chain = with_outbound_defaults(own)
    routes = [(route, build_plugins(route.plugin_specs)) for route in config.routes if route.source == service]
    return chain[:len(own)], chain[len(own):], routes


def inbound_chain(service: ServiceConfig, terminal: Handler, meter: Meter | None = None) -> Chain:
    """``service``'s inbound chain around ``terminal`` (the call to its app), with its routes' plugins."""
    parts = _inbound(service)
    if not parts.routes:
        return Chain(parts.front + parts.plugins, terminal, meter)

    def inner(request: Request) -> Awaitable[Response]:
        chosen = request.state.get(_INHERITED)
        return terminal(request) if chosen is None else chosen(request)

    inherited = any(inherit and plugins for _, inherit, plugins in parts.routes)
    common = build_chain(parts.plugins, inner if inherited else terminal, meter)
    table: list[tuple[Rule, Handler | None, bool]] = []
    for rule, inherit, plugins in parts.routes:
        handler = build_chain(plugins, terminal, meter) if plugins or not inherit else None
        table.append((rule, handler, inherit))
    # One check for a request no route wants: every route's paths at once (and methods, if all narrow them).
    every = [route.methods for route in service.routes]
    wanted = _rule([path for route in service.routes for path in route.paths],
                   [method for methods in every for method in methods] if all(every) else [])

    def dispatch(request: Request) -> Awaitable[Response]:
        method, path = request.method, request.path
        if wanted.matches(method, path):
            for rule, handler, inherit in table:
                if rule.matches(method, path):
                    if handler is None:
                        break
                    if not inherit:
                        return handler(request)
                    request.state[_INHERITED] = handler
                    break
        return common(request)

    every_plugin = parts.front + parts.plugins + [entry for _, _, plugins in parts.routes for entry in plugins]
    return RoutedChain(parts.front, dispatch, every_plugin, meter)


def outbound_chain(config: MeshConfig, service: str, terminal: Handler, meter: Meter | None = None) -> Chain:
    """``service``'s outbound chain around ``terminal`` (route check, balancer, the peer), with the
    plugins of the ``[[routes]]`` it calls on."""
    own, builtin, routes = _outbound(config, service)
    if not any(plugins for _, plugins in routes):
        return Chain(own + builtin, terminal, meter)
    rest = build_chain(builtin, terminal, meter)
    targets: dict[str, list[tuple[Rule, Handler | None]]] = {}
    for route, plugins in routes:
        targets.setdefault(route.to, []).append(
            (Rule(route), build_chain(plugins, rest, meter) if plugins else None))
    # Only the targets a route with plugins leads to are looked at further.
    targets = {to: rules for to, rules in targets.items() if any(handler for _, handler in rules)}

    def dispatch(request: Request) -> Awaitable[Response]:
        rules = targets.get(request.state.get(UPSTREAM) or "")
        if rules is not None:
            method, path = request.method, request.path
            for rule, handler in rules:
                if rule.matches(method, path):
                    if handler is not None:
                        return handler(request)
                    break
        return rest(request)

    every_plugin = own + [entry for _, plugins in routes for entry in plugins] + builtin
    return RoutedChain(own, dispatch, every_plugin, meter)


class ChainOrder(NamedTuple):
    """A service's chains as `mesh check` shows them: chain entry names, outermost first."""

    inbound: list[str]
    routes: list[list[str]]  # per [[services.NAME.routes]] entry: the whole chain of a request it picks
    outbound: list[str]
    calls: list[tuple[RouteConfig, list[str]]]  # per [[routes]] entry from this service: a call's chain


def chain_order(config: MeshConfig, service: str) -> ChainOrder:
    """The order the sidecar of ``service`` runs its plugins in, for each kind of request."""
    parts = _inbound(config.services[service])
    front, plugins = _names(parts.front), _names(parts.plugins)
    routes = [front + (plugins if inherit else []) + _names(own) for _, inherit, own in parts.routes]
    own, builtin, calls = _outbound(config, service)
    return ChainOrder(front + plugins, routes, _names(own + builtin),
                      [(route, _names(own + entries + builtin)) for route, entries in calls])


def show(names: Sequence[str], end: str, own: Sequence[PluginSpec] = ()) -> str:
    """``a -> b -> [c -> d] -> end``: a chain by its plugins' short names, the route's ``own`` in brackets."""
    labels = {spec.label for spec in own}
    shown = [plugin_label(name) for name in names]
    marked = [i for i, name in enumerate(names) if name in labels]
    if marked:
        shown[marked[0]] = "[" + shown[marked[0]]
        shown[marked[-1]] += "]"
    return " -> ".join([*shown, end])


def _names(plugins: Sequence[tuple[str, Plugin]]) -> list[str]:
    return [name for name, _ in plugins]
