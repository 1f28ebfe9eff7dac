#!/usr/bin/env python3
"""What the pieces of the sidecar cost, each alone: CPU µs per request.

The sidecar's CPU per request (bench/run.py) is roughly the sum of

- an HTTP server: aiohttp's low-level ``web.Server``, which `mesh.http.server`
  builds on; measured here answering ``hello world`` itself, next to a bare
  asyncio protocol on httptools doing the same (the floor for Python);
- the upstream client: `mesh.http.client.Pool.request` against the backend,
  32 requests in flight, in one process without any server;
- mesh's own work between the two (Request/Response objects, header rules,
  request ids, path checks, the chain): the sidecar's total minus the above;
- the plugin chain itself, in process, without sockets: empty, 4 ``noop``
  plugins, 4 ``stamp`` plugins, so the cost of one trivial plugin is measured
  far below the noise of a req/s figure.

    /tmp/venv/bin/python bench/parts.py            # about 30 s

Same machinery as run.py: nginx backend on 127.0.0.1, wrk, /proc/<pid>/stat,
every process stopped by its pid in a finally block.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402

SERVERS = r'''
import asyncio, sys, uvloop
kind, port = sys.argv[1], int(sys.argv[2])
BODY = b"hello world\n"
if kind == "aiohttp":
    from aiohttp import web

    async def handler(request):
        return web.Response(body=BODY, content_type="text/plain")

    def protocol_factory():
        return web.Server(handler, access_log=None)  # the Server is the protocol factory
else:
    import httptools
    RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%b"
                % (len(BODY), BODY))

    class Bare(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data):
            self.parser.feed_data(data)

        def on_message_complete(self):
            self.transport.write(RESPONSE)

    def protocol_factory():
        return Bare

async def main():
    server = await asyncio.get_running_loop().create_server(protocol_factory(), "127.0.0.1", port)
    async with server:
        await asyncio.Event().wait()

uvloop.run(main())
'''

CLIENT = r'''
import asyncio, os, sys, uvloop
from multidict import CIMultiDict
from mesh.http.client import Endpoint, Pool

endpoint, total, concurrency = Endpoint("127.0.0.1", int(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])

async def worker(pool, n):
    for _ in range(n):
        response = await pool.request(endpoint, "GET", "/", CIMultiDict({"Host": "app", "User-Agent": "wrk"}))
        assert response.status == 200 and response.body == b"hello world\n"

async def main():
    pool = Pool()
    await worker(pool, 500)
    before = os.times()
    await asyncio.gather(*(worker(pool, total // concurrency) for _ in range(concurrency)))
    after = os.times()
    user, system = after.user - before.user, after.system - before.system
    print(f"{(user + system) / total * 1e6:.1f} {system / total * 1e6:.1f}")
    await pool.close()

uvloop.run(main())
'''


CHAIN = r'''
import sys, time, uvloop
sys.path.insert(0, sys.argv[1])
from noop import Noop
from mesh.chain import Chain
from mesh.loader import load_class
from mesh.messages import Request, Response

Stamp = load_class("stamp")

async def app(request):
    return Response(200, b"hello world\n")

async def main():
    request = Request("GET", "/")
    chains = {"empty": [], "noop": [(f"noop{i}", Noop()) for i in range(4)],
              "stamp": [(f"stamp{i}", Stamp(value=str(i), header=f"X-Stamp-{i}")) for i in range(4)]}
    n = int(sys.argv[2])
    for name, plugins in chains.items():
        chain = Chain(plugins, app)
        for _ in range(n // 10):
            await chain(request)
        before = time.process_time()
        for _ in range(n):
            await chain(request)
        print(name, (time.process_time() - before) / n * 1e6)

uvloop.run(main())
'''


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-d", "--duration", type=float, default=4.0)
    p.add_argument("--requests", type=int, default=20000, help="Pool.request calls per round")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args()
    wrk_args = argparse.Namespace(wrk="wrk", threads=1, connections=32, profile=None)
    tmp = Path(tempfile.mkdtemp(prefix="mesh-parts-"))
    (tmp / "servers.py").write_text(SERVERS)
    (tmp / "client.py").write_text(CLIENT)
    (tmp / "chain.py").write_text(CHAIN)
    procs = bench.Processes(tmp)
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        backend_port = bench.free_port()
        backend = bench.start_nginx(procs, tmp, "backend", backend_port,
                                    f"            default_type text/plain;\n"
                                    f"            return 200 {json.dumps(bench.BODY)};")
        bench.wait_ready(backend_port, "/", backend, "backend", procs)
        servers = []
        for kind, label in (("aiohttp", "aiohttp web.Server, hello world"),
                            ("bare", "bare asyncio protocol + httptools, hello world")):
            port = bench.free_port()
            proc = procs.start(kind, [args.python, str(tmp / "servers.py"), kind, str(port)])
            bench.wait_ready(port, "/", proc, kind, procs)
            servers.append(bench.Target(label, port, [proc]))
        for _ in range(args.rounds):
            for target in servers:
                bench.check_target(target)
                bench.wrk(procs, wrk_args, target, 1)
                pid = target.proxies[0].pid
                before = bench.cpu_ticks([pid])
                text, _ = bench.wrk(procs, wrk_args, target, args.duration)
                after = bench.cpu_ticks([pid])
                n = bench.parse_wrk(text)["requests"]
                per = 1e6 / bench.CLK_TCK / n
                results.setdefault(target.name, []).append(
                    ((sum(after) - sum(before)) * per, (after[1] - before[1]) * per))
            client = procs.start("client", [args.python, str(tmp / "client.py"), str(backend_port),
                                            str(args.requests), "32"], env=dict(os.environ))
            client.wait(120)
            procs.started.remove(("client", client))
            total, system = (float(x) for x in (tmp / "client.log").read_text().split())
            results.setdefault("mesh.http.client.Pool.request, 32 in flight", []).append((total, system))
            chain = procs.start("chain", [args.python, str(tmp / "chain.py"), str(bench.HERE / "plugins"),
                                          "200000"])
            chain.wait(120)
            procs.started.remove(("chain", chain))
            costs = dict(line.split() for line in (tmp / "chain.log").read_text().splitlines())
            empty = float(costs["empty"])
            results.setdefault("Chain, empty (in process, no sockets)", []).append((empty, 0.0))
            for name in ("noop", "stamp"):
                per_plugin = (float(costs[name]) - empty) / 4
                results.setdefault(f"one {name} plugin (4 in a chain, minus empty, / 4)", []).append(
                    (per_plugin, 0.0))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(k) for k in results)
    print(f"{'piece':{width}}  CPU µs/req (sys), median of {args.rounds}")
    for name, values in results.items():
        total = statistics.median(v[0] for v in values)
        system = statistics.median(v[1] for v in values)
        print(f"{name:{width}}  {total:6.1f} ({system:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
