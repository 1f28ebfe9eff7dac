"""Discovery, health checks and resilience end to end: `mesh up` with replicas on the process runtime.

The controller pushes the registry to every sidecar when instances come
and go or change health; the calling sidecar retries and ejects what
fails. Every process is started by `mesh up` and recorded in its
state.json; the harness's mesh stops them all by pid, process group and
run id, whatever happens. Also here: the admin ``/registry`` endpoint of
one sidecar, in process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import aiohttp
import pytest

from mesh.testing import run_mesh

from ..harness import HEALTH_APP, MeshMaker, by_label, eventually, routed_toml

pytestmark = pytest.mark.slow


async def admin_registry(session: aiohttp.ClientSession, inst: dict[str, Any],
                         headers: dict[str, str]) -> dict[str, Any]:
    async with session.get(f"http://{inst['addresses']['admin']}/registry", headers=headers) as response:
        assert response.status == 200
        return await response.json()


async def load(session: aiohttp.ClientSession, outbound: str, count: int, concurrency: int,
               at: int | None = None, then: Any = None) -> list[tuple[int, str]]:
    """``count`` GETs to api through a sidecar's outbound listener; ``then()`` once ``at`` are done."""
    results: list[tuple[int, str]] = []
    fired = asyncio.Event()

    async def run() -> None:
        while len(results) < count:
            async with session.get(f"http://{outbound}/", headers={"Host": "api"}) as response:
                results.append((response.status, await response.text()))
            if at is not None and len(results) >= at and not fired.is_set():
                fired.set()
                await then()

    await asyncio.gather(*(run() for _ in range(concurrency)))
    assert at is None or fired.is_set()
    return results


MESH = """
[services.web]
command = "python app.py"

[services.api]
command = "{api}"
replicas = 3
{extra}

[[routes]]
from = "web"
to = "api"
"""


async def test_a_crash_mid_load_loses_no_get_and_is_ejected_and_an_exit_leaves_every_registry(
        make_mesh: MeshMaker) -> None:
    # `; sleep` keeps the instance's process alive when its server dies: only the calling
    # sidecar can tell that api.2 is broken, by its failures.
    mesh = make_mesh("disc", MESH.format(api="python app.py; sleep 600", extra=""), HEALTH_APP)
    mesh.up()
    state = by_label(mesh.wait_phase("running"))
    web, api1, api3 = state["web"], state["api.1"], state["api.3"]
    outbound = web["addresses"]["outbound"]
    mesh_of = {label: state[label]["addresses"]["mesh"] for label in ("api.1", "api.2", "api.3")}
    auth = mesh.admin_headers()

    async with aiohttp.ClientSession() as session:
        assert sorted((await admin_registry(session, web, auth))["services"]["api"]) == sorted(mesh_of.values())

        async def crash_api2() -> None:
            os.kill(int((mesh.folder / "pids" / "api.2").read_text()), signal.SIGKILL)

        results = await load(session, outbound, 600, 16, at=150, then=crash_api2)
        assert {status for status, _ in results} == {200}, [r for r in results if r[0] != 200][:5]
        assert {body for _, body in results[-200:]} <= {"api.1", "api.3"}
        seen = await admin_registry(session, web, auth)
        backends = {b["address"]: b for b in seen["backends"]["api"]}
        assert backends[mesh_of["api.2"]]["ejected"], backends
        assert len(seen["services"]["api"]) == 3  # still registered: only its server died
        assert "ejected api instance " + mesh_of["api.2"] in mesh.output()

        # Now a whole instance goes away: the controller sees it exit and tells every sidecar.
        killed_at: list[float] = []

        async def kill_api3() -> None:
            for pgid in api3["pgids"].values():
                os.killpg(pgid, signal.SIGKILL)
            killed_at.append(time.monotonic())

        async def gone_everywhere() -> bool:
            for inst in (web, api1):
                if mesh_of["api.3"] in (await admin_registry(session, inst, auth))["services"]["api"]:
                    return False
            return True

        loading = asyncio.ensure_future(load(session, outbound, 300, 8, at=50, then=kill_api3))
        await eventually(lambda: killed_at, every=0.01, what="api.3 killed")
        took = await eventually(gone_everywhere, timeout=5, what="api.3 left every registry")
        results = await loading
    assert took < 3.0, f"the registry took {took:.2f}s to drop api.3"
    assert {status for status, _ in results} == {200}, [r for r in results if r[0] != 200][:5]
    registry = json.loads(mesh.files.registry.read_text())
    # api.3 left every registry; the controller then restarts a crashed instance (mesh.lifecycle),
    # so by now it may be back.
    assert {mesh_of["api.1"], mesh_of["api.2"]} <= set(registry["services"]["api"])


async def test_failing_health_checks_take_an_instance_out_and_passing_ones_bring_it_back(
        make_mesh: MeshMaker) -> None:
    extra = ('health = "/healthz"\n'
             'health_check = { interval = "200ms", timeout = "500ms", unhealthy_threshold = 2, '
             'healthy_threshold = 2 }')
    mesh = make_mesh("disc", MESH.format(api="python app.py", extra=extra), HEALTH_APP)
    mesh.up()
    state = by_label(mesh.wait_phase("running"))
    web, api2 = state["web"], state["api.2"]
    outbound = web["addresses"]["outbound"]
    address = api2["addresses"]["mesh"]
    auth = mesh.admin_headers()

    def healthy_in_state() -> Any:
        return by_label(mesh.files.read_state())["api.2"]["healthy"]

    async with aiohttp.ClientSession() as session:
        assert healthy_in_state() is True
        async with session.post(f"http://{api2['addresses']['app']}/sick") as response:
            assert response.status == 200

        async def out() -> bool:
            return address not in (await admin_registry(session, web, auth))["services"]["api"]

        took = await eventually(out, timeout=5, what="api.2 out of rotation")
        assert took < 4.0  # two failed checks 200ms apart, then one push (slack for a busy machine)
        assert healthy_in_state() is False
        results = await load(session, outbound, 30, 3)
        assert {r for r in results} <= {(200, "api.1"), (200, "api.3")}

        async with session.post(f"http://{api2['addresses']['app']}/well") as response:
            assert response.status == 200

        async def back() -> bool:
            return address in (await admin_registry(session, web, auth))["services"]["api"]

        took = await eventually(back, timeout=5, what="api.2 back in rotation")
        assert took < 4.0
        assert healthy_in_state() is True
        results = await load(session, outbound, 60, 3)
    assert {status for status, _ in results} == {200}
    assert (200, "api.2") in results
    assert "api.2: unhealthy (2 failed checks of /healthz): out of rotation" in mesh.output()


# The admin endpoint itself, in process.

async def test_put_registry_takes_effect_on_the_next_request_and_a_bad_one_changes_nothing(aiohttp_server):
    from aiohttp import web as aioweb

    async def hello(request: aioweb.Request) -> aioweb.Response:
        return aioweb.Response(text="api")

    app = aioweb.Application()
    app.router.add_get("/", hello)
    api = await aiohttp_server(app)
    async with run_mesh(routed_toml("reg"), {"api": api.port, "web": api.port}) as mesh:
        admin = mesh.url("web", "admin") + "/registry"
        auth = mesh.admin_headers()
        outbound = mesh.url("web", "outbound") + "/"
        api_address = mesh.sidecars["api"].listeners["mesh"].address
        async with aiohttp.ClientSession() as session:
            async with session.put(admin, json={"services": {"api": []}}, headers=auth) as response:
                assert response.status == 204
            async with session.get(outbound, headers={"Host": "api"}) as response:
                assert response.status == 503 and "no instance" in await response.text()
            async with session.put(admin, json={"services": {"api": [{"address": api_address}]}},
                                   headers=auth) as response:
                assert response.status == 204
            async with session.get(outbound, headers={"Host": "api"}) as response:
                assert response.status == 200 and await response.text() == "api"
            for bad in ({"services": {"api": ["no-port"]}}, {"services": ["api"]}, {"api": []}):
                async with session.put(admin, json=bad, headers=auth) as response:
                    assert response.status == 400
            async with session.get(admin, headers=auth) as response:
                data = await response.json()
    assert data["services"]["api"] == [api_address]
    (backend,) = data["backends"]["api"]
    assert backend["address"] == api_address and backend["requests"] == 1 and not backend["ejected"]
