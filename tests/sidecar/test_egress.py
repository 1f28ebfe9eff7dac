"""Egress: an app's calls to hosts outside the mesh through its sidecar, against servers on 127.0.0.2.

The "outside" servers listen on 127.0.0.2, a loopback address that is no part of the mesh; nothing
here reaches past this machine. Names other than IP addresses resolve through a stand-in resolver.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from mesh import cli
from mesh.config.model import Egress
from mesh.sidecar.egress import BadTarget, EgressPolicy, parse_authority
from mesh.testing import run_mesh

from ..conftest import port_of, raw_http
from ..harness import eventually
from ..outside import OUTSIDE, outside_certificate

TOML = """
[mesh]
name = "eg"
plugin_path = ["."]
{mesh_extra}
[services.a]
command = "app"
{a_extra}
[services.b]
command = "app"
[[routes]]
from = "a"
to = "b"
{egress}
"""

STAMP = '''
from mesh import LOG_FIELDS, Plugin

class Stamp(Plugin):
    async def handle(self, request, call_next):
        request.headers["x-stamp"] = "outbound plugin"
        request.state.setdefault(LOG_FIELDS, {})["stamped"] = True
        return await call_next(request)
'''


def mesh_toml(egress: str = "", *, a_extra: str = "", mesh_extra: str = "") -> str:
    return TOML.format(egress=egress, a_extra=a_extra, mesh_extra=mesh_extra)


def entry(hosts: str = f'["{OUTSIDE}"]', *, source: str = "a", **keys: Any) -> str:
    lines = ["[[egress]]", f'from = "{source}"', f"hosts = {hosts}"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


async def seen(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({"method": request.method, "path": request.raw_path, "len": len(body),
                              "headers": {k.lower(): v for k, v in request.headers.items()}})


@pytest.fixture
async def outside() -> AsyncIterator[int]:
    """An HTTP server outside the mesh, on 127.0.0.2: answers with what it received."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", seen)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, OUTSIDE, 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """A plain TCP server outside the mesh, on 127.0.0.2: says hello, then echoes until EOF, then says bye."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello\n")
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write(b"bye\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, OUTSIDE, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.2 and its key, made for this test."""
    return outside_certificate(tmp_path)


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(found: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(value for sample, have, value in found
               if sample == name and all(have.get(k) == v for k, v in labels.items()))


async def counted(mesh: Any, service: str, name: str = "mesh_requests_total", **labels: str) -> float:
    """What a sidecar's /metrics says of ``name`` with ``labels`` now."""
    async with aiohttp.ClientSession() as session:
        async with session.get(mesh.url(service, "admin") + "/metrics") as resp:
            return total(samples(await resp.text()), name, **labels)


async def connect(port: int, head: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send a CONNECT head to 127.0.0.1:port; return the streams and the response head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    async with asyncio.timeout(10):
        answer = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, answer


# the policy, alone


@pytest.mark.parametrize("egress, call, allowed", [
    # exact hosts, case and a trailing dot aside; the default port of plain HTTP is 80, of CONNECT 443
    (Egress("a", ["api.example.com"]), ("a", "api.example.com", 80, "GET", "/"), True),
    (Egress("a", ["API.Example.com."]), ("a", "api.example.com", 80, "GET", "/"), True),
    (Egress("a", ["api.example.com"]), ("a", "api.example.com", 443, "GET", "/"), False),
    (Egress("a", ["api.example.com"]), ("a", "api.example.com", 443, "CONNECT", ""), True),
    (Egress("a", ["api.example.com"]), ("a", "api.example.com", 80, "CONNECT", ""), False),
    (Egress("a", ["api.example.com"]), ("b", "api.example.com", 80, "GET", "/"), False),
    (Egress("a", ["api.example.com"]), ("a", "example.com", 80, "GET", "/"), False),
    # wildcards: subdomains at any depth, never the domain itself nor a name that only ends alike
    (Egress("a", ["*.example.com"]), ("a", "api.example.com", 80, "GET", "/"), True),
    (Egress("a", ["*.example.com"]), ("a", "a.b.example.com", 80, "GET", "/"), True),
    (Egress("a", ["*.example.com"]), ("a", "example.com", 80, "GET", "/"), False),
    (Egress("a", ["*.example.com"]), ("a", "badexample.com", 80, "GET", "/"), False),
    (Egress("a", ["*.example.com"]), ("a", "api.example.com.evil.net", 80, "GET", "/"), False),
    # ports, given: for both kinds of call
    (Egress("a", ["h.test"], ports=[8080]), ("a", "h.test", 8080, "GET", "/"), True),
    (Egress("a", ["h.test"], ports=[8080]), ("a", "h.test", 8080, "CONNECT", ""), True),
    (Egress("a", ["h.test"], ports=[8080]), ("a", "h.test", 80, "GET", "/"), False),
    # paths and methods narrow plain HTTP; CONNECT is opaque
    (Egress("a", ["h.test"], paths=["/v1/*"]), ("a", "h.test", 80, "GET", "/v1/x"), True),
    (Egress("a", ["h.test"], paths=["/v1/*"]), ("a", "h.test", 80, "GET", "/v2/x"), False),
    (Egress("a", ["h.test"], paths=["/v1/*"], ports=[443]), ("a", "h.test", 443, "CONNECT", ""), False),
    (Egress("a", ["h.test"], methods=["get"]), ("a", "h.test", 80, "GET", "/"), True),
    (Egress("a", ["h.test"], methods=["get"]), ("a", "h.test", 80, "POST", "/"), False),
    (Egress("a", ["h.test"], methods=["GET"]), ("a", "h.test", 443, "CONNECT", ""), False),
    (Egress("a", ["h.test"], methods=["CONNECT"]), ("a", "h.test", 443, "CONNECT", ""), True),
    # addresses are hosts like any other
    (Egress("a", ["127.0.0.2"]), ("a", "127.0.0.1", 80, "GET", "/"), False),
    (Egress("a", ["::1"]), ("a", "[::1]", 80, "GET", "/"), True),
])
def test_policy(egress: Egress, call: tuple[str, str, int, str, str], allowed: bool) -> None:
    assert EgressPolicy([egress]).check(*call).allowed is allowed


def test_policy_audit_and_mesh_services(caplog: pytest.LogCaptureFixture) -> None:
    policy = EgressPolicy([Egress("a", ["h.test"], paths=["/ok"], mode="audit")], services=frozenset({"a", "b"}))
    with caplog.at_level(logging.WARNING, "mesh.egress"):
        decision = policy.check("a", "h.test", 80, "GET", "/other")
    assert decision.allowed and decision.audited and decision.exact
    assert "audit: would deny" in caplog.text and "h.test:80" in caplog.text
    assert not policy.check("a", "other.test", 80, "GET", "/").allowed  # audit covers the hosts it names
    assert EgressPolicy([], mode="audit").check("a", "other.test", 80, "GET", "/").audited
    refused = policy.check("a", "b", 443, "CONNECT", "")
    assert not refused.allowed and "service of this mesh" in refused.reason


@pytest.mark.parametrize("authority, default, expected", [
    ("Example.COM", 80, ("example.com", 80)),
    ("example.com.:8080", 80, ("example.com", 8080)),
    ("example.com:", 80, ("example.com", 80)),
    ("127.0.0.2:443", None, ("127.0.0.2", 443)),
    ("[::FFFF:7f00:2]:443", None, ("[::ffff:7f00:2]", 443)),
    ("xn--bcher-kva.example:443", None, ("xn--bcher-kva.example", 443)),
])
def test_parse_authority(authority: str, default: int | None, expected: tuple[str, int]) -> None:
    assert parse_authority(authority, default) == expected


@pytest.mark.parametrize("authority", [
    "example.com", "user@example.com:443", "example.com:0", "example.com:65536", "example.com:+443",
    "example.com:44a", ":443", "a..b:443", "-a.b:443", "[::1:443", "[::1]x:443", "[fe80::1%25lo]:443",
    "127.1:443", "2130706433:443", "a_b%2e.c:443", "a:b:443",
])
def test_parse_authority_refuses(authority: str) -> None:
    with pytest.raises(BadTarget):
        parse_authority(authority, None)


# plain HTTP through the sidecar


async def test_allowed_call_goes_out_in_origin_form(outside: int, tmp_path: Path) -> None:
    toml = mesh_toml(entry(ports=[outside]))
    logs = tmp_path / "logs"
    async with run_mesh(toml, {"a": 9, "b": 9}, tmp_path, access_logs=logs) as mesh:
        proxy = mesh.url("a", "outbound")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://{OUTSIDE}:{outside}/x/../y?q=1", data=b"hello", proxy=proxy,
                                    headers={"x-mesh-peer": "forged", "x-mesh-deadline-ms": "5000"}) as resp:
                assert resp.status == 200
                got = await resp.json()
            async with session.get(mesh.url("a", "admin") + "/metrics") as resp:
                metrics = samples(await resp.text())
    assert got["method"] == "POST" and got["path"] == "/y?q=1" and got["len"] == 5
    headers = got["headers"]
    assert headers["host"] == f"{OUTSIDE}:{outside}"
    for name in ("x-mesh-peer", "x-mesh-deadline-ms", "proxy-connection"):
        assert name not in headers
    assert total(metrics, "mesh_requests_total", direction="outbound", route="a->egress", status_class="2xx") == 1
    lines = [json.loads(line) for line in (logs / "a.jsonl").read_text().splitlines()]
    assert [(line["route"], line["upstream"], line["status"]) for line in lines] == [
        ("a->egress", f"{OUTSIDE}:{outside}", 200)]


async def test_denied_by_default_with_a_403_naming_the_host(outside: int) -> None:
    toml = mesh_toml(entry(ports=[outside]))
    async with run_mesh(toml, {"a": 9, "b": 9}) as mesh:
        own = {name: port_of(mesh.url("a", name)) for name in ("admin", "mesh", "outbound")}
        async with aiohttp.ClientSession() as session:
            calls = [
                (mesh.url("b", "outbound"), f"http://{OUTSIDE}:{outside}/", f"{OUTSIDE}:{outside}"),  # no entry
                (mesh.url("a", "outbound"), f"http://{OUTSIDE}:{outside + 1}/", f"{OUTSIDE}:{outside + 1}"),
                (mesh.url("a", "outbound"), f"http://localhost:{outside}/", f"localhost:{outside}"),
                (mesh.url("a", "outbound"), "http://nosuch/", "nosuch:80"),
            ] + [(mesh.url("a", "outbound"), f"http://127.0.0.1:{port}/config", f"127.0.0.1:{port}")
                 for port in own.values()]
            for proxy, url, named in calls:
                async with session.get(url, proxy=proxy) as resp:
                    text = await resp.text()
                    assert resp.status == 403, (url, text)
                    assert named in text and "[[egress]]" in text
            async with session.get(mesh.url("a", "admin") + "/metrics") as resp:
                metrics = samples(await resp.text())
    assert total(metrics, "mesh_policy_denials_total", route="a->egress", result="denied") == len(calls) - 1


async def test_paths_and_methods(outside: int) -> None:
    toml = mesh_toml(entry(ports=[outside], paths=["/api/*"], methods=["GET", "HEAD"]))
    async with run_mesh(toml, {"a": 9, "b": 9}) as mesh:
        proxy = mesh.url("a", "outbound")
        base = f"http://{OUTSIDE}:{outside}"
        async with aiohttp.ClientSession() as session:
            for method, path, status in (("GET", "/api/x", 200), ("HEAD", "/api/x", 200), ("POST", "/api/x", 403),
                                         ("GET", "/other", 403), ("GET", "/api/../other", 403)):
                async with session.request(method, base + path, proxy=proxy) as resp:
                    assert resp.status == status, (method, path)


async def test_audit_mode_logs_and_lets_the_call_through(outside: int, caplog: pytest.LogCaptureFixture) -> None:
    toml = mesh_toml(entry(ports=[outside], paths=["/ok"], mode="audit"))
    async with run_mesh(toml, {"a": 9, "b": 9}) as mesh:
        with caplog.at_level(logging.WARNING, "mesh.egress"):
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://{OUTSIDE}:{outside}/not-ok", proxy=mesh.url("a", "outbound")) as resp:
                    assert resp.status == 200
                async with session.get(mesh.url("a", "admin") + "/metrics") as resp:
                    metrics = samples(await resp.text())
    warned = [r.getMessage() for r in caplog.records if r.name == "mesh.egress"]
    assert warned == [f"audit: would deny: no [[egress]] entry allows 'a' to call {OUTSIDE}:{outside} (GET /not-ok)"]
    assert total(metrics, "mesh_policy_denials_total", route="a->egress", result="audited") == 1


async def test_wildcard_hosts_and_names_resolved_by_the_sidecar(outside: int) -> None:
    toml = mesh_toml(entry('["*.example.test", "named.example.test"]', ports=[outside]))
    asked: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return [OUTSIDE]

    async with run_mesh(toml, {"a": 9, "b": 9}) as mesh:
        mesh.sidecars["a"].egress.resolve = resolver
        proxy = mesh.url("a", "outbound")
        async with aiohttp.ClientSession() as session:
            # Named exactly: it may resolve to any address, a loopback one included.
            async with session.get(f"http://Named.Example.Test.:{outside}/n", proxy=proxy) as resp:
                assert resp.status == 200
                assert (await resp.json())["headers"]["host"] == f"named.example.test.:{outside}"  # kept as sent
            # Only a wildcard names it: never to a local address (the sidecar's own listeners live there).
            async with session.get(f"http://api.example.test:{outside}/", proxy=proxy) as resp:
                text = await resp.text()
                assert resp.status == 403 and "api.example.test resolves to 127.0.0.2" in text
            for host in ("example.test", "badexample.test", "api.example.test.evil"):
                async with session.get(f"http://{host}:{outside}/", proxy=proxy) as resp:
                    assert resp.status == 403 and host in await resp.text()
    assert asked == ["named.example.test", "api.example.test"]  # denied names are never looked up


async def test_the_next_address_is_tried_when_one_refuses(outside: int, echo: int) -> None:
    toml = mesh_toml(entry('["two.example.test"]', ports=[outside, echo]))

    async def resolver(host: str, port: int) -> list[str]:
        return ["127.0.0.3", OUTSIDE]  # nothing listens on 127.0.0.3

    async with run_mesh(toml, {"a": 9, "b": 9}) as mesh:
        mesh.sidecars["a"].egress.resolve = resolver
        proxy = mesh.url("a", "outbound")
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://two.example.test:{outside}/", data=b"once", proxy=proxy) as resp:
                assert resp.status == 200 and (await resp.json())["len"] == 4
        head = f"CONNECT two.example.test:{echo} HTTP/1.1\r\n\r\n".encode()
        reader, writer, answer = await connect(port_of(proxy), head)
        assert answer.startswith(b"HTTP/1.1 200 ")
        async with asyncio.timeout(10):
            assert await reader.readexactly(6) == b"hello\n"
        writer.close()


async def test_ports_default_to_80(outside: int) -> None:
    async with run_mesh(mesh_toml(entry()), {"a": 9, "b": 9}) as mesh:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{OUTSIDE}:{outside}/", proxy=mesh.url("a", "outbound")) as resp:
                assert resp.status == 403 and f"{OUTSIDE}:{outside}" in await resp.text()


async def test_outbound_plugins_run_on_plain_http_egress(outside: int, echo: int, tmp_path: Path) -> None:
    (tmp_path / "stamp.py").write_text(STAMP)
    toml = mesh_toml(entry(ports=[outside, echo]), a_extra='outbound = [{ use = "stamp.py:Stamp" }]')
    logs = tmp_path / "logs"
    async with run_mesh(toml, {"a": 9, "b": 9}, tmp_path, access_logs=logs) as mesh:
        proxy = mesh.url("a", "outbound")
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{OUTSIDE}:{outside}/", proxy=proxy) as resp:
                assert (await resp.json())["headers"]["x-stamp"] == "outbound plugin"
        reader, writer, answer = await connect(port_of(proxy), f"CONNECT {OUTSIDE}:{echo} HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 200 ")
        async with asyncio.timeout(10):
            assert await reader.readexactly(6) == b"hello\n"
        writer.close()
        # A tunnel is counted once it has ended.
        await eventually(lambda: counted(mesh, "a", method="CONNECT", route="a->egress", status_class="2xx"))
    lines = [json.loads(line) for line in (logs / "a.jsonl").read_text().splitlines()]
    # CONNECT is opaque: no plugin sees it.
    assert sorted((line["method"], line.get("stamped")) for line in lines) == [("CONNECT", None), ("GET", True)]


async def test_https_through_connect_to_an_allowed_host(tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"secret for {request.host}")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    site = web.TCPSite(runner, OUTSIDE, 0, ssl_context=server_tls)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with run_mesh(mesh_toml(entry(ports=[port])), {"a": 9, "b": 9}) as mesh:
            client_tls = ssl.create_default_context(cafile=str(cert))
            async with aiohttp.ClientSession() as session:
                for _ in range(2):
                    async with session.get(f"https://{OUTSIDE}:{port}/", proxy=mesh.url("a", "outbound"),
                                           ssl=client_tls) as resp:
                        assert resp.status == 200 and await resp.text() == f"secret for {OUTSIDE}:{port}"
                with pytest.raises(aiohttp.ClientHttpProxyError) as denied:  # b has no entry
                    async with session.get(f"https://{OUTSIDE}:{port}/", proxy=mesh.url("b", "outbound"),
                                           ssl=client_tls):
                        pass
                assert denied.value.status == 403
    finally:
        await runner.cleanup()


async def test_connect_carries_bytes_both_ways(echo: int) -> None:
    async with run_mesh(mesh_toml(entry(ports=[echo])), {"a": 9, "b": 9}) as mesh:
        port = port_of(mesh.url("a", "outbound"))
        # What the client sends right after its CONNECT goes first, once the tunnel is open.
        reader, writer, answer = await connect(
            port, f"CONNECT {OUTSIDE}:{echo} HTTP/1.1\r\nHost: {OUTSIDE}:{echo}\r\n\r\nearly ".encode())
        assert answer == b"HTTP/1.1 200 Connection Established\r\n\r\n"
        async with asyncio.timeout(10):
            assert await reader.readexactly(12) == b"hello\nearly "
            big = bytes(range(256)) * 4096  # 1 MiB through, with flow control both ways
            writer.write(big)
            assert await reader.readexactly(len(big)) == big
            writer.write_eof()  # a half-close passes on: the server still answers
            assert await reader.read() == b"bye\n"
        writer.close()


async def test_connect_denied_with_a_403_naming_the_host(echo: int) -> None:
    async with run_mesh(mesh_toml(entry(ports=[echo])), {"a": 9, "b": 9}) as mesh:
        for proxy, target in ((mesh.url("b", "outbound"), f"{OUTSIDE}:{echo}"),
                              (mesh.url("a", "outbound"), f"{OUTSIDE}:{echo + 1}"),
                              (mesh.url("a", "outbound"), f"localhost:{echo}"),
                              (mesh.url("a", "outbound"), "b:443"),
                              (mesh.url("a", "outbound"), f"127.0.0.1:{port_of(mesh.url('a', 'admin'))}")):
            data = await raw_http(port_of(proxy), f"CONNECT {target} HTTP/1.1\r\n\r\nsecret".encode())
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 403 ") and b"Connection: close" in head, target
            assert target.encode() in body or b"'b' is a service of this mesh" in body
            assert b"secret" not in data


@pytest.mark.parametrize("head", [
    b"CONNECT 127.0.0.2 HTTP/1.1\r\n\r\n",  # no port
    b"CONNECT 127.0.0.2: HTTP/1.1\r\n\r\n",
    b"CONNECT user@127.0.0.2:443 HTTP/1.1\r\n\r\n",
    b"CONNECT /path HTTP/1.1\r\n\r\n",
    b"CONNECT http://127.0.0.2:443/ HTTP/1.1\r\n\r\n",
    b"CONNECT 127.0.0.2:0 HTTP/1.1\r\n\r\n",
    b"CONNECT 127.0.0.2:99999 HTTP/1.1\r\n\r\n",
    b"CONNECT a..b:443 HTTP/1.1\r\n\r\n",
    b"CONNECT [::1:443 HTTP/1.1\r\n\r\n",
    b"CONNECT 127.0.0.2:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    b"CONNECT 127.0.0.2:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
])
async def test_malformed_connect_targets_get_400(head: bytes) -> None:
    async with run_mesh(mesh_toml(entry(ports=[443])), {"a": 9, "b": 9}) as mesh:
        data = await raw_http(port_of(mesh.url("a", "outbound")), head)
        assert data.startswith(b"HTTP/1.1 400 "), data[:200]


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.2:0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a%2eb\r\n\r\n",
    b"GET http://user@127.0.0.2/ HTTP/1.1\r\n\r\n",
    b"GET https://127.0.0.2/ HTTP/1.1\r\n\r\n",  # TLS is the app's: through CONNECT, never sent in the clear
])
async def test_malformed_hosts_get_400(head: bytes) -> None:
    async with run_mesh(mesh_toml(entry(ports=[80, 443])), {"a": 9, "b": 9}) as mesh:
        data = await raw_http(port_of(mesh.url("a", "outbound")), head[:-2] + b"Connection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400 "), data[:200]


async def test_connect_is_refused_on_other_listeners() -> None:
    async with run_mesh(mesh_toml(entry(ports=[443])), {"a": 9, "b": 9}, tls=False) as mesh:
        for name in ("public", "mesh"):
            data = await raw_http(port_of(mesh.url("a", name)), b"CONNECT 127.0.0.2:443 HTTP/1.1\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 405 "), name


async def test_keeps_serving_others_after_hostile_input(outside: int, echo: int, aiohttp_server: Any) -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", seen)
    b_app = await aiohttp_server(app)
    async with run_mesh(mesh_toml(entry(ports=[outside, echo])), {"a": 9, "b": b_app.port}) as mesh:
        port = port_of(mesh.url("a", "outbound"))
        hostile = [
            b"CONNECT 127.0.0.2:1 HTTP/1.1\r\n\r\n" + b"\x16\x03\x01" * 1000,
            b"CONNECT " + b"a" * 9000 + b":443 HTTP/1.1\r\n\r\n",
            b"CONNECT 127.0.0.2:443 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            b"CONNECT 127.0.0.2:443 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nHost: b\r\n\r\n",
            b"GET http://127.0.0.2:1/ HTTP/1.1\r\n\r\nCONNECT 127.0.0.2:443 HTTP/1.1\r\n\r\n",
            b"CONNECT\r\n\r\n",
            f"CONNECT {OUTSIDE}:{echo} HTTP/1.1\r\n\r\n".encode() + b"\x00" * 70000,
        ]
        results = await asyncio.gather(*(raw_http(port, data) for data in hostile for _ in range(3)),
                                       return_exceptions=True)
        for result in results:
            assert not isinstance(result, BaseException) or isinstance(result, (ConnectionError, TimeoutError))
        # A tunnel left half-open by its client does not hold the sidecar.
        _, idle_writer, answer = await connect(port, f"CONNECT {OUTSIDE}:{echo} HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 200 ")
        async with aiohttp.ClientSession() as session:
            async with session.get("http://b/ok", proxy=mesh.url("a", "outbound")) as resp:
                assert resp.status == 200 and (await resp.json())["headers"]["x-mesh-peer"] == "a"
            async with session.get(f"http://{OUTSIDE}:{outside}/ok", proxy=mesh.url("a", "outbound")) as resp:
                assert resp.status == 200
        idle_writer.close()


# mesh check


@pytest.mark.parametrize("egress, problem", [
    ('[[egress]]\nfrom = "a"\nhosts = ["x.test"]\nport = [443]\n',
     "egress[0]: unknown option 'port', did you mean 'ports'?"),
    ('[[egress]]\nfrom = "c"\nhosts = ["x.test"]\n', "egress[0].from: unknown service 'c'"),
    ('[[egress]]\nhosts = ["x.test"]\n', "egress[0].from: missing, expected a string"),
    ('[[egress]]\nfrom = "a"\n', "egress[0].hosts: missing, expected a list of strings"),
    ('[[egress]]\nfrom = "a"\nhosts = []\n', "egress[0].hosts: expected at least one host"),
    ('[[egress]]\nfrom = "a"\nhosts = ["*"]\n', "egress[0].hosts[0]: expected a host or '*.' before a domain"),
    ('[[egress]]\nfrom = "a"\nhosts = ["api.*.test"]\n', "egress[0].hosts[0]: expected a host or '*.'"),
    ('[[egress]]\nfrom = "a"\nhosts = ["*.10.0.0.1"]\n', "egress[0].hosts[0]: expected '*.' before a domain name"),
    ('[[egress]]\nfrom = "a"\nhosts = ["x.test:443"]\n', "egress[0].hosts[0]: expected a host without a port"),
    ('[[egress]]\nfrom = "a"\nhosts = ["bücher.test"]\n', "egress[0].hosts[0]: expected an international name"),
    ('[[egress]]\nfrom = "a"\nhosts = ["http://x.test/"]\n', "egress[0].hosts[0]: expected a host name"),
    ('[[egress]]\nfrom = "a"\nhosts = ["b"]\n', "egress[0].hosts[0]: 'b' is a service of this mesh"),
    ('[[egress]]\nfrom = "a"\nhosts = ["x.test"]\nports = [0]\n',
     "egress[0].ports[0]: expected a port between 1 and 65535, found 0"),
    ('[[egress]]\nfrom = "a"\nhosts = ["x.test"]\nports = ["443"]\n', "egress[0].ports[0]: expected an integer"),
    ('[[egress]]\nfrom = "a"\nhosts = ["x.test"]\npaths = ["v1/*"]\n',
     "egress[0].paths[0]: expected a path starting with '/'"),
    ('[[egress]]\nfrom = "a"\nhosts = ["x.test"]\nmethods = ["FETCH"]\n',
     "egress[0].methods[0]: unknown HTTP method 'FETCH'"),
    ('[[egress]]\nfrom = "a"\nhosts = ["x.test"]\nmode = "log"\n', "egress[0].mode: expected one of 'enforce'"),
    ('egress = { from = "a" }\n', "egress: expected [[egress]] entries"),
])
def test_check_reports_bad_egress_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str], egress: str,
                                          problem: str) -> None:
    (tmp_path / "mesh.toml").write_text(
        egress + '[services.a]\ncommand = "app"\n[services.b]\ncommand = "app"\n'
        if egress.startswith("egress =") else
        '[services.a]\ncommand = "app"\n[services.b]\ncommand = "app"\n' + egress)
    assert cli.main(["check", str(tmp_path)]) == 1
    errors = capsys.readouterr().err.splitlines()
    assert errors[-1] == "1 problem" and errors[0].startswith(problem), errors


def test_check_accepts_egress_entries(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mesh.toml").write_text(
        '[services.a]\ncommand = "app"\n' + entry('["api.example.com", "*.example.org", "127.0.0.2", "::1"]',
                                                   ports=[80, 443], methods=["GET", "CONNECT"], mode="audit"))
    assert cli.main(["check", str(tmp_path)]) == 0, capsys.readouterr().err
