"""Mutual TLS between sidecars: who may connect, who the app is told called, rotation."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat

import aiohttp
import pytest
from aiohttp import web

from mesh.control.ca import CA
from mesh.http.client import Limits
from mesh.sidecar.identity import Identity, describe
from mesh.testing import run_mesh

TOML = """
[mesh]
name = "shop"
[services.web]
command = "x"
[services.orders]
command = "x"
[services.audit]
command = "x"
[[routes]]
from = "web"
to = "orders"
"""


@pytest.fixture
async def app(aiohttp_server):
    hits = []

    async def handler(request):
        hits.append(request.path)
        return web.json_response({"peer": request.headers.get("x-mesh-peer"), "path": request.path})

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(application)
    server.hits = hits
    return server


def client_context(folder, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(folder / "ca.pem")
    if with_cert:
        ctx.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    return ctx


async def get(url: str, ctx: ssl.SSLContext, **kwargs):
    async with aiohttp.ClientSession() as session:
        async with session.get(url, ssl=ctx, **kwargs) as resp:
            return resp.status, await resp.text()


def apps(app):
    return {"web": app.port, "orders": app.port, "audit": app.port}


async def test_calls_between_sidecars_carry_the_verified_identity(app):
    async with run_mesh(TOML, apps(app)) as mesh:
        assert mesh.url("orders", "mesh").startswith("https://")
        async with aiohttp.ClientSession() as session:
            async with session.get(mesh.url("web", "outbound") + "/x",
                                   headers={"Host": "orders", "x-mesh-peer": "admin"}) as resp:
                assert resp.status == 200
                assert (await resp.json())["peer"] == "web"


async def test_handshake_refuses_no_cert_other_ca_and_expired(app, tmp_path):
    async with run_mesh(TOML, apps(app)) as mesh:
        url = mesh.url("orders", "mesh") + "/x"
        certs = mesh.config.state_dir / "certs"
        # No client certificate.
        with pytest.raises(aiohttp.ClientError):
            await get(url, client_context(certs / "web", with_cert=False))
        # A certificate for "web" from another CA.
        rogue = CA.create("shop")
        rogue.write_instance(tmp_path / "rogue", "web", lifetime=3600, trust=mesh.ca.cert_pem)
        with pytest.raises(aiohttp.ClientError):
            await get(url, client_context(tmp_path / "rogue"))
        # An expired certificate from the right CA.
        import datetime as dt

        cert, key = mesh.ca.issue("web", lifetime=60,
                                  not_before=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))
        (tmp_path / "old").mkdir()
        (tmp_path / "old" / "cert.pem").write_bytes(cert)
        (tmp_path / "old" / "key.pem").write_bytes(key)
        (tmp_path / "old" / "ca.pem").write_bytes(mesh.ca.cert_pem)
        with pytest.raises(aiohttp.ClientError):
            await get(url, client_context(tmp_path / "old"))
        # Plain HTTP to the mesh listener gets nowhere either.
        with pytest.raises(aiohttp.ClientError):
            await get(url.replace("https://", "http://"), None)
        assert app.hits == []
        # The right certificate works.
        status, body = await get(url, client_context(certs / "web"))
        assert status == 200 and '"peer": "web"' in body


async def test_receiving_side_denies_undeclared_callers_even_when_the_caller_is_bypassed(app):
    async with run_mesh(TOML, apps(app)) as mesh:
        certs = mesh.config.state_dir / "certs"
        # "audit" holds a valid certificate but no route to orders; it claims to be web.
        status, body = await get(mesh.url("orders", "mesh") + "/x", client_context(certs / "audit"),
                                 headers={"x-mesh-peer": "web"})
        assert status == 403 and "'audit'" in body and "'orders'" in body
        assert app.hits == []


async def test_each_connection_keeps_its_own_callers_identity(app):
    """The certificate is read once per connection: keep-alive requests on two connections, interleaved,
    each get their own caller, and renegotiation, which could change it, is off."""
    async with run_mesh(TOML, apps(app)) as mesh:
        certs = mesh.config.state_dir / "certs"
        url = mesh.url("orders", "mesh") + "/x"
        connector = {"limit": 1, "force_close": False}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(**connector)) as web_session, \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(**connector)) as audit_session:
            for _ in range(3):
                async with web_session.get(url, ssl=client_context(certs / "web")) as resp:
                    assert resp.status == 200 and (await resp.json())["peer"] == "web"
                async with audit_session.get(url, ssl=client_context(certs / "audit"),
                                             headers={"x-mesh-peer": "web"}) as resp:
                    assert resp.status == 403 and "'audit'" in await resp.text()
        identity = mesh.sidecars["orders"].identity
        assert identity is not None
        for side in (identity.server, identity.client):
            assert side.held.options & ssl.OP_NO_RENEGOTIATION


async def test_caller_checks_it_reached_the_service_it_called(app):
    async with run_mesh(TOML, apps(app)) as mesh:
        # Point "orders" at the audit sidecar: its certificate names audit, not orders.
        mesh.sidecars["web"].registry.update({"orders": [mesh.sidecars["audit"].listeners["mesh"].address]})
        async with aiohttp.ClientSession() as session:
            async with session.get(mesh.url("web", "outbound") + "/x", headers={"Host": "orders"}) as resp:
                assert resp.status == 502
                assert "identity of 'audit', not 'orders'" in await resp.text()


async def test_ca_is_kept_private_and_reused(tmp_path):
    first = CA.load_or_create(tmp_path / "ca", "shop")
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "ca.key").st_mode) == 0o600
    second = CA.load_or_create(tmp_path / "ca", "shop")
    assert first.cert_pem == second.cert_pem
    first.write_instance(tmp_path / "web", "web", lifetime=30)
    assert stat.S_IMODE(os.stat(tmp_path / "web" / "key.pem").st_mode) == 0o600
    info = describe(tmp_path / "web" / "cert.pem")
    assert info.identity == "spiffe://shop/web"


async def test_certificates_rotate_under_load_without_a_failed_request(app):
    # No pooling between sidecars: every call is a new handshake with the certificates of the moment.
    async with run_mesh(TOML, apps(app), upstream_limits=Limits(max_idle_per_endpoint=0)) as mesh:
        certs = mesh.config.state_dir / "certs"
        web_sidecar, orders_sidecar = mesh.sidecars["web"], mesh.sidecars["orders"]
        for name in ("web", "orders"):
            mesh.ca.write_instance(certs / name, name, lifetime=3)
            mesh.sidecars[name].identity.reload()
        serials = {describe(certs / "orders" / "cert.pem").not_after}
        failures = []
        done = asyncio.Event()

        async def load():
            # New connections each time, so every request needs a fresh handshake.
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                count = 0
                while not done.is_set() and count < 5000:
                    count += 1
                    async with session.get(mesh.url("web", "outbound") + "/r",
                                           headers={"Host": "orders"}) as resp:
                        if resp.status != 200:
                            failures.append(resp.status)
                        await resp.read()

        async def rotate():
            # Re-issue at half the lifetime, three times: every old certificate has expired by the end.
            for _ in range(3):
                await asyncio.sleep(1.5)
                for name in ("web", "orders"):
                    mesh.ca.write_instance(certs / name, name, lifetime=3)
                web_sidecar.identity.reload()
                orders_sidecar.identity.reload()
                serials.add(describe(certs / "orders" / "cert.pem").not_after)
            await asyncio.sleep(1)
            done.set()

        await asyncio.wait_for(asyncio.gather(load(), load(), rotate()), 30)
        assert failures == []
        assert len(serials) == 4
        assert len(app.hits) > 50


def test_mesh_certs_lists_identities_and_expiry(tmp_path, capsys):
    import json

    from mesh import config
    from mesh.cli import main

    (tmp_path / "mesh.toml").write_text(TOML)
    cfg = config.load(tmp_path)
    ca = CA.load_or_create(cfg.state_dir / "ca", cfg.name)
    ca.write_instance(cfg.state_dir / "certs" / "web", "web", lifetime=600)
    assert main(["certs", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["instance"] for r in rows] == ["(mesh CA)", "web"]
    assert rows[1]["identity"] == "spiffe://shop/web"


async def test_ca_rotation_under_load_trusts_first_then_issues(app):
    from cryptography import x509

    from mesh.control.ca import rotate_ca

    async with run_mesh(TOML, apps(app), upstream_limits=Limits(max_idle_per_endpoint=0)) as mesh:
        state = mesh.config.state_dir
        old_ca = mesh.ca.cert_pem
        failures, done = [], asyncio.Event()

        async def load():
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                count = 0
                while not done.is_set() and count < 5000:
                    count += 1
                    async with session.get(mesh.url("web", "outbound") + "/r", headers={"Host": "orders"}) as resp:
                        if resp.status != 200:
                            failures.append(resp.status)
                        await resp.read()

        async def reload(label):
            mesh.sidecars[label].identity.reload()
            await asyncio.sleep(0.2)  # let handshakes happen between steps

        async def rotate():
            await asyncio.sleep(0.5)
            instances = {name: (name, state / "certs" / name) for name in mesh.sidecars}
            new = await rotate_ca(state / "ca", "shop", instances, lifetime=600, reload=reload)
            await asyncio.sleep(0.5)
            done.set()
            return new

        _, _, new = await asyncio.wait_for(asyncio.gather(load(), load(), rotate()), 30)
        assert failures == []
        assert new.cert_pem != old_ca and (state / "ca" / "ca.pem").read_bytes() == new.cert_pem
        for name in mesh.sidecars:
            cert = x509.load_pem_x509_certificate((state / "certs" / name / "cert.pem").read_bytes())
            assert cert.issuer == new.cert.subject
            # Once every certificate comes from the new CA, the old one is trusted no more.
            assert (state / "certs" / name / "ca.pem").read_bytes() == new.cert_pem
        assert not (state / "ca" / "trust.pem").exists()


def test_mesh_certs_rotate_ca_offline_makes_a_new_ca_and_trusts_only_it(tmp_path, capsys):
    from mesh import config
    from mesh.cli import main

    (tmp_path / "mesh.toml").write_text(TOML)
    cfg = config.load(tmp_path)
    old = CA.load_or_create(cfg.state_dir / "ca", cfg.name)
    assert main(["certs", str(tmp_path), "--rotate-ca"]) == 0
    new = CA.load_or_create(cfg.state_dir / "ca", cfg.name)
    assert new.cert_pem != old.cert_pem
    new.write_instance(tmp_path / "web", "web", lifetime=60)
    assert (tmp_path / "web" / "ca.pem").read_bytes() == new.cert_pem  # what the next `mesh up` issues


# A CA taken out of the bundle: refused by new connections both ways, without a restart.

TOKEN = "test-admin-token"


class OldPeer:
    """A TLS server holding a certificate for ``orders`` from the mesh's first CA, as an instance
    never re-issued (or a copied key) would: one keep-alive HTTP/1.1 answer per request."""

    def __init__(self, folder) -> None:
        self.folder = folder
        self.requests = 0
        self.connections = 0

    async def start(self) -> str:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.folder / "cert.pem", self.folder / "key.pem")
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ctx)
        host, port = self.server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                self.requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nold")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def admin_post(url: str) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            return resp.status


async def test_a_ca_removed_by_rotation_is_refused_both_ways_without_a_restart(app, tmp_path):
    from mesh.control.ca import rotate_ca

    async with run_mesh(TOML, apps(app), admin_token=TOKEN) as mesh:
        state = mesh.config.state_dir
        old_ca = mesh.ca
        # What the first CA issued, kept aside: a caller for "web", and a server for "orders".
        old_ca.write_instance(tmp_path / "old-web", "web", lifetime=3600)
        old_ca.write_instance(tmp_path / "old-orders", "orders", lifetime=3600)
        peer = OldPeer(tmp_path / "old-orders")
        old_orders = await peer.start()
        try:
            web = mesh.sidecars["web"]
            web.registry.update({"orders": [old_orders]})
            async with aiohttp.ClientSession() as session:
                async def call() -> tuple[int, str]:
                    async with session.get(mesh.url("web", "outbound") + "/x",
                                           headers={"Host": "orders"}) as resp:
                        return resp.status, await resp.text()

                # Before: both are trusted, and web keeps its connection to the old peer alive.
                assert await call() == (200, "old")
                assert await call() == (200, "old")
                assert (peer.connections, peer.requests) == (1, 2)
                status, _ = await get(mesh.url("orders", "mesh") + "/x", client_context(tmp_path / "old-web"))
                assert status == 200

                async def reload(label: str) -> None:
                    assert await admin_post(mesh.url(label, "admin") + "/certs/reload") == 204

                instances = {name: (name, state / "certs" / name) for name in mesh.sidecars}
                new = await rotate_ca(state / "ca", "shop", instances, lifetime=600, reload=reload)

                # After, with the same sidecars: web neither reuses its kept-alive connection nor makes
                # a new one to a peer whose certificate comes from the removed CA...
                status, body = await call()
                assert status == 502 and "TLS handshake" in body, body
                assert peer.requests == 2
                # ...and orders refuses a caller holding one.
                with pytest.raises(aiohttp.ClientError):
                    await get(mesh.url("orders", "mesh") + "/x", client_context(tmp_path / "old-web"))
                # What the new CA issued works both ways.
                web.registry.update({"orders": [mesh.sidecars["orders"].listeners["mesh"].address]})
                status, body = await call()
                assert status == 200 and '"peer": "web"' in body, body
                new.write_instance(tmp_path / "new-web", "web", lifetime=600)
                status, _ = await get(mesh.url("orders", "mesh") + "/x", client_context(tmp_path / "new-web"))
                assert status == 200
        finally:
            await peer.stop()


async def test_reload_swaps_in_fresh_contexts_behind_the_same_ones(tmp_path):
    first, second = CA.create("shop"), CA.create("shop")
    first.write_instance(tmp_path, "web", lifetime=600, trust=first.cert_pem + second.cert_pem)
    identity = Identity(tmp_path, "shop")
    server, client = identity.server, identity.client
    held = client.held
    assert len(held.get_ca_certs()) == 2
    (tmp_path / "ca.pem").write_bytes(second.cert_pem)
    identity.reload()
    # The listener and the pools keep the same objects; what they hand connections to is new.
    assert (identity.server, identity.client) == (server, client) and client.held is not held
    assert len(client.held.get_ca_certs()) == len(server.held.get_ca_certs()) == 1
    # A bad file changes nothing.
    (tmp_path / "ca.pem").write_bytes(b"not a certificate")
    with pytest.raises(OSError):
        identity.reload()
    assert len(client.held.get_ca_certs()) == 1
