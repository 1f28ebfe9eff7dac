"""Test a plugin alone: no sockets, no sidecar, a plain async function as upstream.

::

    from mesh.testing import make_request, run_plugin

    async def test_stamp():
        response = await run_plugin(Stamp(value="x"), make_request("GET", "/"))
        assert response.headers["X-Stamp"] == "x"

``upstream`` is any ``async def (Request) -> Response``; by default it answers
200 with the body ``ok``. `run_chain` runs several plugins behind the same
error boundary the sidecar uses, so a raising plugin gives a 500 there, while
`run_plugin` lets the exception through for the test to see.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from .chain import Chain
from .messages import Body, Request, Response
from .plugin import Context, Handler, Plugin

__all__ = ["make_request", "run_plugin", "run_chain", "started", "echo", "ok", "stream"]


def make_request(
    method: str = "GET",
    path: str = "/",
    *,
    query: str = "",
    headers: Any = None,
    body: Body = b"",
    peer: str | None = None,
    service: str = "test",
    client: str = "127.0.0.1",
    state: dict[str, Any] | None = None,
) -> Request:
    """A `Request` as the sidecar would hand it to the first plugin."""
    if "?" in path and not query:
        path, _, query = path.partition("?")
    return Request(method, path, query=query, headers=headers, body=body, peer=peer,
                   service=service, client=client, state=state)


async def ok(request: Request) -> Response:
    """An upstream that answers 200 ``ok``."""
    return Response(200, b"ok", {"Content-Type": "text/plain"})


async def echo(request: Request) -> Response:
    """An upstream that answers with the request's method, target and body."""
    body = await request.read()
    return Response(200, body, {"X-Method": request.method, "X-Target": request.target})


async def stream(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    """An async iterator over ``chunks``, to build streaming bodies in tests."""
    for chunk in chunks:
        yield chunk


async def run_plugin(plugin: Plugin, request: Request | None = None,
                     upstream: Handler = ok) -> Response:
    """Call ``plugin.handle`` once with ``upstream`` as ``call_next``; exceptions propagate."""
    return await plugin.handle(request or make_request(), upstream)


async def run_chain(plugins: Sequence[Plugin], request: Request | None = None,
                    upstream: Handler = ok) -> Response:
    """Run ``plugins`` (first outermost) as the sidecar does, errors turned into responses."""
    chain = Chain([(type(p).__name__, p) for p in plugins], upstream)
    return await chain(request or make_request())


@asynccontextmanager
async def started(*plugins: Plugin, ctx: Context | None = None) -> AsyncIterator[Context]:
    """Run the plugins' ``start`` on entry and ``stop`` on exit."""
    chain = Chain([(type(p).__name__, p) for p in plugins], ok)
    ctx = ctx or Context()
    await chain.start(ctx)
    try:
        yield ctx
    finally:
        await chain.stop()



