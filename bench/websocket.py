#!/usr/bin/env python3
"""WebSocket throughput: 1 MiB messages echoed, direct to the app and through a sidecar, in one run.

An aiohttp echo server is the app; ``mesh sidecar`` fronts it on a public
listener; a client in its own process (aiohttp) opens one WebSocket and
sends ``--messages`` binary messages of ``--size`` bytes one after another,
each echoed back before the next goes, first to the app direct, then through
the sidecar, for ``--rounds`` rounds (alternating). It prints MiB/s each way
summed (sent plus echoed) and the sidecar's ratio to direct::

    python bench/websocket.py                       # 1 MiB x 200, 3 rounds, ~1 minute
    python bench/websocket.py --size 65536 --messages 2000
    python bench/websocket.py --messages 50 --json /tmp/ws.json   # also the figures as JSON

Everything listens on 127.0.0.1; every process is stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import REPO, Processes, free_port, start_sidecar, wait_ready  # noqa: E402

ECHO = textwrap.dedent("""
    import sys
    from aiohttp import web

    async def echo(request):
        if request.path == "/healthz":
            return web.Response(text="ok")
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for message in ws:
            await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
""")

CLIENT = textwrap.dedent("""
    import asyncio, json, sys, time
    import aiohttp

    async def main(port, size, count):
        payload = b"m" * size
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"http://127.0.0.1:{port}/ws", max_msg_size=0) as ws:
                began = time.perf_counter()
                for _ in range(count):
                    await ws.send_bytes(payload)
                    message = await asyncio.wait_for(ws.receive(), 60)
                    assert len(message.data) == size, message
                elapsed = time.perf_counter() - began
        print(json.dumps({"seconds": elapsed}))

    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
""")


def one_pass(python: str, port: int, size: int, count: int) -> float:
    """MiB/s (both ways) of one client connection sending ``count`` messages of ``size`` bytes."""
    done = subprocess.run([python, "-c", CLIENT, str(port), str(size), str(count)], capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"the client failed:\n{done.stderr}")
    seconds = json.loads(done.stdout)["seconds"]
    return 2 * size * count / seconds / (1 << 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes per message (default: 1 MiB)")
    parser.add_argument("--messages", type=int, default=200, help="messages per pass (default: 200)")
    parser.add_argument("--rounds", type=int, default=3, help="passes per target (default: 3)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--json", metavar="FILE", help="also write the passes, the best of each and the ratio")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally below
    with tempfile.TemporaryDirectory(prefix="mesh-bench-ws-") as tmp:
        folder = Path(tmp)
        procs = Processes(folder)
        try:
            app = free_port()
            echo = procs.start("echo", [args.python, "-c", ECHO, str(app)], cwd=REPO)
            wait_ready(app, "/healthz", echo, "echo", procs)
            config = folder / "mesh.toml"
            config.write_text(f'[mesh]\nname = "bench-ws"\n[services.app]\ncommand = "x"\nport = {app}\n'
                              f'stream_idle_timeout = "60s"\nrequest_buffer = "0"\n')
            sidecar = start_sidecar(procs, args.python, config, "app", app)
            rates: dict[str, list[float]] = {"direct": [], "sidecar": []}
            for _ in range(args.rounds):
                rates["direct"].append(one_pass(args.python, app, args.size, args.messages))
                rates["sidecar"].append(one_pass(args.python, sidecar.public, args.size, args.messages))
        finally:
            procs.stop_all()
    best = {name: max(values) for name, values in rates.items()}
    print(f"{args.messages} messages of {args.size} bytes echoed, best of {args.rounds} passes each")
    for name, values in rates.items():
        print(f"{name:>8}: {best[name]:8.1f} MiB/s  (passes: {', '.join(f'{v:.1f}' for v in values)})")
    ratio = best["sidecar"] / best["direct"]
    print(f"   ratio: {ratio:.2f}x direct")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "messages": args.messages, "rounds": args.rounds,
                                               "mib_per_s": rates, "best": best, "ratio": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
