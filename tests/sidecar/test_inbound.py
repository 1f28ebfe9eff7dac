"""`mesh.sidecar.inbound`: the built-in inbound layers alone, then as the head of a real sidecar's chain."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
from aiohttp import web

from mesh import DEADLINE, LISTENER, Context, Plugin, Request, Response
from mesh import config as config_mod
from mesh.sidecar.inbound import INBOUND, CallerDeadline, Inbound, PeerIdentity, RoutePolicy, with_defaults
from mesh.sidecar.resilience import DEADLINE_HEADER
from mesh.testing import make_request, run_mesh, run_plugin, started

TOML = """
[mesh]
name = "in"

[services.web]
command = "x"
{web}

[services.orders]
command = "x"
{orders}

[services.sandbox]
command = "x"
instances = {{ key = "header:X-Session" }}

[[routes]]
from = "web"
to = "orders"
paths = ["/orders/*"]
"""


def inbound_of(tmp_path: Any, service: str) -> Context:
    """The start context a sidecar of ``service`` gives its inbound layers."""
    (tmp_path / "mesh.toml").write_text(TOML.format(web="", orders=""))
    ctx = Context(service=service)
    ctx.state[INBOUND] = Inbound(config_mod.load(tmp_path), service)
    return ctx


class Seen:
    """An upstream that keeps the request it was called with."""

    def __init__(self) -> None:
        self.request: Request | None = None

    async def __call__(self, request: Request) -> Response:
        self.request = request
        return Response(200)


def from_mesh(peer: str | None, path: str = "/", headers: Any = None, service: str = "orders") -> Request:
    """A request as the mesh listener hands it to the chain: the certificate's peer recorded."""
    return make_request("GET", path, headers=headers, peer=peer, service=service, state={LISTENER: "mesh"})


def from_outside(path: str = "/", headers: Any = None, service: str = "orders") -> Request:
    return make_request("GET", path, headers=headers, service=service, state={LISTENER: "public"})


# identity


async def test_identity_replaces_any_peer_header_with_the_verified_peer(tmp_path):
    layer, seen = PeerIdentity(), Seen()
    async with started(layer, ctx=inbound_of(tmp_path, "orders")):
        await run_plugin(layer, from_mesh("web", headers={"x-mesh-peer": "admin"}), seen)
        assert seen.request is not None
        assert seen.request.peer == "web" and seen.request.headers.getall("x-mesh-peer") == ["web"]
        await run_plugin(layer, from_mesh(None, headers={"x-mesh-peer": "admin"}), seen)
        assert seen.request.peer is None and "x-mesh-peer" not in seen.request.headers


async def test_only_a_keyed_services_own_front_names_the_caller(tmp_path):
    layer, seen = PeerIdentity(), Seen()
    async with started(layer, ctx=inbound_of(tmp_path, "sandbox")):
        # The front calls as the service itself and names the caller it checked.
        await run_plugin(layer, from_mesh("sandbox", headers={"x-mesh-peer": "web"}, service="sandbox"), seen)
        assert seen.request is not None and seen.request.peer == "web"
        # Another service cannot name anyone.
        await run_plugin(layer, from_mesh("web", headers={"x-mesh-peer": "orders"}, service="sandbox"), seen)
        assert seen.request.peer == "web"
    layer = PeerIdentity()
    async with started(layer, ctx=inbound_of(tmp_path, "orders")):  # not keyed: no front to trust
        await run_plugin(layer, from_mesh("orders", headers={"x-mesh-peer": "web"}), seen)
        assert seen.request.peer == "orders" and seen.request.headers["x-mesh-peer"] == "orders"


# policy


async def test_policy_refuses_undeclared_calls_from_the_mesh_only(tmp_path):
    layer, seen = RoutePolicy(), Seen()
    async with started(layer, ctx=inbound_of(tmp_path, "orders")):
        assert (await run_plugin(layer, from_mesh("web", "/orders/7"), seen)).status == 200
        refused = from_mesh("web", "/admin")
        response = await run_plugin(layer, refused, seen)
        text = (await response.read()).decode()
        assert response.status == 403 and "'web'" in text and "/admin" in text and refused.id in text
        assert (await run_plugin(layer, from_mesh(None, "/orders/7"), seen)).status == 403
        # From outside, an exposed service takes calls without a route.
        assert (await run_plugin(layer, from_outside("/admin"), seen)).status == 200


async def test_policy_in_audit_mode_logs_and_lets_through(tmp_path, caplog):
    layer = RoutePolicy(mode="audit")
    async with started(layer, ctx=inbound_of(tmp_path, "orders")):
        assert (await run_plugin(layer, from_mesh("web", "/admin"), Seen())).status == 200
    assert "would deny" in caplog.text


# deadline


async def test_caller_deadline_comes_from_another_sidecar_only():
    seen = Seen()
    await run_plugin(CallerDeadline(), from_mesh("web", headers={DEADLINE_HEADER: "300"}), seen)
    assert seen.request is not None
    assert 0.25 < seen.request.state[DEADLINE] - time.monotonic() <= 0.3
    await run_plugin(CallerDeadline(), from_outside(headers={DEADLINE_HEADER: "300"}), seen)
    assert DEADLINE not in seen.request.state
    await run_plugin(CallerDeadline(), from_mesh("web", headers={DEADLINE_HEADER: "soon"}), seen)
    assert DEADLINE not in seen.request.state


# the chain


def test_defaults_come_first_and_a_listed_layer_replaces_its_default():
    class Strict(RoutePolicy):
        pass

    chain = with_defaults([])
    assert [name for name, _ in chain] == ["mesh.defaults (identity)", "mesh.defaults (policy)",
                                           "mesh.defaults (caller-deadline)"]
    user = ("services.web.plugins[0] (stamp)", Plugin())
    listed = ("services.web.plugins[1] (policy)", Strict())
    chain = with_defaults([user, listed])
    assert [name for name, _ in chain] == ["mesh.defaults (identity)", "mesh.defaults (caller-deadline)",
                                           user[0], listed[0]]
    assert chain[2][1] is user[1] and chain[3][1] is listed[1]


async def seen_app(request: web.Request) -> web.Response:
    return web.json_response({"peer": request.headers.get("x-mesh-peer"), "path": request.path})


async def test_a_sidecars_inbound_chain_starts_with_the_layers_and_lists_them(aiohttp_server):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", seen_app)
    port = (await aiohttp_server(app)).port
    # orders: a plugin listed before policy sees (and stamps) the calls policy refuses.
    orders = 'plugins = [ { use = "stamp", value = "seen" }, { use = "policy" } ]'
    web_ = 'plugins = [ { use = "stamp", value = "after" } ]'
    async with run_mesh(TOML.format(web=web_, orders=orders), {"web": port, "orders": port}) as mesh:
        async with aiohttp.ClientSession() as session:
            headers = mesh.admin_headers()
            async with session.get(mesh.url("web", "admin") + "/config", headers=headers) as response:
                web_chain = (await response.json())["plugins"]
            async with session.get(mesh.url("orders", "admin") + "/config", headers=headers) as response:
                orders_chain = (await response.json())["plugins"]
            async with session.get(mesh.url("web", "outbound") + "/orders/1", headers={"Host": "orders"}) as resp:
                assert (resp.status, await resp.json()) == (200, {"peer": "web", "path": "/orders/1"})
                assert resp.headers["X-Stamp"] == "seen"
            # Outside callers go through the same chain, with no peer.
            async with session.get(mesh.url("orders") + "/admin", headers={"x-mesh-peer": "web"}) as resp:
                assert (resp.status, await resp.json()) == (200, {"peer": None, "path": "/admin"})
        # A call no route allows: refused by the listed policy, after the plugin listed before it.
        sandbox = mesh.sidecars["sandbox"]
        request = Request("GET", "/admin", peer="sandbox", state={LISTENER: "mesh"}, service="orders")
        response = await mesh.sidecars["orders"].inbound(request)
        assert (response.status, response.headers["X-Stamp"]) == (403, "seen")
        assert sandbox.inbound_settings.keyed and not mesh.sidecars["orders"].inbound_settings.keyed
    assert web_chain == ["mesh.defaults (identity)", "mesh.defaults (policy)", "mesh.defaults (caller-deadline)",
                         "services.web.plugins[0] (stamp)"]
    assert orders_chain == ["mesh.defaults (identity)", "mesh.defaults (caller-deadline)",
                            "services.orders.plugins[0] (stamp)", "services.orders.plugins[1] (policy)"]


async def test_policy_mode_audit_for_one_service(aiohttp_server):
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", seen_app)
    port = (await aiohttp_server(app)).port
    toml = TOML.format(web="", orders='plugins = [ { use = "policy", mode = "audit" } ]')
    async with run_mesh(toml, {"web": port, "orders": port}, tls=False) as mesh:
        async with aiohttp.ClientSession() as session:
            # Without mutual TLS the mesh listener takes the caller's word (development only).
            async with session.get(mesh.url("orders", "mesh") + "/admin", headers={"x-mesh-peer": "web"}) as resp:
                assert (resp.status, await resp.json()) == (200, {"peer": "web", "path": "/admin"})
            async with session.get(mesh.url("web", "mesh") + "/admin", headers={"x-mesh-peer": "orders"}) as resp:
                assert resp.status == 403  # web keeps the mesh's mode
