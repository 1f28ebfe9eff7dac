#!/usr/bin/env python3
"""Count the CPU instructions one request costs the sidecar, with valgrind's callgrind.

Requests per second on a shared machine drift by several percent from one
minute to the next; instructions executed do not. This script runs
``mesh sidecar`` (empty inbound chain, public listener) under
``valgrind --tool=callgrind`` twice, serving ``--warm`` requests and then
``--warm + --requests`` requests over one keep-alive connection, and divides
the difference of the two totals by ``--requests``: start-up, imports and
shutdown cancel out, what is left is the cost of one request.

``--against REV`` measures a second tree, REV checked out into a temporary
git worktree, in the same run, and prints the ratio::

    python bench/instructions.py                      # this checkout, ~3 minutes
    python bench/instructions.py --against HEAD~1     # and the commit before, ~6 minutes
    python bench/instructions.py --access-log --bare  # what metrics and the access log cost

Needs ``valgrind`` (Debian: ``apt-get install valgrind``). Everything runs on
127.0.0.1; every process it starts is stopped by its pid, and the worktree
is removed, in ``finally`` blocks.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

BACKEND = """
import asyncio, sys
ANSWER = b"HTTP/1.1 200 OK\\r\\nContent-Length: 12\\r\\nContent-Type: text/plain\\r\\n\\r\\nhello world\\n"
async def handle(reader, writer):
    try:
        while True:
            await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(ANSWER)
    except Exception:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
"""

REQUEST = b"GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def ready(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the sidecar's admin listener on {port} never became ready")


def send(port: int, count: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        for _ in range(count):
            sock.sendall(REQUEST)
            seen = b""
            while not seen.endswith(b"hello world\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise SystemExit("the sidecar closed the connection")
                seen += chunk


def total(tree: Path, requests: int, work: Path, python: str, extra: Sequence[str] = ()) -> int:
    """Instructions callgrind counted in a sidecar of ``tree`` that served ``requests`` requests."""
    app, public, admin = free_port(), free_port(), free_port()
    config = work / "mesh.toml"
    config.write_text(f'[mesh]\nname = "bench"\n[services.a]\ncommand = "x"\nport = {app}\n')
    out = work / f"callgrind.{requests}.out"
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0", "MESH_LOG_LEVEL": "WARNING"}
    backend = subprocess.Popen([python, "-c", BACKEND, str(app)], stdin=subprocess.DEVNULL)
    log = open(work / "sidecar.log", "wb")
    sidecar = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python, "-m", "mesh", "sidecar",
         "--config", str(config), "--service", "a", "--app-port", str(app), "--public-port", str(public),
         "--mesh-port", str(free_port()), "--outbound-port", str(free_port()), "--admin-port", str(admin),
         *[arg.replace("{work}", str(work)) for arg in extra]],
        cwd=tree, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        ready(admin, time.monotonic() + 300)
        send(public, requests)
    finally:
        stop(sidecar, grace=120)
        stop(backend)
        log.close()
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise SystemExit(f"no summary in {out}; see {work / 'sidecar.log'}")


def per_request(tree: Path, args: argparse.Namespace, extra: Sequence[str] = ()) -> float:
    with tempfile.TemporaryDirectory(prefix="mesh-instructions-") as tmp:
        work = Path(tmp)
        base = total(tree, args.warm, work, args.python, extra)
        more = total(tree, args.warm + args.requests, work, args.python, extra)
    return (more - base) / args.requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="requests measured (default: %(default)s)")
    parser.add_argument("--warm", type=int, default=200, help="requests of the baseline run (default: %(default)s)")
    parser.add_argument("--against", metavar="REV", help="also measure this git revision, in a temporary worktree")
    parser.add_argument("--python", default=sys.executable, help="the interpreter with mesh's dependencies")
    parser.add_argument("--access-log", action="store_true",
                        help="also measure this checkout with an access log file (mesh sidecar --access-log)")
    parser.add_argument("--bare", action="store_true",
                        help="also measure this checkout observing nothing (--no-metrics, no access log)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    rows = [("this checkout", per_request(REPO, args))]
    if args.access_log:
        rows.append(("+ access log", per_request(REPO, args, ["--access-log", "{work}/access.jsonl"])))
    if args.bare:
        rows.append(("observing nothing", per_request(REPO, args, ["--no-metrics"])))
    if args.against:
        worktree = Path(tempfile.mkdtemp(prefix="mesh-against-"))
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.against],
                       check=True, capture_output=True)
        try:
            rows.append((args.against, per_request(worktree, args)))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
    for name, count in rows:
        print(f"{name:>20}: {count / 1000:8.1f}k instructions per request")
    if args.bare:
        bare = rows[-1][1] if not args.against else rows[-2][1]
        for name, count in rows[:1 + bool(args.access_log)]:
            print(f"{name:>20}: {count / bare - 1:+8.1%} instructions over observing nothing")
    if args.against:
        for name, count in rows[:-1]:
            print(f"{'ratio':>20}: {count / rows[-1][1]:8.3f} ({name} / {args.against})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
