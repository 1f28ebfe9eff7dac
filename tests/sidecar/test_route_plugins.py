"""Per-route plugins (`mesh.sidecar.route_chains`): what mesh.toml says, what `mesh check` shows, and real
sidecars running a service's route plugins on their paths only and a caller's on its route only."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from mesh import ConfigError, PluginError, cli, config
from mesh.chain import Chain
from mesh.sidecar.route_chains import RoutedChain, chain_order
from mesh.testing import run_mesh

from ..conftest import port_of, raw_http
from .test_tap import Stream

MARKS = '''
from pathlib import Path

from mesh import Plugin, Response


class Mark(Plugin):
    """Adds its name to the request's x-seen header, and counts its calls in the response's x-calls-NAME."""

    def __init__(self, name: str):
        self.name = name
        self.calls = 0

    async def handle(self, request, call_next):
        self.calls += 1
        seen = request.headers.get("x-seen")
        request.headers["x-seen"] = f"{seen},{self.name}" if seen else self.name
        response = await call_next(request)
        response.headers[f"x-calls-{self.name}"] = str(self.calls)
        return response


class RouteMark(Mark):
    """A Mark of its own class, so that its metrics carry a label of their own."""


class Deny(Plugin):
    async def handle(self, request, call_next):
        return Response(401, "denied by the route")


class Recorder(Plugin):
    """Writes its start and stop to ``log``; fails to start when asked."""

    def __init__(self, name: str, log: Path, fail: bool = False):
        self.name, self.log, self.fail = name, log, fail

    def note(self, what):
        with open(self.log, "a") as file:
            file.write(f"{what} {self.name}\\n")

    async def start(self, ctx):
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start")
        self.note("start")

    async def stop(self):
        self.note("stop")

    async def handle(self, request, call_next):
        return await call_next(request)
'''

TOML = """
[mesh]
name = "rp"
plugin_path = ["."]

[services.web]
command = "x"
plugins = [ { use = "marks.py:Mark", name = "svc" } ]

[[services.web.routes]]
paths = ["/api/*"]
methods = ["POST"]
plugins = [ { use = "marks.py:RouteMark", name = "post" } ]

[[services.web.routes]]
paths = ["/api/*"]
plugins = [ { use = "marks.py:RouteMark", name = "api" }, { use = "marks.py:Mark", name = "api2" } ]

[[services.web.routes]]
paths = ["/open", "/open/*"]
inherit = false
plugins = [ { use = "marks.py:Mark", name = "open" } ]

[[services.web.routes]]
paths = ["/bare"]
inherit = false

[[services.web.routes]]
paths = ["/same"]

[services.orders]
command = "x"
outbound = [ { use = "marks.py:Mark", name = "out" } ]

[[routes]]
from = "orders"
to = "web"
paths = ["/api/*", "/open", "/other", "/flaky"]
plugins = [ { use = "marks.py:RouteMark", name = "call" } ]
retries = { attempts = 3, backoff = "1ms" }

[[routes]]
from = "orders"
to = "web"
paths = ["/same"]
"""


async def echo_apps(aiohttp_server: Any, names: tuple[str, ...] = ("web", "orders")) -> dict[str, int]:
    """Apps that answer what reached them: the x-seen header and the peer; /flaky answers 503."""

    async def handler(request: web.Request) -> web.Response:
        status = 503 if request.path == "/flaky" else 200
        return web.json_response({"seen": request.headers.get("x-seen", ""),
                                  "peer": request.headers.get("x-mesh-peer")}, status=status)

    ports = {}
    for name in names:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        ports[name] = (await aiohttp_server(app)).port
    return ports


async def seen(client: aiohttp.ClientSession, url: str, method: str = "GET", **options: Any) -> tuple[int, str]:
    async with client.request(method, url, **options) as response:
        text = await response.text()
        return response.status, json.loads(text)["seen"] if response.status in (200, 503) else text


def write_marks(folder: Path) -> None:
    (folder / "marks.py").write_text(MARKS)


# --- mesh.toml and `mesh check` --------------------------------------------------------------------


def load_text(folder: Path, text: str) -> config.MeshConfig:
    write_marks(folder)
    (folder / "mesh.toml").write_text(text)
    return config.load(folder)


def problems_of(folder: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(folder, text)
    return info.value.problems


def test_routes_load_with_their_plugins(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, TOML)
    routes = cfg.services["web"].routes
    assert [(r.paths, r.methods, r.inherit) for r in routes] == [
        (["/api/*"], ["POST"], True), (["/api/*"], [], True), (["/open", "/open/*"], [], False),
        (["/bare"], [], False), (["/same"], [], True)]
    assert [s.label for s in routes[1].plugin_specs] == ["services.web.routes[1].plugins[0] (marks.py:RouteMark)",
                                                        "services.web.routes[1].plugins[1] (marks.py:Mark)"]
    assert [s.label for s in cfg.routes[0].plugin_specs] == ["routes[0].plugins[0] (marks.py:RouteMark)"]
    assert cfg.routes[1].plugin_specs == [] and cfg.services["orders"].routes == []


def test_every_problem_of_a_route_is_named(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, """
[mesh]
name = "bad"
plugin_path = ["."]

[services.web]
command = "x"

[[services.web.routes]]
paths = []
inherit = "no"
plugin = []

[[services.web.routes]]
paths = ["api/*"]
methods = ["FETCH"]
plugins = [ { use = "nosuch" }, { use = "marks.py:Mark", nmae = "x" }, { use = "policy" }, { use = "retry" } ]

[[services.web.routes]]
methods = ["GET"]

[services.orders]
command = "x"
routes = { paths = ["/x"] }

[[routes]]
from = "web"
to = "orders"
plugins = [ { use = "marks.py:Mark" }, { use = "breaker" } ]
""")
    assert problems == [
        "services.web.routes[0].inherit: expected true or false, found 'no' (string)",
        "services.web.routes[0]: unknown option 'plugin', did you mean 'plugins'?",
        "services.web.routes[0].paths: expected at least one path like '/api/*' (plugins for every path go in "
        "services.web.plugins), found none",
        "services.web.routes[1].paths[0]: expected a path starting with '/', found 'api/*'",
        "services.web.routes[1].methods[0]: unknown HTTP method 'FETCH'",
        "services.web.routes[1].plugins[0]: unknown plugin 'nosuch' (known: cache, jwt, ratelimit, router, stamp; "
        "or use 'module:Class' or 'file.py:Class')",
        "services.web.routes[1].plugins[1] (marks.py:Mark): unknown option 'nmae', did you mean 'name'?",
        "services.web.routes[1].plugins[1] (marks.py:Mark): missing required option 'name' (a string)",
        "services.web.routes[1].plugins[2] (policy): a built-in layer runs in the service's own chain, not in a "
        "route's plugins (configure it in services.web.plugins)",
        "services.web.routes[1].plugins[3] (retry): a built-in layer runs in the service's own chain, not in a "
        "route's plugins (configure it in services.web.outbound)",
        "services.web.routes[2].paths: missing, expected a list of strings",
        "services.orders.routes: expected [[services.orders.routes]] entries (an array of tables), found a table",
        "routes[0].plugins[0] (marks.py:Mark): missing required option 'name' (a string)",
        "routes[0].plugins[1] (breaker): a built-in layer runs in the service's own chain, not in a route's plugins "
        "(set this route's timeout, max_pending or retries, or configure it in services.web.outbound)",
    ]


def test_check_shows_each_chain_in_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_text(tmp_path, TOML)
    assert cli.main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    web = out.index("  web: command: x")
    assert out[web + 1:web + 11] == [
        "    plugins: marks.py:Mark (name='svc')",
        "    inbound chain: identity -> policy -> caller-deadline -> marks.py:Mark -> app",
        "    routes[0] POST /api/*: identity -> policy -> caller-deadline -> marks.py:Mark -> [marks.py:RouteMark] "
        "-> app",
        "      plugins: marks.py:RouteMark (name='post')",
        "    routes[1] any method /api/*: identity -> policy -> caller-deadline -> marks.py:Mark -> "
        "[marks.py:RouteMark -> marks.py:Mark] -> app",
        "      plugins: marks.py:RouteMark (name='api')",
        "      plugins: marks.py:Mark (name='api2')",
        "    routes[2] any method /open, /open/* (inherit = false): identity -> policy -> caller-deadline -> "
        "[marks.py:Mark] -> app",
        "      plugins: marks.py:Mark (name='open')",
        "    routes[3] any method /bare (inherit = false): identity -> policy -> caller-deadline -> app",
    ]
    assert "    outbound chain: marks.py:Mark -> deadline -> breaker -> retry -> peer" in out
    call = out.index("  orders -> web: any method /api/*, /open, /other, /flaky, max_pending 1024")
    assert out[call + 1:call + 4] == [
        "    plugins: marks.py:RouteMark (name='call')",
        "    chain in orders's sidecar: marks.py:Mark -> [marks.py:RouteMark] -> deadline -> breaker -> retry -> web",
        "  orders -> web: any method /same, max_pending 1024",
    ]


def test_a_listed_built_in_layer_and_what_precedes_it_run_before_every_route(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, """
[mesh]
name = "order"
plugin_path = ["."]

[services.web]
command = "x"
plugins = [ { use = "marks.py:Mark", name = "audit" }, { use = "policy", mode = "audit" },
            { use = "marks.py:Mark", name = "after" } ]

[[services.web.routes]]
paths = ["/open"]
inherit = false
""")
    order = chain_order(cfg, "web")
    assert order.inbound == ["mesh.defaults (identity)", "mesh.defaults (caller-deadline)",
                             "services.web.plugins[0] (marks.py:Mark)", "services.web.plugins[1] (policy)",
                             "services.web.plugins[2] (marks.py:Mark)"]
    assert order.routes == [order.inbound[:4]]  # policy, and the plugin listed before it, still run


# --- real sidecars ---------------------------------------------------------------------------------


async def test_a_route_plugin_runs_on_its_paths_only_inside_the_service_plugins(aiohttp_server, tmp_path: Path):
    write_marks(tmp_path)
    async with run_mesh(TOML, await echo_apps(aiohttp_server), tmp_path, tls=False) as mesh, \
            aiohttp.ClientSession() as client:
        web = mesh.url("web")
        assert await seen(client, web + "/other") == (200, "svc")
        assert await seen(client, web + "/api/x/y") == (200, "svc,api,api2")
        assert await seen(client, web + "/api/x", "POST") == (200, "svc,post")  # the first match wins
        assert await seen(client, web + "/apiary") == (200, "svc")
        assert await seen(client, web + "/open/door") == (200, "open")  # inherit = false: no service plugins
        assert await seen(client, web + "/bare") == (200, "")
        assert await seen(client, web + "/same") == (200, "svc")
        # The path is matched as normalized, before any plugin sees it.
        sent = b"GET /x/../api/%7Eq HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
        assert b'"seen": "svc,api,api2"' in await raw_http(port_of(web), sent)
        assert type(mesh.sidecars["web"].inbound) is RoutedChain
        # A service's plugin is one instance whatever the path: its count went on across routes.
        async with client.get(web + "/api/z") as response:
            assert response.headers["x-calls-svc"] == "7" and response.headers["x-calls-api"] == "3"


async def test_no_route_can_skip_identity_and_route_policy(aiohttp_server, tmp_path: Path):
    write_marks(tmp_path)
    async with run_mesh(TOML, await echo_apps(aiohttp_server), tmp_path, tls=False) as mesh, \
            aiohttp.ClientSession() as client:
        inbound = mesh.url("web", "mesh")  # without mTLS the caller names itself (development only)
        caller = {"x-mesh-peer": "orders"}
        # /open has a route of its own (inherit = false), and orders -> web allows it: the app knows the caller.
        async with client.get(inbound + "/open", headers=caller) as response:
            assert response.status == 200 and await response.json() == {"seen": "open", "peer": "orders"}
        # /bare has a route without plugins, and no [[routes]] entry lets orders call it: still refused.
        async with client.get(inbound + "/bare", headers=caller) as response:
            assert response.status == 403 and "no route allows 'orders'" in await response.text()


async def test_a_callers_route_plugins_run_in_the_callers_sidecar_once_per_call(aiohttp_server, tmp_path: Path):
    write_marks(tmp_path)
    async with run_mesh(TOML, await echo_apps(aiohttp_server), tmp_path, tls=False) as mesh, \
            aiohttp.ClientSession() as client:
        outbound = mesh.url("orders", "outbound")
        host = {"Host": "web"}
        # The caller's outbound plugins, then the route's, then web's own chain for that path.
        assert await seen(client, outbound + "/other", headers=host) == (200, "out,call,svc")
        assert await seen(client, outbound + "/api/q", headers=host) == (200, "out,call,svc,api,api2")
        assert await seen(client, outbound + "/same", headers=host) == (200, "out,svc")  # its route has none
        # Before the retry layer: web's app was tried three times, the route's plugin ran once.
        async with client.get(outbound + "/flaky", headers=host) as response:
            assert response.status == 503
            assert response.headers["x-calls-svc"] == "6"  # /other, /api/q, /same, then three tries
            assert response.headers["x-calls-call"] == "3"  # /other, /api/q, /flaky
        # Only the calling sidecar runs them: web's own calls have none.
        assert type(mesh.sidecars["web"].outbound) is Chain and type(mesh.sidecars["orders"].outbound) is RoutedChain


async def test_route_plugins_are_measured_and_named(aiohttp_server, tmp_path: Path):
    write_marks(tmp_path)
    async with run_mesh(TOML, await echo_apps(aiohttp_server), tmp_path, tls=False) as mesh, \
            aiohttp.ClientSession() as client:
        admin = mesh.url("web", "admin")
        async with client.get(admin + "/tap", headers=mesh.admin_headers()) as response:
            stream = Stream(response)
            assert (await stream.next())["tap"] == "started"
            assert (await seen(client, mesh.url("web") + "/api/x"))[0] == 200
            record = await stream.next()
        # In the order the calls ended: the innermost first.
        assert [p["name"] for p in record["plugins"]] == ["marks.py:Mark", "marks.py:RouteMark", "marks.py:Mark"]
        async with client.get(admin + "/metrics") as response:
            families = list(text_string_to_metric_families(await response.text()))
        calls = {s.labels["plugin"]: s.value for f in families for s in f.samples
                 if s.name == "mesh_plugin_calls_total"}
        assert calls == {"marks.py:Mark": 2, "marks.py:RouteMark": 1}
        async with client.get(admin + "/config", headers=mesh.admin_headers()) as response:
            listed = (await response.json())["plugins"]
        assert "services.web.routes[1].plugins[0] (marks.py:RouteMark)" in listed
        assert listed.index("services.web.plugins[0] (marks.py:Mark)") < listed.index(
            "services.web.routes[0].plugins[0] (marks.py:RouteMark)")


RECORDED = """
[mesh]
name = "life"
plugin_path = ["."]

[services.web]
command = "x"
plugins = [ { use = "marks.py:Recorder", name = "svc", log = "events" } ]

[[services.web.routes]]
paths = ["/a"]
plugins = [ { use = "marks.py:Recorder", name = "a1", log = "events" },
            { use = "marks.py:Recorder", name = "a2", log = "events" } ]

[[services.web.routes]]
paths = ["/b"]
inherit = false
plugins = [ { use = "marks.py:Recorder", name = "b", log = "events", fail = FAIL } ]
"""


async def test_route_plugins_start_in_order_and_stop_in_reverse(aiohttp_server, tmp_path: Path):
    write_marks(tmp_path)
    async with run_mesh(RECORDED.replace("FAIL", "false"), await echo_apps(aiohttp_server, ("web",)), tmp_path,
                        tls=False):
        assert (tmp_path / "events").read_text().split("\n")[:-1] == ["start svc", "start a1", "start a2", "start b"]
    assert (tmp_path / "events").read_text().split("\n")[4:-1] == ["stop b", "stop a2", "stop a1", "stop svc"]


async def test_a_route_plugin_that_fails_to_start_stops_what_started(aiohttp_server, tmp_path: Path):
    write_marks(tmp_path)
    with pytest.raises(PluginError, match=r"services.web.routes\[1\].plugins\[0\] \(marks.py:Recorder\) failed"):
        async with run_mesh(RECORDED.replace("FAIL", "true"), await echo_apps(aiohttp_server, ("web",)), tmp_path,
                            tls=False):
            pass
    assert (tmp_path / "events").read_text().split("\n")[:-1] == [
        "start svc", "start a1", "start a2", "stop a2", "stop a1", "stop svc"]


async def test_without_routes_the_chains_are_as_before(aiohttp_server, tmp_path: Path):
    write_marks(tmp_path)
    plain = TOML.split("[[services.web.routes]]")[0] + '[services.orders]\ncommand = "x"\n'
    async with run_mesh(plain, await echo_apps(aiohttp_server), tmp_path, tls=False) as mesh:
        for sidecar in mesh.sidecars.values():
            assert type(sidecar.inbound) is Chain and type(sidecar.outbound) is Chain
        async with aiohttp.ClientSession() as client:
            assert await seen(client, mesh.url("web") + "/api/x") == (200, "svc")


async def test_concurrent_requests_keep_their_own_routes(aiohttp_server, tmp_path: Path):
    write_marks(tmp_path)
    async with run_mesh(TOML, await echo_apps(aiohttp_server), tmp_path, tls=False) as mesh, \
            aiohttp.ClientSession() as client:
        paths = {"/api/1": "svc,api,api2", "/open": "open", "/x": "svc", "/bare": ""}
        answers = await asyncio.gather(*(seen(client, mesh.url("web") + path) for path in list(paths) * 10))
        assert answers == [(200, want) for want in list(paths.values()) * 10]
