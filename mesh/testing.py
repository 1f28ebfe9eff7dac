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

`replay` runs traffic recorded with ``mesh tap --save FILE`` through a
plugin and reports every request it now decides differently::

    async def test_jwt_decides_as_in_production():
        plugin = JWT(secret="...")
        async with started(plugin):
            report = await replay("tests/traffic.jsonl", plugin, name="jwt")
        assert report.ok, report.explain()
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from mesh.chain import Chain
from mesh.messages import Body, Request, Response
from mesh.plugin import Context, Handler, Plugin
from mesh.replay import Replayed, ReplayReport, replay

__all__ = ["ReplayReport", "Replayed", "TestMesh", "echo", "make_request", "ok", "replay", "run_chain", "run_mesh",
           "run_plugin", "started", "stream"]


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





class TestMesh:
    """Sidecars started by `run_mesh`, and where to reach them."""

    __test__ = False  # not a pytest test class

    def __init__(self, config: Any, sidecars: dict[str, Any], admin_token: str | None = None) -> None:
        self.config = config
        self.sidecars = sidecars
        self.ca: Any = None
        self.admin_token = admin_token

    def admin_headers(self) -> dict[str, str]:
        """What the sidecars' admin listeners want, as the controller sends it (`mesh.sidecar.admin`)."""
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def url(self, service: str, listener: str = "public") -> str:
        """``http://host:port`` of a service's ``public``, ``mesh``, ``outbound`` or ``admin`` listener."""
        scheme = "https" if self.sidecars[service].listeners[listener].tls else "http"
        return f"{scheme}://{self.sidecars[service].listeners[listener].address}"


@asynccontextmanager
async def run_mesh(toml: str, apps: dict[str, int], root: Any = None, *, tls: bool = True,
                   access_logs: Any = None, **sidecar_options: Any) -> AsyncIterator[TestMesh]:
    """Start one real sidecar per service of ``toml`` in this event loop.

    ``apps`` maps each service to the loopback port its app listens on (start
    the apps yourself, e.g. with aiohttp's test server). Every service gets
    a public listener on a free port, whether or not it is exposed, and
    the sidecars know each other and, unless ``tls=False``, talk mutual TLS
    with certificates from a CA made for the test (``TestMesh.ca``, its
    files under ``.mesh/`` in the mesh folder); ``sidecar_options`` go to each `Sidecar`
    (``limits``, ``upstream_limits``); with ``access_logs`` (a folder) each writes its access
    log to ``<folder>/<service>.jsonl``, complete once the block ends. Their admin listeners want a token made for
    the test (send ``TestMesh.admin_headers()``) unless ``admin_token=None``. For
    end-to-end plugin tests::

        async with run_mesh(TOML, {"web": app_port}) as mesh:
            async with session.get(mesh.url("web") + "/") as response: ...
    """
    import secrets
    import tempfile
    from pathlib import Path

    from mesh import config as config_mod
    from mesh.control.ca import CA
    from mesh.observe.accesslog import AccessLog
    from mesh.sidecar.identity import Identity
    from mesh.sidecar.registry import Registry
    from mesh.sidecar.sidecar import Ports, Sidecar

    folder = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="mesh-test-"))
    (folder / "mesh.toml").write_text(toml)
    cfg = config_mod.load(folder)
    registry = Registry()
    sidecars: dict[str, Sidecar] = {}
    ca = CA.load_or_create(cfg.state_dir / "ca", cfg.name) if tls else None
    sidecar_options.setdefault("admin_token", secrets.token_urlsafe(32))
    try:
        for name in cfg.services:
            identity = None
            if ca is not None:
                ca.write_instance(cfg.state_dir / "certs" / name, name, lifetime=3600)
                identity = Identity(cfg.state_dir / "certs" / name, cfg.name)
            log = AccessLog(Path(access_logs) / f"{name}.jsonl") if access_logs is not None else None
            sidecar = Sidecar(cfg, name, Ports(app=apps.get(name, 9), public=0), registry=registry,
                              identity=identity, access_log=log, instance=name, **sidecar_options)
            await sidecar.start()
            sidecars[name] = sidecar
        registry.update({name: [s.listeners["mesh"].address] for name, s in sidecars.items()})
        mesh = TestMesh(cfg, sidecars, sidecar_options["admin_token"])
        mesh.ca = ca
        yield mesh
    finally:
        for sidecar in reversed(list(sidecars.values())):
            await sidecar.stop()
