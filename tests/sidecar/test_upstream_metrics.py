"""What /metrics says of upstreams, TLS handshakes and the certificate (read when scraped)."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from mesh.testing import run_mesh

from .test_observing import samples, total

TOML = """
[mesh]
name = "upstreams"
[services.web]
command = "x"
port = 1
[services.orders]
command = "x"
port = 1
[[routes]]
from = "web"
to = "orders"
"""


async def test_upstreams_handshakes_and_expiry_show_on_metrics(aiohttp_server, tmp_path: Path):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    ports = {}
    for name in ("web", "orders"):
        app = web.Application()
        app.router.add_get("/{tail:.*}", handler)
        ports[name] = (await aiohttp_server(app)).port
    async with run_mesh(TOML, ports, tmp_path) as mesh, aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.get(mesh.url("web", "outbound") + "/x", headers={"Host": "orders"}) as response:
                assert response.status == 200
        # A caller without a client certificate: the handshake fails on orders' side.
        host, port = mesh.sidecars["orders"].listeners["mesh"].address.rsplit(":", 1)
        anonymous = ssl.create_default_context()
        anonymous.check_hostname = False
        anonymous.verify_mode = ssl.CERT_NONE
        try:
            _, writer = await asyncio.open_connection(host, int(port), ssl=anonymous)
            writer.write(b"GET / HTTP/1.1\r\nHost: orders\r\n\r\n")
            await writer.drain()
            writer.close()
        except (ssl.SSLError, ConnectionError):
            pass
        async with client.get(mesh.url("web", "admin") + "/metrics") as response:
            web_metrics = samples(await response.text())
        for _ in range(100):
            async with client.get(mesh.url("orders", "admin") + "/metrics") as response:
                orders_metrics = samples(await response.text())
            if total(orders_metrics, "mesh_tls_handshake_failures_total", side="server"):
                break
            await asyncio.sleep(0.05)
    address = mesh.sidecars["orders"].listeners["mesh"].address
    assert total(web_metrics, "mesh_upstream_instance_requests_total", target="orders", instance=address) == 3
    assert total(web_metrics, "mesh_upstream_instance_errors_total", target="orders") == 0
    assert total(web_metrics, "mesh_upstream_ejected", target="orders") == 0
    assert total(web_metrics, "mesh_upstream_idle_connections", target="orders") >= 1
    assert total(web_metrics, "mesh_breaker_rejections_total") == 0
    assert total(web_metrics, "mesh_retry_budget_exhausted_total") == 0
    expiry = total(web_metrics, "mesh_certificate_expiry_timestamp_seconds", service="web")
    assert time.time() < expiry < time.time() + 2 * 3600
    assert total(orders_metrics, "mesh_tls_handshake_failures_total", side="server") >= 1
