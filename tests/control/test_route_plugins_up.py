"""Per-route plugins through `mesh up` on the process runtime: a service's route plugins on their paths only,
``inherit = false`` leaving the service's plugins out, and a caller's route plugins run by the caller's sidecar."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..harness import MeshMaker, app, fetch, free_port

MARKS = '''
from mesh import Plugin


class Mark(Plugin):
    """Adds NAME@SERVICE (the service whose sidecar runs it) to the request's x-seen header."""

    def __init__(self, name: str):
        self.name = name

    async def handle(self, request, call_next):
        mark = f"{self.name}@{request.service}"
        seen = request.headers.get("x-seen")
        request.headers["x-seen"] = f"{seen},{mark}" if seen else mark
        return await call_next(request)


class RouteMark(Mark):
    """A Mark whose metrics carry a label of their own."""
'''

# What reached the app (x-seen, as JSON); /call/TARGET/PATH: GET http://TARGET/PATH through HTTP_PROXY, relayed.
SEEN_APP = app('''
    class Handler(Base):
        def do_GET(self):
            if self.path.startswith("/call/"):
                target = self.path[len("/call/"):]
                try:
                    with urllib.request.urlopen(f"http://{target}", timeout=30) as response:
                        return self.reply(response.status, response.read())
                except urllib.error.HTTPError as error:
                    return self.reply(error.code, error.read())
            self.reply(200, json.dumps({"seen": self.headers.get("x-seen", "")}).encode())
''')

MESH = """
[mesh]
name = "{name}"
plugin_path = ["."]

[services.web]
command = "python app.py"
expose = {public}
plugins = [ {{ use = "marks.py:Mark", name = "svc" }} ]

[[services.web.routes]]
paths = ["/api/*"]
plugins = [ {{ use = "marks.py:RouteMark", name = "api" }} ]

[[services.web.routes]]
paths = ["/open"]
inherit = false
plugins = [ {{ use = "marks.py:RouteMark", name = "open" }} ]

[services.orders]
command = "python app.py"

[[routes]]
from = "web"
to = "orders"
paths = ["/orders/*"]
plugins = [ {{ use = "marks.py:RouteMark", name = "call" }} ]

[[routes]]
from = "web"
to = "orders"
paths = ["/plain"]
"""


def plugin_calls(admin: str) -> dict[str, float]:
    """The calls of this test's plugins, by their ``plugin`` label, on one sidecar's /metrics."""
    with urllib.request.urlopen(f"http://{admin}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {s.labels["plugin"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "mesh_plugin_calls_total" and s.labels["plugin"].startswith("marks.py:")}


@pytest.mark.slow
def test_route_plugins_through_mesh_up(make_mesh: MeshMaker) -> None:
    public = free_port()
    mesh = make_mesh(None, MESH.format(name="routed", public=public), SEEN_APP, files={"marks.py": MARKS})
    check = mesh.run("check")
    assert check.returncode == 0, check.stderr
    assert ("routes[1] any method /open (inherit = false): identity -> policy -> caller-deadline -> "
            "[marks.py:RouteMark] -> app") in check.stdout
    mesh.up()
    state = mesh.wait_phase("running")
    admin = {i["service"]: i["addresses"]["admin"] for i in state["instances"]}

    def seen(path: str) -> str:
        answer = fetch(f"http://127.0.0.1:{public}{path}")
        assert answer.status == 200, answer.text
        return str(json.loads(answer.body)["seen"])

    # A service's route plugins on their paths only, inside its own plugins; inherit = false leaves those out.
    assert seen("/home") == "svc@web"
    assert seen("/api/items") == "svc@web,api@web"
    assert seen("/open") == "open@web"
    # A caller's route plugin runs in the caller's sidecar, on that route's calls only.
    assert seen("/call/orders/orders/7") == "call@web"
    assert seen("/call/orders/plain") == ""

    # Measured where they run, under their own labels.
    assert plugin_calls(admin["web"]) == {"marks.py:Mark": 4, "marks.py:RouteMark": 3}
    assert plugin_calls(admin["orders"]) == {}
