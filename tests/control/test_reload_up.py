"""`mesh reload` on a running mesh (process runtime): under steady load, nothing fails, and a broken edit
changes nothing."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from ..docker_support import base_image, docker_engine  # noqa: F401
from ..harness import (
    DOCKER_APP,
    ECHO_APP,
    ENV_APP,
    MeshMaker,
    by_label,
    docker_build,
    fetch,
    free_port,
    unique_name,
    wait_until,
)

MESH = """
plugin_path = ["."]

[services.web]
command = "python app.py web"
expose = {public}
plugins = [ {{ use = "tag.py:Tag" }} ]

[services.api]
command = "python app.py api"
{routes}{more}
"""

ROUTE = """
[[routes]]
from = "web"
to = "api"
"""

TAG = '''
from mesh import Plugin
{fault}

class Tag(Plugin):
    async def handle(self, request, call_next):
        response = await call_next(request)
        response.headers["x-tag"] = "{value}"
        return response
'''


def _tag(response: Any) -> str | None:
    return response.headers.get("x-tag")


def _colour(response: Any) -> str:
    """What ENV_APP and DOCKER_APP say of themselves: ``COLOUR`` and, if set, ``MESH_INSTANCE``."""
    env = json.loads(response.read())["env"]
    return " ".join(filter(None, (env["COLOUR"], env["MESH_INSTANCE"])))


class Load:
    """GET / through web's public listener, one after another, until stopped (at most 10 minutes);
    ``tags`` holds what ``seen`` reads of each answer."""

    def __init__(self, url: str, seen: Callable[[Any], str | None] = _tag) -> None:
        self.url = url
        self.seen = seen
        self.tags: list[str | None] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 600
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url, timeout=30) as response:
                    self.tags.append(self.seen(response))
            except (urllib.error.URLError, OSError) as exc:
                self.failures.append(repr(exc))
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


def write(mesh: Any, value: str, *, fault: str = "", routes: str = "", more: str = "") -> None:
    (mesh.folder / "tag.py").write_text(TAG.format(value=value, fault=fault))
    (mesh.folder / "mesh.toml").write_text(f'[mesh]\nname = "{mesh.name}"\n'
                                           + MESH.format(public=mesh.public, routes=routes, more=more))


@pytest.mark.slow
def test_reload_under_load_applies_everything_or_nothing(make_mesh: MeshMaker) -> None:
    public = free_port()
    mesh = make_mesh("live", MESH.format(public=public, routes="", more=""), ECHO_APP,
                     files={"tag.py": TAG.format(value="one", fault="")})
    mesh.public = public
    mesh.up()
    state = mesh.wait_phase("running")
    first = state["version"]
    api_pid = by_label(state)["api"]["pids"]["app"]
    assert fetch(f"http://127.0.0.1:{public}/call/api/x").status == 403  # no route yet
    load = Load(f"http://127.0.0.1:{public}/")
    try:
        wait_until(lambda: len(load.tags) >= 5, timeout=60, what="the load to run")

        # v2 of the plugin and a route added: applied at once, nothing restarted.
        write(mesh, "two", routes=ROUTE)
        done = mesh.run("reload")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "reloaded: version" in done.stdout
        wait_until(lambda: load.tags[-1:] == ["two"], timeout=30, what="v2 serving")
        assert fetch(f"http://127.0.0.1:{public}/call/api/x").status == 200
        state = mesh.ps()
        second = state["version"]
        assert second != first and {i["version"] for i in state["instances"]} == {second}
        assert by_label(state)["api"]["pids"]["app"] == api_pid

        # A plugin that raises at import, then a typo: refused, v2 keeps serving.
        write(mesh, "three", fault="raise RuntimeError('broken at import')", routes=ROUTE)
        done = mesh.run("reload")
        assert done.returncode != 0 and "broken at import" in done.stderr, done.stdout + done.stderr
        write(mesh, "three", routes=ROUTE, more="colour = 'red'")
        done = mesh.run("reload")
        assert done.returncode != 0 and "colour" in done.stderr
        before = len(load.tags)
        wait_until(lambda: len(load.tags) >= before + 5, timeout=60, what="more requests")
        assert set(load.tags[before:]) == {"two"}
        assert mesh.ps()["version"] == second  # a broken mesh.toml does not hide the mesh that runs

        # A service added, one whose command changed: the first started, the second replaced.
        write(mesh, "two", routes=ROUTE, more='[services.extra]\ncommand = "python app.py extra"\n'
                                              '[services.api.env]\nCOLOUR = "blue"\n')
        done = mesh.run("reload")
        assert done.returncode == 0, done.stdout + done.stderr
        assert "started extra" in done.stdout and "restarted api" in done.stdout
        state = mesh.ps()
        running = {i["service"]: i for i in state["instances"] if i["state"] == "running"}
        assert set(running) == {"web", "api", "extra"}
        assert running["api"]["pids"]["app"] != api_pid
        assert fetch(f"http://127.0.0.1:{public}/call/api/x").status == 200

        # ...and removed again.
        write(mesh, "two", routes=ROUTE)
        done = mesh.run("reload")
        assert done.returncode == 0 and "stopped extra" in done.stdout, done.stdout + done.stderr
        assert {i["service"] for i in mesh.ps()["instances"] if i["state"] == "running"} == {"web", "api"}
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert len(load.tags) > 20

    # An edit gone wrong does not keep `mesh down` from stopping what runs.
    write(mesh, "two", routes=ROUTE, more="colour = 'red'")
    done = mesh.run("down")
    assert done.returncode == 0 and "problem" in done.stderr, done.stdout + done.stderr
    assert mesh.popen is not None and mesh.popen.wait(60) == 0


EXPOSED = """
[services.web]
command = "python app.py"
expose = {public}
replicas = {replicas}

[services.web.env]
COLOUR = "{colour}"
"""


@pytest.mark.slow
def test_an_exposed_service_is_replaced_without_a_failed_request(make_mesh: MeshMaker) -> None:
    public = free_port()
    mesh = make_mesh("exposed", EXPOSED.format(public=public, replicas=1, colour="red"), ENV_APP)
    mesh.up()
    before = by_label(mesh.wait_phase("running"))["web"]["pids"]
    load = Load(f"http://127.0.0.1:{public}/", _colour)
    try:
        wait_until(lambda: len(load.tags) >= 5, timeout=60, what="the load to run")
        # Its env changed: a new instance takes over its public port from the one it replaces.
        (mesh.folder / "mesh.toml").write_text(
            f'[mesh]\nname = "{mesh.name}"\n' + EXPOSED.format(public=public, replicas=1, colour="blue"))
        done = mesh.run("reload")
        assert done.returncode == 0 and "restarted web" in done.stdout, done.stdout + done.stderr
        wait_until(lambda: load.tags[-1:] == ["blue 2"], timeout=30, what="the new instance serving")
        (running,) = [i for i in mesh.ps()["instances"] if i["state"] == "running"]
        assert running["public"] == f"http://127.0.0.1:{public}"
        assert not set(running["pids"].values()) & set(before.values())

        # Two replicas: both serve the one public port (and say so).
        (mesh.folder / "mesh.toml").write_text(
            f'[mesh]\nname = "{mesh.name}"\n' + EXPOSED.format(public=public, replicas=2, colour="green"))
        done = mesh.run("reload")
        assert done.returncode == 0 and "restarted web" in done.stdout, done.stdout + done.stderr
        running = [i for i in mesh.ps()["instances"] if i["state"] == "running"]
        assert [i["public"] for i in running] == [f"http://127.0.0.1:{public}"] * 2
        seen = len(load.tags)
        wait_until(lambda: {"green 3", "green 4"} <= set(load.tags[seen:]), timeout=60,
                   what="both replicas answering on the public port")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    assert {"red 1", "blue 2"} <= set(load.tags)


def test_reload_says_so_when_nothing_runs(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("idle", MESH.format(public=free_port(), routes="", more=""), ECHO_APP,
                     files={"tag.py": TAG.format(value="one", fault="")})
    done = mesh.run("reload")
    assert done.returncode == 1 and "not running" in done.stderr


def test_up_watch_reloads_an_edited_plugin(make_mesh: MeshMaker) -> None:
    public = free_port()
    mesh = make_mesh("watched", MESH.format(public=public, routes="", more=""), ECHO_APP,
                     files={"tag.py": TAG.format(value="one", fault="")})
    mesh.public = public
    mesh.up("--watch")
    mesh.wait_phase("running")
    assert fetch(f"http://127.0.0.1:{public}/").headers.get("x-tag") == "one"
    (mesh.folder / "tag.py").write_text(TAG.format(value="two", fault=""))
    wait_until(lambda: fetch(f"http://127.0.0.1:{public}/").headers.get("x-tag") == "two", timeout=60,
               what="the edited plugin to serve")
    (mesh.folder / "tag.py").write_text(TAG.format(value="three", fault="raise RuntimeError('half saved')"))
    wait_until(lambda: "reload refused" in mesh.output(), timeout=60, what="the broken edit refused")
    assert fetch(f"http://127.0.0.1:{public}/").headers.get("x-tag") == "two"


@pytest.mark.docker
def test_reload_on_docker_swaps_the_plugin_and_refuses_a_broken_one(make_mesh: MeshMaker, docker_engine: Any,
                                                                    base_image: str) -> None:
    public = free_port()
    toml = (f'plugin_path = ["."]\n[services.front]\nbuild = "app"\nport = 8000\nexpose = {public}\n'
            f'plugins = [ {{ use = "tag.py:Tag" }} ]\n')
    mesh = make_mesh(unique_name(), toml, None, engine=docker_engine,
                     files={**docker_build(DOCKER_APP), "tag.py": TAG.format(value="one", fault="")})
    done = mesh.run("up", "-d", "--runtime", "docker")
    assert done.returncode == 0, done.stdout + done.stderr
    try:
        assert fetch(f"http://127.0.0.1:{public}/").headers.get("x-tag") == "one"
        container = mesh.ps()["instances"][0]["containers"]["app"]["id"]
        load = Load(f"http://127.0.0.1:{public}/")
        try:
            wait_until(lambda: len(load.tags) >= 5, timeout=60, what="the load to run")
            (mesh.folder / "tag.py").write_text(TAG.format(value="two", fault=""))
            done = mesh.run("reload")
            assert done.returncode == 0, done.stdout + done.stderr
            wait_until(lambda: load.tags[-1:] == ["two"], timeout=30, what="v2 serving")
            (mesh.folder / "tag.py").write_text(TAG.format(value="three", fault="raise RuntimeError('no')"))
            done = mesh.run("reload")
            assert done.returncode != 0 and "RuntimeError: no" in done.stderr
            before = len(load.tags)
            wait_until(lambda: len(load.tags) >= before + 5, timeout=60, what="more requests")
            assert set(load.tags[before:]) == {"two"}
        finally:
            load.stop()
        assert load.failures == [], load.failures[:5]
        state = mesh.ps()
        assert state["instances"][0]["containers"]["app"]["id"] == container  # nothing restarted

        # Its env changed: replaced by a new instance, and its public port never refuses a request.
        (mesh.folder / "tag.py").write_text(TAG.format(value="two", fault=""))
        (mesh.folder / "mesh.toml").write_text(f'[mesh]\nname = "{mesh.name}"\n{toml}env = {{ COLOUR = "blue" }}\n')
        load = Load(f"http://127.0.0.1:{public}/", _colour)
        try:
            wait_until(lambda: len(load.tags) >= 5, timeout=60, what="the load to run")
            done = mesh.run("reload")
            assert done.returncode == 0 and "restarted front" in done.stdout, done.stdout + done.stderr
            wait_until(lambda: load.tags[-1:] == ["blue 2"], timeout=60, what="the new instance serving")
        finally:
            load.stop()
        assert load.failures == [], load.failures[:5]
        (running,) = [i for i in mesh.ps()["instances"] if i["state"] == "running"]
        assert running["containers"]["app"]["id"] != container
        assert running["public"] == f"http://127.0.0.1:{public}"
    finally:
        assert mesh.run("down").returncode == 0
