"""A naive aiohttp reverse proxy: the baseline the sidecar is compared with.

One catch-all handler forwards every request through one shared
``aiohttp.ClientSession`` (its default connector, which keeps connections
alive) to one upstream, on uvloop. It buffers request and response bodies and
drops hop-by-hop headers, and nothing else: no limits, no request ids, no
forwarding headers, no access log. This is what "a reverse proxy in twenty
lines of aiohttp" costs.

    python bench/naive_proxy.py --port 8001 --upstream 127.0.0.1:8000
"""

from __future__ import annotations

import argparse

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection",
    "content-length", "host",
})


def make_app(upstream: str) -> web.Application:
    base = f"http://{upstream}"
    app = web.Application()

    async def open_session(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(auto_decompress=False)

    async def close_session(app: web.Application) -> None:
        await app["session"].close()

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        async with app["session"].request(request.method, base + request.path_qs, headers=headers,
                                          data=body or None, allow_redirects=False) as upstream_resp:
            data = await upstream_resp.read()
            out = {k: v for k, v in upstream_resp.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=upstream_resp.status, body=data, headers=out)

    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port to forward to")
    args = parser.parse_args()
    web.run_app(make_app(args.upstream), host=args.host, port=args.port, access_log=None,
                print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
