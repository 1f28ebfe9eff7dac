"""Compose plugins into one handler, and own the error boundary around it.

The first listed plugin is outermost: it sees the request first and the
response last. For ``plugins = [A, B]``::

    A before -> B before -> terminal (app or peer) -> B after -> A after

Each layer is a plain ``await``: no task per layer, so context variables and
cancellation flow through unchanged. The chain is built once, when the
sidecar starts, and never changes after.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from mesh.errors import BodyTooLarge, ClientTimeout, PluginError, UpstreamError
from mesh.messages import Request, Response
from mesh.plugin import CallNext, Context, Handler, Plugin

__all__ = ["Chain", "build_chain", "error_response"]

log = logging.getLogger("mesh.chain")


def _layer(name: str, plugin: Plugin, call_next: CallNext) -> Handler:
    handle = plugin.handle

    async def layer(request: Request) -> Response:
        try:
            return await handle(request, call_next)
        except Exception as exc:
            # The innermost plugin that saw the exception names it.
            if getattr(exc, "mesh_plugin", None) is None:
                try:
                    exc.mesh_plugin = name  # type: ignore[attr-defined]
                except AttributeError:
                    pass
            raise

    return layer


def build_chain(plugins: Sequence[tuple[str, Plugin]], terminal: Handler) -> Handler:
    """Wrap ``terminal`` in ``plugins`` (``(name, plugin)`` pairs), first one outermost."""
    handler = terminal
    for name, plugin in reversed(plugins):
        handler = _layer(name, plugin, handler)
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

    def __init__(self, plugins: Sequence[tuple[str, Plugin]], terminal: Handler) -> None:
        self.plugins = tuple(plugins)
        self.handler = build_chain(self.plugins, terminal)
        self._started: list[tuple[str, Plugin]] = []

    async def __call__(self, request: Request) -> Response:
        try:
            return await self.handler(request)
        except Exception as exc:
            return error_response(exc, request)

    async def start(self, ctx: Context) -> None:
        """Start plugins in order; if plugin k fails, stop 1..k-1 and raise `PluginError`."""
        for name, plugin in self.plugins:
            try:
                await plugin.start(replace(ctx, logger=logging.getLogger(f"mesh.plugin.{name}")))
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
