"""The admin listener: public health and readiness, everything else behind the mesh run's token."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from mesh.messages import Response
from mesh.sidecar.admin import PUBLIC, AdminToken, Router, operator_token
from mesh.testing import make_request, run_mesh

from ..harness import fetch, free_port, routed_toml, wait_until

TOKEN = "s3cret-token-for-this-test"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

TOML = routed_toml("shop", target="orders")

# Every endpoint but the public ones, as the app would try them.
GUARDED = [("GET", "/config", None), ("GET", "/registry", None),
           ("PUT", "/registry", {"services": {"orders": ["10.6.6.6:15001"]}}),
           ("POST", "/certs/reload", None), ("GET", "/no-such-endpoint", None), ("GET", "/", None)]


@pytest.fixture
async def app(aiohttp_server):
    async def handler(request):
        return web.Response(text="app")

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", handler)
    return await aiohttp_server(application)


async def ask(session: aiohttp.ClientSession, method: str, url: str, body=None, headers=None):
    async with session.request(method, url, json=body, headers=headers) as resp:
        return resp.status, await resp.text(), resp.headers


@pytest.mark.parametrize("headers", [
    None,
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": "Bearer"},
    {"X-Mesh-Admin": TOKEN},
], ids=["none", "wrong", "basic", "longer", "shorter", "empty", "other-header"])
async def test_without_the_token_only_health_and_readiness_answer(app, headers):
    async with run_mesh(TOML, {"web": app.port, "orders": app.port}, admin_token=TOKEN) as mesh:
        admin = mesh.url("web", "admin")
        before = mesh.sidecars["web"].registry.as_dict()
        async with aiohttp.ClientSession() as session:
            assert (await ask(session, "GET", admin + "/healthz", headers=headers))[:2] == (200, "ok\n")
            assert (await ask(session, "GET", admin + "/readyz", headers=headers))[:2] == (200, "ready\n")
            for method, path, body in GUARDED:
                status, text, answer = await ask(session, method, admin + path, body, headers)
                assert status == 401, (method, path, status, text)
                assert answer["WWW-Authenticate"] == 'Bearer realm="mesh admin"'
                # Nothing about the sidecar, not even which endpoints exist.
                assert text == "401 Unauthorized: admin endpoints need the mesh's admin token\n"
        assert mesh.sidecars["web"].registry.as_dict() == before  # the PUT changed nothing


async def test_two_authorization_headers_are_refused(app):
    async with run_mesh(TOML, {"web": app.port, "orders": app.port}, admin_token=TOKEN) as mesh:
        host, port = mesh.sidecars["web"].listeners["admin"].address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"GET /config HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401 "), answer


async def test_with_the_token_the_controller_reads_and_steers(app):
    async with run_mesh(TOML, {"web": app.port, "orders": app.port}, admin_token=TOKEN) as mesh:
        admin = mesh.url("web", "admin")
        orders = mesh.sidecars["orders"].listeners["mesh"].address
        async with aiohttp.ClientSession() as session:
            status, text, _ = await ask(session, "GET", admin + "/config", headers=AUTH)
            assert status == 200 and json.loads(text)["service"] == "web"
            status, _, _ = await ask(session, "PUT", admin + "/registry",
                                     {"services": {"orders": [orders, "127.0.0.1:9"]}},
                                     {"authorization": f"bearer {TOKEN}"})  # any case, as RFC 7235 says
            assert status == 204
            status, text, _ = await ask(session, "GET", admin + "/registry", headers=AUTH)
            assert status == 200 and json.loads(text)["services"]["orders"] == [orders, "127.0.0.1:9"]
            status, text, _ = await ask(session, "GET", admin + "/no-such-endpoint", headers=AUTH)
            assert status == 404 and "/config" in text
            status, text, headers = await ask(session, "DELETE", admin + "/registry", headers=AUTH)
            assert status == 405 and headers["Allow"] == "GET, PUT"
            assert (await ask(session, "POST", admin + "/certs/reload", headers=AUTH))[0] == 204


async def test_a_sidecar_without_a_token_answers_only_the_public_paths(app):
    async with run_mesh(TOML, {"web": app.port, "orders": app.port}, admin_token=None) as mesh:
        admin = mesh.url("web", "admin")
        async with aiohttp.ClientSession() as session:
            assert (await ask(session, "GET", admin + "/healthz"))[0] == 200
            for method, path, body in GUARDED:
                for headers in (None, AUTH):
                    status, text, _ = await ask(session, method, admin + path, body, headers)
                    assert status == 403 and "--admin-token-file" in text, (path, status, text)


async def test_endpoints_added_later_are_protected_unless_public():
    async def hello(request):
        return Response(200, "hello\n")

    router = Router(TOKEN)
    router.add("GET", "/tap", hello)
    router.add("GET", "/metrics", hello, public=True)
    assert (await router(make_request("GET", "/tap"))).status == 401
    assert (await router(make_request("GET", "/tap", headers=AUTH))).status == 200
    assert (await router(make_request("GET", "/metrics"))).status == 200
    with pytest.raises(ValueError, match="only /healthz, /metrics, /readyz may be public"):
        router.add("GET", "/config", hello, public=True)
    assert PUBLIC == {"/healthz", "/readyz", "/metrics"}


def test_the_token_file_is_private_and_the_token_never_printed(tmp_path):
    token = AdminToken.new(tmp_path)
    token.write()
    assert stat.S_IMODE(os.stat(tmp_path / "admin.token").st_mode) == 0o600
    assert AdminToken.read(tmp_path / "admin.token") == token
    assert operator_token(tmp_path) == token
    assert token.value not in repr(token) and len(token.value) >= 43  # 256 bits
    assert AdminToken.new(tmp_path).value != token.value
    assert operator_token(tmp_path / "nowhere") is None


def sidecar_command(folder, admin: int, *extra: str) -> list[str]:
    app, mesh_port, outbound = free_port(), free_port(), free_port()
    return [sys.executable, "-m", "mesh", "sidecar", "--config", str(folder), "--service", "web",
            "--app-port", str(app), "--mesh-port", str(mesh_port), "--outbound-port", str(outbound),
            "--admin-port", str(admin), *extra]


def test_mesh_sidecar_by_hand_without_a_token_file_says_its_admin_is_closed(tmp_path):
    (tmp_path / "mesh.toml").write_text(TOML)
    admin = free_port()
    proc = subprocess.Popen(sidecar_command(tmp_path, admin), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []

        def ready() -> bool:
            assert proc.poll() is None, lines
            lines.append(proc.stdout.readline())
            return "sidecar web ready" in lines[-1]

        wait_until(ready, timeout=60, every=0, what=lambda: f"the sidecar is ready: {lines}")
        assert any("no --admin-token-file: the admin listener refuses everything but /healthz" in line
                   for line in lines), lines
        refused = fetch(f"http://127.0.0.1:{admin}/registry", method="PUT", data=b'{"services": {}}')
        assert refused.status == 403
        assert fetch(f"http://127.0.0.1:{admin}/healthz").status == 200
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()


def test_mesh_sidecar_with_an_unreadable_token_file_does_not_start(tmp_path):
    (tmp_path / "mesh.toml").write_text(TOML)
    (tmp_path / "empty.token").write_text("\n")
    for path in (tmp_path / "missing.token", tmp_path / "empty.token"):
        done = subprocess.run(sidecar_command(tmp_path, 0, "--admin-token-file", str(path)),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2
        assert f"--admin-token-file {path}: cannot read the admin token" in done.stdout
