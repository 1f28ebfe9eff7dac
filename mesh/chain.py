"""Compose plugins into one handler, and own the error boundary around it.

The first listed plugin is outermost: it sees the request first and the
response last. For ``plugins = [A, B]``::

    A before -> B before -> terminal (app or peer) -> B after -> A after

Each layer is a plain ``await``: no task per layer, so context variables and
cancellation flow through unchanged. The chain is built once, when the
sidecar starts, and never changes after.

A `RequestLayer` (mesh's built-in inbound layers) acts only on the way in:
the chain calls its ``before(request)`` and then the next layer directly,
so it costs a function call, not a coroutine of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Sequence
from dataclasses import replace
from time import perf_counter
from typing import Protocol

from mesh.errors import BodyTooLarge, ClientTimeout, PluginError, UpstreamError
from mesh.messages import Request, Response
from mesh.observe.metrics import PluginMetrics
from mesh.plugin import CallNext, Context, Handler, Plugin

__all__ = ["ANSWERED_BY", "PLUGIN_CALLS", "Chain", "Meter", "RequestLayer", "build_chain", "error_response"]

log = logging.getLogger("mesh.chain")


def _name(exc: Exception, name: str) -> None:
    # The innermost plugin that saw the exception names it.
    if getattr(exc, "mesh_plugin", None) is None:
        try:
            exc.mesh_plugin = name  # type: ignore[attr-defined]
        except AttributeError:
            pass


class RequestLayer(Plugin):
    """A plugin that acts only on the request, on its way in, and never on the response.

    Override `before`: change the request, or return a `Response` to answer
    it there (a 403, say); None passes it on. The chain then calls the next
    layer itself, without an ``await`` of this layer's own. A subclass that
    overrides `handle` instead is an ordinary plugin.
    """

    def before(self, request: Request) -> Response | None:
        return None

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        answer = self.before(request)
        if answer is not None:
            return answer
        return await call_next(request)


async def _answered(response: Response) -> Response:
    return response


def _layer(name: str, plugin: Plugin, call_next: CallNext) -> Handler:
    handle = plugin.handle

    async def layer(request: Request) -> Response:
        try:
            return await handle(request, call_next)
        except Exception as exc:
            _name(exc, name)
            raise

    return layer


class Meter(Protocol):
    """What the chain tells about each plugin call when measured (`mesh.observe` keeps the numbers).

    While ``per_request`` is true (someone taps the sidecar, or spans are exported), each measured
    call is also noted on its request: ``request.state[PLUGIN_CALLS]`` lists
    ``(name, began, elapsed, own, answered, failed)`` tuples in the order the calls ended
    (``began`` a `time.perf_counter` value, ``elapsed`` the whole call's seconds).
    """

    @property
    def per_request(self) -> bool: ...

    def record(self, name: str, own: float, answered: int | None, failed: bool) -> None:
        """``own``: seconds in the plugin, the layers inside it excluded; ``answered``: the status
        when it answered itself (never called ``call_next``); ``failed``: it raised."""

    def plugin_metrics(self, name: str) -> PluginMetrics:
        """What the plugin called ``name`` gets as ``ctx.metrics``."""


# request.state: the name of the plugin that answered a request itself, for the access log
ANSWERED_BY = "mesh.answered_by"
# request.state: the measured plugin calls of this request, while the meter wants them (`Meter`)
PLUGIN_CALLS = "mesh.plugin_calls"


def _measured_layer(name: str, plugin: Plugin, call_next: CallNext, meter: Meter) -> Handler:
    handle = plugin.handle
    record = meter.record

    async def layer(request: Request) -> Response:
        inside = [0.0, False]  # seconds in the layers inside, and whether they were called

        async def next_layer(request: Request) -> Response:
            inside[1] = True
            began = perf_counter()
            try:
                return await call_next(request)
            finally:
                inside[0] += perf_counter() - began

        began = perf_counter()
        answered: int | None = None
        try:
            response = await handle(request, next_layer)
        except Exception as exc:
            _name(exc, name)
            elapsed = perf_counter() - began
            record(name, elapsed - inside[0], None, True)
            if meter.per_request:
                request.state.setdefault(PLUGIN_CALLS, []).append(
                    (name, began, elapsed, elapsed - inside[0], None, True))
            raise
        elapsed = perf_counter() - began
        if not inside[1]:
            request.state[ANSWERED_BY] = name
            answered = response.status
        record(name, elapsed - inside[0], answered, False)
        if meter.per_request:
            request.state.setdefault(PLUGIN_CALLS, []).append(
                (name, began, elapsed, elapsed - inside[0], answered, False))
        return response

    return layer


def _enter(layers: Sequence[tuple[str, RequestLayer]], call_next: CallNext) -> Handler:
    """Request layers next to each other, in one call: each one's ``before``, then ``call_next``."""
    befores = tuple((name, layer.before) for name, layer in layers)

    def enter(request: Request) -> Awaitable[Response]:
        entry = befores[0]
        try:
            for entry in befores:
                answer = entry[1](request)
                if answer is not None:
                    request.state[ANSWERED_BY] = entry[0]
                    return _answered(answer)
        except Exception as exc:
            _name(exc, entry[0])
            raise
        return call_next(request)

    return enter


def build_chain(plugins: Sequence[tuple[str, Plugin]], terminal: Handler, meter: Meter | None = None) -> Handler:
    """Wrap ``terminal`` in ``plugins`` (``(name, plugin)`` pairs), first one outermost.

    With a ``meter``, each plugin's calls are measured (its own time, whether it answered
    itself, whether it raised); request layers that run together (`RequestLayer`) are not:
    they are a function call each, and a request they answer shows in ``ANSWERED_BY``.
    """
    handler = terminal
    run: list[tuple[str, RequestLayer]] = []  # request layers next to each other, innermost first
    for name, plugin in reversed(plugins):
        if isinstance(plugin, RequestLayer) and type(plugin).handle is RequestLayer.handle:
            run.append((name, plugin))
            continue
        if run:
            handler = _enter(run[::-1], handler)
            run = []
        handler = _layer(name, plugin, handler) if meter is None else _measured_layer(name, plugin, handler, meter)
    if run:
        handler = _enter(run[::-1], handler)
    return handler


def short_error(status: int, reason: str, request_id: str | None = None) -> Response:
    """A short plain-text error body of our own: no library banner, no echo of input."""
    text = f"{status} {Response(status).reason}: {reason}\n"
    if request_id:
        text += f"request id: {request_id}\n"
    response = Response(status, text)
    if request_id:
        response.headers["x-request-id"] = request_id
    return response


def error_response(exc: BaseException, request: Request) -> Response:
    """What the client gets when the chain raised ``exc``: fail closed, never forward."""
    if isinstance(exc, UpstreamError):
        response = short_error(exc.status, exc.reason, request.id)
        if exc.status == 503:
            response.headers["Retry-After"] = "1"
        return response
    if isinstance(exc, ClientTimeout):
        return short_error(408, exc.reason, request.id)
    if isinstance(exc, BodyTooLarge):
        return short_error(413, f"request body over {exc.limit} bytes", request.id)
    plugin = getattr(exc, "mesh_plugin", None)
    where = f"plugin {plugin}" if plugin else "the sidecar"
    log.error("request %s: %s raised", request.id, where, exc_info=exc)
    return short_error(500, "internal error", request.id)


class Chain:
    """A service's plugins, composed around a terminal handler, with their lifecycle."""

    def __init__(self, plugins: Sequence[tuple[str, Plugin]], terminal: Handler, meter: Meter | None = None) -> None:
        self.plugins = tuple(plugins)
        self.meter = meter
        self.handler = build_chain(self.plugins, terminal, meter)
        self.inflight = 0  # requests in the chain now (`mesh reload` waits for the old chains' to end)
        self._started: list[tuple[str, Plugin]] = []

    async def __call__(self, request: Request) -> Response:
        self.inflight += 1
        try:
            return await self.handler(request)
        except Exception as exc:
            return error_response(exc, request)
        finally:
            self.inflight -= 1

    async def start(self, ctx: Context) -> None:
        """Start plugins in order; if plugin k fails, stop 1..k-1 and raise `PluginError`."""
        for name, plugin in self.plugins:
            try:
                metrics = self.meter.plugin_metrics(name) if self.meter is not None else ctx.metrics
                await plugin.start(replace(ctx, logger=logging.getLogger(f"mesh.plugin.{name}"), metrics=metrics))
            except Exception as exc:
                await self.stop()
                raise PluginError(f"plugin {name} failed to start: {exc}") from exc
            self._started.append((name, plugin))

    async def stop(self) -> None:
        """Stop started plugins in reverse order; a failing stop is logged, not raised."""
        while self._started:
            name, plugin = self._started.pop()
            try:
                await plugin.stop()
            except Exception:
                log.exception("plugin %s failed to stop", name)
