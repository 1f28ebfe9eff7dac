"""The one extension point: `Plugin.handle(request, call_next)`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh.messages import Request, Response
from mesh.observe.metrics import Metrics, PluginMetrics

__all__ = ["CallNext", "Context", "Handler", "Plugin"]

Handler = Callable[[Request], Awaitable[Response]]
CallNext = Handler


@dataclass
class Context:
    """What a plugin's ``start`` gets: where it runs and what it may use.

    ``root`` is the folder of mesh.toml (resolve relative files against it),
    ``logger`` a logger named after the plugin, ``state`` a dict shared by
    every plugin of this sidecar (connection pools, for example), and
    ``metrics`` where the plugin defines its own metrics (``counter``,
    ``gauge``, ``histogram``: see `mesh.observe.metrics`), shown on the
    sidecar's ``/metrics`` as ``mesh_<plugin>_<name>``.
    """

    service: str = "test"
    mesh: str = "mesh"
    root: Path = field(default_factory=Path.cwd)
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("mesh.plugin"))
    state: dict[str, Any] = field(default_factory=dict)
    metrics: PluginMetrics = field(default_factory=lambda: PluginMetrics(Metrics(), "plugin", "plugin"))

    def path(self, value: str | Path) -> Path:
        """A path from mesh.toml, made absolute against mesh.toml's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.root / path


class Plugin:
    """Base class of every plugin: override `handle`, and `start`/`stop` if needed.

    Options from mesh.toml arrive as the constructor's keyword arguments; their
    type hints are the schema. ``__init__`` should only check and store them:
    open connections or start background work in `start`.

    One instance serves every request of a sidecar concurrently, so
    per-request data belongs on ``request.state``, never on ``self``.
    """

    async def start(self, ctx: Context) -> None:
        """Acquire what the plugin holds (pools, refreshers). Runs before the first request."""

    async def stop(self) -> None:
        """Release what `start` acquired. Runs once, after the last request."""

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        """Answer ``request``.

        Await ``call_next(request)`` to pass it on and get the response, then
        act on that response. Return a `Response` without calling
        ``call_next`` to answer without forwarding (401, 429, a cache hit).
        Leave the body alone unless you need it: ``await request.read()``
        buffers it. Raising gives the client a 500 and never lets the request
        past this plugin.
        """
        return await call_next(request)
