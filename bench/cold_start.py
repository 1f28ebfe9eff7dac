#!/usr/bin/env python3
"""Cold start and wake of a keyed service: the first request of a key, through `mesh up -d`, with the split.

A tiny stdlib app (``http.server``, answering ``hello``) is made a keyed
service (``instances = { key = "header:X-Key", sleep_after = "1s" }``) in a
temporary folder and run with ``mesh up -d`` on the runtime asked for (on
docker its image is built first with ``mesh build``, not timed). Then, for
``--keys`` new keys one after another:

- **cold**: the key's first ``GET /``, timed from the moment it is sent to
  the response head: the front plans the key's instance, issues its
  certificate, starts its sidecar and app, waits for both to be ready and
  forwards;
- **warm**: the same key's second request;
- the key is left idle until its instance sleeps (``mesh ps``'s state
  ``sleeping``, read from state.json), then **wake**: one more request,
  timed the same way, and idle again until it sleeps, so no stop overlaps the
  next start.

Each cold and wake request is split by what the machine recorded of it, as
offsets from the moment it was sent:

- **sidecar up**: the sidecar's process (its container on docker) started:
  ``/proc/<pid>/stat`` (10 ms ticks) or the container's ``State.StartedAt``;
  before it the front, the plan, the certificate, fork/exec or
  ``docker create``; 0 when the key took the process runtime's spare
  sidecar, which started before the request;
- **sidecar start**: from there until the app's process (container) started:
  the controller starts the app once the sidecar answers ``/readyz``;
- **app start**: until the app printed that it listens (``time.time()``,
  read from the mesh's output log): interpreter and imports;
- **readiness wait**: until the request reached the sidecar (its access log
  line's time, in ms): the controller's health check seeing the app, then
  the front forwarding;
- **first byte**: until the response head reached the client: sidecar, app
  and back.

mesh runs with its bytecode cached, as an installed mesh does:
`cached_bytecode` drops ``PYTHONDONTWRITEBYTECODE`` and keeps the ``.pyc`` files
in a folder of the temp dir (``PYTHONPYCACHEPREFIX``), so no start compiles
mesh's source (on the machine this was written on that adds ~0.3 s to each).
Prints the median, min and max of each, and with ``--json FILE`` every
request's figures. ``mesh down`` stops the mesh (by the state it recorded)
whatever happens, also on SIGTERM.

    python bench/cold_start.py                        # process runtime, 20 keys, about 2 minutes
    python bench/cold_start.py --runtime docker       # about 3 minutes
    python bench/cold_start.py --keys 5 --no-wake --json /tmp/cold.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
CLK_TCK = os.sysconf("SC_CLK_TCK")
NAME = "bench-cold"
PHASES = ("sidecar up", "sidecar start", "app start", "readiness wait", "first byte")

APP = textwrap.dedent("""\
    import os
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


    class Hello(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = b"hello\\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass


    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8000"))), Hello)
    print(f"listening {time.time():.6f}", flush=True)
    server.serve_forever()
""")

DOCKERFILE = textwrap.dedent("""\
    FROM mesh/base
    COPY app.py /app/
    USER 65534:65534
    CMD ["python3", "/app/app.py"]
""")


def cached_bytecode() -> None:
    """Python compiles each module once, into a cache outside the source tree, and then loads it from there."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "mesh-bench-pycache"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_mesh(folder: Path, runtime: str, port: int) -> None:
    (folder / "app").mkdir(parents=True)
    (folder / "app" / "app.py").write_text(APP)
    (folder / "app" / "Dockerfile").write_text(DOCKERFILE)
    run = 'build = "app"\nport = 8000' if runtime == "docker" else 'command = "python app/app.py"'
    (folder / "mesh.toml").write_text(
        f'# Written by bench/cold_start.py.\n[mesh]\nname = "{NAME}"\n\n[services.tiny]\n{run}\n'
        f'expose = {port}\nhealth = "/healthz"\n'
        f'instances = {{ key = "header:X-Key", sleep_after = "1s", max = 1000, start_timeout = "60s" }}\n')


def request(port: int, key: str) -> tuple[float, float]:
    """(wall time sent, seconds until the response head) of one GET / of ``key``."""
    sent = time.time()
    began = time.perf_counter()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"X-Key": key})
    with OPENER.open(req, timeout=120) as response:
        head = time.perf_counter() - began
        body = response.read()
    if response.status != 200 or body != b"hello\n":
        raise SystemExit(f"key {key}: {response.status} {body[:200]!r}")
    return sent, head


class Mesh:
    """The running mesh's files: state.json, the output log, the sidecars' access logs."""

    def __init__(self, folder: Path, runtime: str) -> None:
        self.state_dir = folder / ".mesh" / NAME
        self.runtime = runtime

    def instance(self, key: str) -> dict[str, Any] | None:
        try:
            state = json.loads((self.state_dir / "state.json").read_text())
        except (OSError, ValueError):  # being replaced: read again
            return None
        return next((i for i in state.get("instances", []) if i.get("key") == key), None)

    def wait_state(self, key: str, wanted: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.instance(key)
            if found is not None and found.get("state") == wanted:
                return found
            time.sleep(0.05)
        raise SystemExit(f"key {key}: not {wanted} after {timeout:g}s: {self.instance(key)}")

    def started(self, instance: dict[str, Any], uptime_at_send: float, sent: float) -> dict[str, float]:
        """Role -> seconds after ``sent`` its process (container) started."""
        if self.runtime == "process":
            found = {}
            for role, pid in instance.get("pids", {}).items():
                stat = Path(f"/proc/{pid}/stat").read_text()
                ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime
                found[role] = ticks / CLK_TCK - uptime_at_send
            return found
        ids = {role: c["id"] for role, c in instance.get("containers", {}).items() if c.get("id")}
        if not ids:
            return {}
        out = subprocess.run(["docker", "inspect", "-f", "{{.State.StartedAt}}", *ids.values()],
                             capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            return {}
        return {role: rfc3339(line) - sent for role, line in zip(ids, out.stdout.split(), strict=True)}

    def listening(self, sent: float, until: float, timeout: float = 5.0) -> float | None:
        """Seconds after ``sent`` the app printed ``listening`` (the latest such line in [sent, until])."""
        pattern = re.compile(r"\| listening (\d+\.\d+)\s*$", re.M)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = (self.state_dir / "up.log").read_text(errors="replace")
            times = [float(t) for t in pattern.findall(text) if sent <= float(t) <= until]
            if times:
                return max(times) - sent
            time.sleep(0.1)
        return None

    def arrived(self, label: str, sent: float, timeout: float = 5.0) -> float | None:
        """Seconds after ``sent`` the request reached the sidecar: the first access log line after it."""
        path = self.state_dir / "logs" / f"{label}.jsonl"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:  # a line being written
                    continue
                when = rfc3339(record["time"])
                if when >= sent - 0.001 and record.get("direction") == "inbound":
                    return when - sent
            time.sleep(0.1)
        return None


def rfc3339(text: str) -> float:
    """Seconds since the epoch of ``2026-12-02T17:30:01.123456789Z`` (digits past µs dropped)."""
    text = text.strip().replace("Z", "+00:00")
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    return datetime.fromisoformat(text).timestamp()


def uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def timed_start(mesh: Mesh, port: int, key: str) -> dict[str, Any]:
    """One request that starts ``key``'s instance: its total and its split (None where unknown)."""
    at = uptime()
    sent, total = request(port, key)
    instance = mesh.wait_state(key, "running")
    started = mesh.started(instance, at, sent)
    listening = mesh.listening(sent, sent + total)
    arrived = mesh.arrived(instance["label"], sent)
    sidecar = started.get("sidecar")
    if sidecar is not None and sidecar < 0:
        sidecar = 0.0  # a spare sidecar, started before the request: its part begins with the request
    events = [sidecar, started.get("app"), listening, arrived, total]
    phases = [events[0]] + [b - a if a is not None and b is not None else None
                            for a, b in zip(events, events[1:], strict=False)]
    return {"key": key, "total": total, "events": dict(zip(("sidecar", "app", "listening", "arrived",
                                                            "head"), events, strict=True)),
            "phases": dict(zip(PHASES, phases, strict=True))}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max in ms of the totals and of each phase (over the requests that have it)."""

    def stats(values: list[float]) -> dict[str, float] | None:
        if not values:
            return None
        ms = [v * 1000 for v in values]
        return {"median": statistics.median(ms), "min": min(ms), "max": max(ms), "n": len(ms)}

    return {"total": stats([r["total"] for r in rows]),
            "phases": {p: stats([r["phases"][p] for r in rows if r["phases"][p] is not None]) for p in PHASES}}


def report(runtime: str, keys: int, results: dict[str, Any]) -> str:
    lines = [f"runtime {runtime}, {keys} new keys (tiny stdlib app, GET /), ms:"]
    for kind in ("cold", "warm", "wake"):
        found = results["summary"].get(kind)
        if not found:
            continue
        total = found["total"]
        lines.append(f"  {kind:<5} median {total['median']:7.1f}   min {total['min']:7.1f}   "
                     f"max {total['max']:7.1f}")
        if kind != "warm":
            parts = [f"{p} {s['median']:.0f}" if s else f"{p} ?" for p, s in found["phases"].items()]
            lines.append("        split (medians): " + ", ".join(parts))
    return "\n".join(lines)


def mesh_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mesh", *args]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="process", choices=["process", "docker"])
    parser.add_argument("--keys", type=int, default=20, help="new keys, one after another (default 20)")
    parser.add_argument("--no-wake", action="store_true", help="do not time the wake of a sleeping key")
    parser.add_argument("--json", metavar="FILE", help="also write every request's figures as JSON")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally below
    cached_bytecode()
    work = Path(tempfile.mkdtemp(prefix="mesh-cold-"))
    folder = work / "tiny"
    port = free_port()
    write_mesh(folder, args.runtime, port)
    rows: dict[str, list[dict[str, Any]]] = {"cold": [], "warm": [], "wake": []}
    try:
        if args.runtime == "docker":
            built = subprocess.run(mesh_command("build", str(folder)), capture_output=True, text=True,
                                   timeout=900)
            if built.returncode != 0:
                print(built.stdout, built.stderr, file=sys.stderr)
                return 1
        up = subprocess.run(mesh_command("up", "-d", str(folder), "--runtime", args.runtime),
                            capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            print(up.stdout, up.stderr, file=sys.stderr)
            return 1
        mesh = Mesh(folder, args.runtime)
        warm_up = f"warm-up-{time.time_ns()}"  # the first start also warms the OS's caches
        request(port, warm_up)
        mesh.wait_state(warm_up, "sleeping")
        for i in range(args.keys):
            key = f"bench-{i}-{time.time_ns()}"
            rows["cold"].append(timed_start(mesh, port, key))
            _, warm = request(port, key)
            rows["warm"].append({"key": key, "total": warm, "phases": dict.fromkeys(PHASES)})
            mesh.wait_state(key, "sleeping")
            if not args.no_wake:
                rows["wake"].append(timed_start(mesh, port, key))
                mesh.wait_state(key, "sleeping")
            print(f"[{i + 1}/{args.keys}] cold {rows['cold'][-1]['total'] * 1000:.0f} ms"
                  + (f", wake {rows['wake'][-1]['total'] * 1000:.0f} ms" if rows["wake"] else ""),
                  file=sys.stderr, flush=True)
    finally:
        subprocess.run(mesh_command("down", str(folder)), capture_output=True, timeout=300)
        shutil.rmtree(work, ignore_errors=True)
    results = {"runtime": args.runtime, "keys": args.keys,
               "summary": {kind: summary(found) for kind, found in rows.items() if found}, "requests": rows}
    print(report(args.runtime, args.keys, results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
