#!/usr/bin/env python3
"""Benchmark the sidecar against the app direct, nginx and a naive aiohttp proxy.

Everything runs in one go, on 127.0.0.1 only:

- a backend: nginx (one worker, no access log) answering ``hello world``;
- the targets in front of it: nothing (direct), nginx as a reverse proxy,
  ``bench/naive_proxy.py`` (aiohttp + uvloop), and ``mesh sidecar`` with an
  empty inbound chain, with four pass-through plugins and with four ``stamp``
  plugins; with ``--mesh`` also sidecar A's outbound listener -> sidecar B's
  mesh listener -> backend;
- wrk, in its own process, against each target in turn: a warm-up pass, then
  the measured pass with ``--latency``.

For each target it prints requests/s, the ratio to the naive proxy, p50 and
p99 latency (from wrk's latency distribution) and the CPU time the proxy
process(es) used per request: utime+stime from /proc/<pid>/stat of the proxy
and its children, read before and after the measured pass, divided by the
requests wrk completed. "After" is once the proxy stops using CPU (5 s at
most): work a proxy finishes after its last response (a sidecar's batched
counting, its access log writer's lines) belongs to the pass, and would slow
the next one. Every other round runs the targets in reverse order. Every
process it starts is stopped by its pid in a ``finally`` block.

    /tmp/venv/bin/python bench/run.py                 # default targets, ~1 minute
    /tmp/venv/bin/python bench/run.py --mesh --markdown bench/results.md
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
SETTLE_MOST = 5.0  # seconds a proxy may take to finish a pass's work after its last response
SETTLE_LOOK = 0.3  # seconds between looks at its CPU time while it does
BODY = "hello world\n"
NAIVE = "naive aiohttp proxy"

# ---------------------------------------------------------------- processes


@contextlib.contextmanager
def scratch(prefix: str, *, keep: bool) -> Iterator[tuple[Path, Processes]]:
    """A temp folder and the processes started in it: every one stopped, the folder removed unless ``keep``."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    procs = Processes(tmp)
    try:
        yield tmp, procs
    finally:
        procs.stop_all()
        if keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


class Processes:
    """Every process the benchmark starts, so each can be stopped by its pid."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], *, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")
        try:
            # A session of its own: a Ctrl-C reaches only this script, which stops them in order.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=cwd, env=env, start_new_session=True)
        finally:
            log.close()
        self.started.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    @staticmethod
    def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
        if proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop_all(self) -> None:
        while self.started:
            _, proc = self.started.pop()
            try:
                self.stop(proc)
            except ProcessLookupError:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx's workers), from /proc/<pid>/task/*/children."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            todo.extend(int(c) for c in children)
    return found


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(utime, stime) in clock ticks of ``pids``, summed: /proc/<pid>/stat fields 14 and 15."""
    user = system = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; fields[0] is field 3
        user += int(fields[11])
        system += int(fields[12])
    return user, system


def tree_ticks(procs: list[subprocess.Popen[Any]]) -> dict[int, tuple[int, int]]:
    """(utime, stime) of each process in the trees of ``procs``: taken again after a pass, so a
    process that started during it (a sidecar's access log writer) is counted from its start."""
    found = {}
    for pid in (pid for proc in procs for pid in process_tree(proc.pid)):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            found[pid] = cpu_ticks([pid])
    return found


def ticks_since(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(utime, stime) used between two `tree_ticks`."""
    user = sum(u - before.get(pid, (0, 0))[0] for pid, (u, _) in after.items())
    system = sum(s - before.get(pid, (0, 0))[1] for pid, (_, s) in after.items())
    return user, system


def wait_idle(procs: list[subprocess.Popen[Any]], most: float = SETTLE_MOST) -> dict[int, tuple[int, int]]:
    """Wait (``most`` seconds at most) until the trees of ``procs`` stop using CPU, and return their
    `tree_ticks`. A proxy may finish a pass's work after its last response (a sidecar counts and
    logs requests in batches, and its writer makes the lines): that work is the pass's, and must
    not slow the next pass down."""
    if not procs:  # the backend direct: nothing to wait for
        return {}
    deadline = time.monotonic() + most
    last = tree_ticks(procs)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_LOOK)
        now = tree_ticks(procs)
        if sum(ticks_since(last, now)) <= 1:
            return now
        last = now
    return last


# ---------------------------------------------------------------- HTTP checks


def get(port: int, path: str = "/", headers: dict[str, str] | None = None,
        timeout: float = 2.0) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_ready(port: int, path: str, proc: subprocess.Popen[Any], name: str,
               procs: Processes, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode}:\n{procs.log_tail(name)}")
        try:
            status, _, _ = get(port, path, timeout=1.0)
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise SystemExit(f"{name} not ready on 127.0.0.1:{port}{path} after {timeout:g}s:\n{procs.log_tail(name)}")


# ---------------------------------------------------------------- servers


def nginx_config(tmp: Path, name: str, port: int, location: str, upstream: str = "") -> Path:
    prefix = tmp / name
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""\
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
{upstream}
    server {{
        listen 127.0.0.1:{port};
        location / {{
{location}
        }}
    }}
}}
""")
    return conf


def start_nginx(procs: Processes, tmp: Path, name: str, port: int, location: str,
                upstream: str = "") -> subprocess.Popen[bytes]:
    conf = nginx_config(tmp, name, port, location, upstream)
    prefix = conf.parent
    return procs.start(name, [shutil.which("nginx") or "nginx", "-p", str(prefix), "-c", str(conf),
                              "-e", str(prefix / "error.log")])


def start_backend(procs: Processes, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    """The backend nginx answering `BODY`, ready; and its port."""
    port = free_port()
    proc = start_nginx(procs, tmp, "backend", port,
                       f"            default_type text/plain;\n            return 200 {json.dumps(BODY)};")
    wait_ready(port, "/", proc, "backend", procs)
    return proc, port


def start_nginx_proxy(procs: Processes, tmp: Path, backend_port: int) -> tuple[subprocess.Popen[bytes], int]:
    """nginx as a reverse proxy to the backend (keep-alive upstream, HTTP/1.1), ready; and its port."""
    port = free_port()
    upstream = (f"    upstream backend {{ server 127.0.0.1:{backend_port}; keepalive 64; "
                f"keepalive_requests 10000000; }}")
    location = ("            proxy_pass http://backend;\n"
                "            proxy_http_version 1.1;\n"
                '            proxy_set_header Connection "";\n'
                "            proxy_buffering on;")
    proc = start_nginx(procs, tmp, "nginx-proxy", port, location, upstream)
    wait_ready(port, "/", proc, "nginx-proxy", procs)
    return proc, port


def mesh_toml(folder: Path) -> Path:
    noop = ", ".join(['{ use = "noop.py:Noop" }'] * 4)
    stamps = ", ".join(f'{{ use = "stamp", value = "{i}", header = "X-Stamp-{i}" }}' for i in range(1, 5))
    path = folder / "mesh.toml"
    path.write_text(f"""\
# Written by bench/run.py. `command` is never run: `mesh sidecar` only proxies.
[mesh]
name = "bench"
plugin_path = ["plugins"]

[services.empty]
command = "true"

[services.noop4]
command = "true"
plugins = [{noop}]

[services.stamp4]
command = "true"
plugins = [{stamps}]

[services.gateway]
command = "true"
plugins = [
  {{ use = "jwt", jwks = "keys/jwks.json", issuer = "https://id.example", audience = "shop", forward_claims = {{ sub = "x-user" }} }},
  {{ use = "ratelimit", limit = "100000000/second", key = "claim:sub" }},
  {{ use = "cache", ttl = "10s" }},
  {{ use = "router", rules = [ {{ path = "/*", set_headers = {{ x-routed = "1" }} }} ] }},
]

[services.a]
command = "true"

[services.b]
command = "true"

[[routes]]
from = "a"
to = "b"
""")
    shutil.copytree(HERE / "plugins", folder / "plugins", dirs_exist_ok=True)
    shutil.copytree(HERE.parent / "examples" / "gateway" / "keys", folder / "keys", dirs_exist_ok=True)
    return path


def gateway_token() -> str:
    """A long-lived token the gateway target's jwt plugin accepts (examples/gateway's test key)."""
    spec = importlib.util.spec_from_file_location("mint", HERE.parent / "examples" / "gateway" / "keys" / "mint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.mint("bench", ttl=86400)


def issue_certs(folder: Path) -> Path:
    """A throwaway mesh CA and certificates for services a and b (``folder/a``, ``folder/b``)."""
    try:
        from mesh.control.ca import CA
    except ImportError as exc:
        raise SystemExit(f"--mesh-tls needs mesh.control.ca: {exc}") from None
    ca = CA.load_or_create(folder, "bench")
    for service in ("a", "b"):
        ca.write_instance(folder / service, service, lifetime=3600)
    return folder


@dataclass
class Sidecar:
    proc: subprocess.Popen[bytes]
    public: int
    mesh: int
    outbound: int
    admin: int
    admin_headers: dict[str, str]


def start_sidecar(procs: Processes, python: str, config: Path, service: str, app_port: int,
                  registry: Path | None = None, log_level: str = "WARNING", tls: Path | None = None,
                  name: str | None = None, extra: list[str] | None = None) -> Sidecar:
    ports = {k: free_port() for k in ("public", "mesh", "outbound", "admin")}
    # The admin listener wants a token from a file, as `mesh up` gives each sidecar one.
    token, token_file = secrets.token_urlsafe(32), config.parent / f"admin-{service}.token"
    token_file.touch(mode=0o600)
    token_file.write_text(token)
    argv = [python, "-m", "mesh", "sidecar", "--config", str(config), "--service", service,
            "--app-port", str(app_port), "--public-port", str(ports["public"]),
            "--mesh-port", str(ports["mesh"]), "--outbound-port", str(ports["outbound"]),
            "--admin-port", str(ports["admin"]), "--admin-token-file", str(token_file)]
    if registry is not None:
        argv += ["--registry", str(registry)]
    if tls is not None:
        argv += ["--tls", str(tls)]
    argv += extra or []
    env = dict(os.environ, MESH_LOG_LEVEL=log_level)
    name = name or f"sidecar-{service}"
    proc = procs.start(name, argv, cwd=REPO, env=env)
    sidecar = Sidecar(proc, **ports, admin_headers={"Authorization": f"Bearer {token}"})
    wait_ready(sidecar.admin, "/readyz", proc, name, procs)
    return sidecar


# ---------------------------------------------------------------- wrk


@dataclass
class Target:
    name: str
    port: int
    proxies: list[subprocess.Popen[Any]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    expect_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    target: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    proxy_cpu_us: float | None
    proxy_sys_us: float | None
    proxy_busy: float | None  # CPU seconds of the proxy per second of the pass: 1.0 = one core
    backend_cpu_us: float
    wrk_cpu_us: float
    errors: int
    non_2xx: int
    rps_runs: list[float] = field(default_factory=list)  # each pass's, in the order of the rounds
    cpu_runs: list[float] = field(default_factory=list)  # each pass's proxy CPU µs/req, likewise


def combine(runs: list[Result]) -> Result:
    """One row from several passes: the median pass's req/s and latencies; CPU per request
    over all passes together (total CPU time / total requests)."""
    ranked = sorted(runs, key=lambda r: r.rps)
    median = ranked[(len(ranked) - 1) // 2]
    requests = sum(r.requests for r in runs)
    seconds = sum(r.seconds for r in runs)

    def per_request(attr: str) -> float | None:
        if getattr(runs[0], attr) is None:
            return None
        return sum(getattr(r, attr) * r.requests for r in runs) / max(requests, 1)

    busy = None
    if runs[0].proxy_busy is not None:
        busy = sum(r.proxy_busy * r.seconds for r in runs) / seconds  # type: ignore[operator]
    return Result(
        target=median.target, requests=requests, seconds=seconds, rps=median.rps,
        p50_ms=median.p50_ms, p99_ms=median.p99_ms,
        proxy_cpu_us=per_request("proxy_cpu_us"), proxy_sys_us=per_request("proxy_sys_us"),
        proxy_busy=busy, backend_cpu_us=per_request("backend_cpu_us") or 0.0,
        wrk_cpu_us=per_request("wrk_cpu_us") or 0.0,
        errors=sum(r.errors for r in runs), non_2xx=sum(r.non_2xx for r in runs),
        rps_runs=[r.rps for r in runs],
        cpu_runs=[r.proxy_cpu_us for r in runs if r.proxy_cpu_us is not None],
    )


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _latency(text: str, percent: str) -> float:
    m = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    if not m:
        raise ValueError(f"no {percent}% line in wrk output:\n{text}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text: str) -> dict[str, Any]:
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"cannot parse wrk output:\n{text}")
    errors = 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if socket_errors:
        errors = sum(int(g) for g in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "requests": int(m.group(1)),
        "seconds": float(m.group(2)) * _UNITS[m.group(3)] / 1e3,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),  # type: ignore[union-attr]
        "p50_ms": _latency(text, "50"),
        "p99_ms": _latency(text, "99"),
        "errors": errors,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }


def wrk(procs: Processes, args: argparse.Namespace, target: Target, duration: float) -> tuple[str, float]:
    """Run wrk against ``target``; its output and the CPU seconds it used."""
    argv = [args.wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{duration:g}s", "--latency",
            "--timeout", "5s"]
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(f"http://127.0.0.1:{target.port}/")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    procs.started.append(("wrk", proc))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        out, _ = proc.communicate(timeout=duration + 30)
    finally:
        Processes.stop(proc)
        procs.started.remove(("wrk", proc))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped in between
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed ({proc.returncode}): {out.decode(errors='replace')}")
    return out.decode(), (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def start_profilers(procs: Processes, args: argparse.Namespace, target: Target) -> list[subprocess.Popen[Any]]:
    """With --profile: py-spy on each Python proxy of ``target`` for the measured pass."""
    if not args.profile or not target.proxies or target.name.startswith("nginx"):
        return []
    spies = []
    for n, proc in enumerate(target.proxies):
        out = Path(args.profile) / f"{slug(target.name)}-{n}-{len(args.profiles)}.txt"
        argv = [args.py_spy, "record", "--pid", str(proc.pid), "--format", "raw", "--nolineno",
                "--rate", "250", "--nonblocking", "--duration", str(max(1, int(args.duration))),
                "--output", str(out)]
        spy = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
        procs.started.append(("py-spy", spy))
        spies.append(spy)
        args.profiles.append(out)
    return spies


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# Frames every sample passes through on its way to the event loop: no news in an inclusive list.
_ENTRY = re.compile(r"<frozen |^<module> |^_?main |^run |^_sidecar |^Runner\.run |^run_app |^serve ")


def summarize_profile(path: Path, top: int = 15) -> str:
    """Self and inclusive share of samples per function, from py-spy's collapsed stacks."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    package_counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        where = re.search(r"\(([^/)]+)", frames[-1])  # "func (aiohttp/web.py)" -> aiohttp
        package = where.group(1).removesuffix(".py") if where else "?"
        package_counts[package] = package_counts.get(package, 0) + n
        for frame in set(frames):
            if not _ENTRY.search(frame):
                incl_counts[frame] = incl_counts.get(frame, 0) + n
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples; self time by package: "
             + ", ".join(f"{name} {n / total:.0%}" for name, n in
                         sorted(package_counts.items(), key=lambda kv: -kv[1])[:8])]
    for title, counts in (("self", self_counts), ("inclusive", incl_counts)):
        lines.append(f"  top {top} by {title} time:")
        for frame, n in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {n / total:6.1%}  {frame}")
    return "\n".join(lines)


def check_target(target: Target) -> None:
    """One request by hand: the target answers 200 with the backend's body (and stamps)."""
    status, headers, body = get(target.port, "/", target.headers)
    if status != 200 or body.decode() != BODY:
        raise SystemExit(f"{target.name}: expected 200 {BODY!r}, got {status} {body[:200]!r}")
    for name, value in target.expect_headers.items():
        if headers.get(name.lower()) != value:
            raise SystemExit(f"{target.name}: expected header {name}: {value}, got {headers}")


def measure(procs: Processes, args: argparse.Namespace, target: Target,
            backend: subprocess.Popen[Any], warm_up: bool = True) -> Result:
    check_target(target)
    if warm_up and args.warmup > 0:
        wrk(procs, args, target, args.warmup)
    backend_pids = process_tree(backend.pid)
    proxy_before, backend_before = wait_idle(target.proxies), cpu_ticks(backend_pids)
    spies = start_profilers(procs, args, target)
    try:
        text, wrk_cpu = wrk(procs, args, target, args.duration)
    finally:
        for spy in spies:
            spy.wait(args.duration + 30)  # py-spy stops after --duration and writes its file
            procs.started.remove(("py-spy", spy))
    backend_after = cpu_ticks(backend_pids)
    proxy_user, proxy_sys = ticks_since(proxy_before, wait_idle(target.proxies))
    stats = parse_wrk(text)
    n = max(stats["requests"], 1)
    per_request = 1e6 / CLK_TCK / n
    return Result(
        target=target.name,
        proxy_cpu_us=(proxy_user + proxy_sys) * per_request if target.proxies else None,
        proxy_sys_us=proxy_sys * per_request if target.proxies else None,
        proxy_busy=(proxy_user + proxy_sys) / CLK_TCK / stats["seconds"] if target.proxies else None,
        backend_cpu_us=(sum(backend_after) - sum(backend_before)) * per_request,
        wrk_cpu_us=wrk_cpu * 1e6 / n,
        **stats,
    )


# ---------------------------------------------------------------- report


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(results: list[Result]) -> list[list[str]]:
    naive = next((r for r in results if r.target == NAIVE), None)
    rows = [["target", "req/s", "vs naive", "p50 ms", "p99 ms", "proxy CPU µs/req (sys)",
             "proxy cores busy", "vs naive by CPU", "backend CPU µs/req"]]
    for r in results:
        ratio = f"{r.rps / naive.rps:.2f}x" if naive else "—"
        by_cpu = "—"
        if naive and naive.proxy_cpu_us and r.proxy_cpu_us:
            by_cpu = f"{naive.proxy_cpu_us / r.proxy_cpu_us:.2f}x"
        cpu = "—" if r.proxy_cpu_us is None else f"{r.proxy_cpu_us:.0f} ({r.proxy_sys_us:.0f})"
        note = ""
        if r.errors or r.non_2xx:
            note = f" ({r.errors} socket errors, {r.non_2xx} non-2xx)"
        rows.append([r.target + note, f"{r.rps:,.0f}", ratio, f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
                     cpu, _fmt(r.proxy_busy, ".2f"), by_cpu, f"{r.backend_cpu_us:.0f}"])
    return rows


def plain(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |",
             "| " + " | ".join(["---"] + ["---:"] * (len(rows[0]) - 1)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def checks(results: list[Result]) -> list[str]:
    """The targets: sidecar >= 1.5x naive; each trivial plugin under 3% of throughput."""
    by = {r.target: r for r in results}
    out = []
    naive, empty = by.get(NAIVE), by.get("sidecar, empty chain")
    if naive and empty:
        ratio = empty.rps / naive.rps
        out.append(f"sidecar (empty chain) / naive proxy: {ratio:.2f}x req/s "
                   f"(target >= 1.5x: {'met' if ratio >= 1.5 else 'MISSED'})")
        if naive.proxy_cpu_us and empty.proxy_cpu_us:
            by_cpu = naive.proxy_cpu_us / empty.proxy_cpu_us
            out.append(f"by CPU: naive CPU/req / sidecar CPU/req = {by_cpu:.2f}x, the req/s ratio when "
                       f"each has a core to itself (target >= 1.5x: {'met' if by_cpu >= 1.5 else 'MISSED'})")
    # A one-process Python proxy under this load should keep its one core busy; if it did not,
    # other processes on the machine took the CPU and its req/s says little about the proxy.
    starved = [f"{r.target} ({r.proxy_busy:.0%})" for r in results
               if (r.target == NAIVE or r.target.startswith("sidecar,"))
               and r.proxy_busy is not None and r.proxy_busy < 0.9]
    if starved:
        out.append("got less than 90% of a core, so their req/s was set by the rest of the machine, "
                   "not by the proxy (compare CPU µs/req instead): " + "; ".join(starved))
    for name in ("sidecar, 4 noop plugins", "sidecar, 4 stamp plugins"):
        chained = by.get(name)
        if empty and chained:
            cost = (1 - chained.rps / empty.rps) / 4
            cpu = ""
            if chained.proxy_cpu_us and empty.proxy_cpu_us:
                extra = (chained.proxy_cpu_us - empty.proxy_cpu_us) / 4
                cpu = (f"; by CPU: {extra:+.1f} µs per plugin = "
                       f"{extra / (empty.proxy_cpu_us + extra):+.1%} of throughput at saturation")
            out.append(f"{name}: {cost:+.1%} req/s per plugin "
                       f"(target < 3%: {'met' if cost < 0.03 else 'MISSED'}){cpu}")
    return out


# ---------------------------------------------------------------- main


TARGETS = ("direct", "nginx", "naive", "sidecar-bare", "sidecar", "sidecar-logged", "noop4", "stamp4", "gateway",
           "mesh", "mesh-tls")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark the mesh sidecar against direct, nginx and a "
                                            "naive aiohttp proxy (all on 127.0.0.1).")
    p.add_argument("-d", "--duration", type=float, default=3.0,
                   help="seconds of one measured pass (default 3; --rounds passes per target)")
    p.add_argument("-w", "--warmup", type=float, default=2.0,
                   help="seconds of warm-up per target, before its first pass (default 2)")
    p.add_argument("-t", "--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("-c", "--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measured passes per target, round-robin over the targets, every other round "
                        "reversed (default 3): "
                        "req/s and latency of each target's median pass, CPU/req over all of them")
    p.add_argument("--mesh", action="store_true",
                   help="add the sidecar-to-sidecar scenario (app -> A's outbound listener -> B's mesh "
                        "listener -> backend), plain HTTP between the sidecars")
    p.add_argument("--mesh-tls", action="store_true",
                   help="add the same scenario with mutual TLS between the sidecars (a throwaway CA)")
    p.add_argument("--targets", default=None,
                   help=f"comma-separated subset of {','.join(TARGETS)} (default: all but mesh and "
                        f"mesh-tls, plus those that --mesh and --mesh-tls ask for)")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown to FILE ('-': stdout)")
    p.add_argument("--json", metavar="FILE", help="also write the raw results as JSON to FILE")
    p.add_argument("--python", default=sys.executable, help="Python that runs mesh and the naive proxy")
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    p.add_argument("--log-level", default="WARNING", help="MESH_LOG_LEVEL of the sidecars (default WARNING)")
    p.add_argument("--profile", metavar="DIR",
                   help="run py-spy on each Python proxy during its measured pass; write collapsed "
                        "stacks to DIR and print the top functions (perturbs the numbers a little)")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"))
    p.add_argument("--keep", action="store_true", help="keep the temp folder (configs, logs)")
    args = p.parse_args(argv)
    args.profiles = []
    if args.profile:
        if not Path(args.py_spy).exists() and not shutil.which(args.py_spy):
            p.error("--profile needs py-spy (pip install py-spy)")
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    if args.targets:
        chosen = {t.strip() for t in args.targets.split(",") if t.strip()}
        unknown = chosen - set(TARGETS)
        if unknown:
            p.error(f"--targets: unknown {', '.join(sorted(unknown))} (known: {', '.join(TARGETS)})")
    else:
        chosen = {t for t in TARGETS if not t.startswith("mesh")}
    chosen |= {t for t, flag in (("mesh", args.mesh), ("mesh-tls", args.mesh_tls)) if flag}
    args.targets = [t for t in TARGETS if t in chosen]
    return args


def run(args: argparse.Namespace, tmp: Path, procs: Processes) -> list[Result]:
    want = set(args.targets)
    backend, backend_port = start_backend(procs, tmp)
    targets: list[Target] = []
    if "direct" in want:
        targets.append(Target("direct (no proxy)", backend_port))
    if "nginx" in want:
        proc, port = start_nginx_proxy(procs, tmp, backend_port)
        targets.append(Target("nginx reverse proxy", port, [proc]))
    if "naive" in want:
        port = free_port()
        proc = procs.start("naive-proxy", [args.python, str(HERE / "naive_proxy.py"), "--port", str(port),
                                           "--upstream", f"127.0.0.1:{backend_port}"])
        wait_ready(port, "/", proc, "naive-proxy", procs)
        targets.append(Target(NAIVE, port, [proc]))
    # The empty chain three ways: recording nothing per request, with metrics (the default), and with metrics
    # and an access log file (what `mesh up` runs): what observing costs, in the same run.
    extra_args = {"sidecar-bare": ["--no-metrics"],
                  "sidecar-logged": ["--access-log", str(tmp / "access.jsonl")]}
    sidecars = {"sidecar-bare": ("empty", "sidecar, empty chain, no metrics", 0, {}),
                "sidecar": ("empty", "sidecar, empty chain", 0, {}),
                "sidecar-logged": ("empty", "sidecar, empty chain, access log", 0, {}),
                "noop4": ("noop4", "sidecar, 4 noop plugins", 4, {}),
                "stamp4": ("stamp4", "sidecar, 4 stamp plugins", 4,
                           {f"X-Stamp-{i}": str(i) for i in range(1, 5)}),
                "gateway": ("gateway", "sidecar, gateway chain (jwt, ratelimit, cache, router)", 4,
                            {"X-Cache": "MISS"})}
    config = mesh_toml(tmp)
    for key, (service, label, plugins, expect) in sidecars.items():
        if key in want:
            sc = start_sidecar(procs, args.python, config, service, backend_port, log_level=args.log_level,
                               name=f"sidecar-{key}", extra=extra_args.get(key, []))
            _, _, dump = get(sc.admin, "/config", sc.admin_headers)
            # The service's own plugins: /config lists mesh's built-in layers too, as "mesh.defaults (...)".
            chain = [name for name in json.loads(dump)["plugins"] if not name.startswith("mesh.defaults")]
            if len(chain) != plugins:
                raise SystemExit(f"{label}: expected {plugins} plugins, /config says {chain}")
            headers = {"Authorization": f"Bearer {gateway_token()}"} if key == "gateway" else {}
            targets.append(Target(label, sc.public, [sc.proc], headers=headers, expect_headers=expect))
    for key in ("mesh", "mesh-tls"):
        if key in want:
            certs = issue_certs(tmp / "certs") if key == "mesh-tls" else None
            b = start_sidecar(procs, args.python, config, "b", backend_port, log_level=args.log_level,
                              tls=certs and certs / "b", name=f"{key}-b")
            registry = tmp / f"{key}-registry.json"
            registry.write_text(json.dumps({"services": {"b": [f"127.0.0.1:{b.mesh}"]}}))
            a = start_sidecar(procs, args.python, config, "a", backend_port, registry, log_level=args.log_level,
                              tls=certs and certs / "a", name=f"{key}-a")
            how = "mutual TLS" if certs else "plain HTTP"
            targets.append(Target(f"sidecar A -> sidecar B ({how})", a.outbound, [a.proc, b.proc],
                                  headers={"Host": "b"}))

    runs: dict[str, list[Result]] = {t.name: [] for t in targets}
    total = len(targets) * args.rounds
    for round_ in range(args.rounds):
        # Every other round runs the targets in the reverse order: a machine that speeds up or slows
        # down during the run favours no target over its neighbours.
        for i, target in enumerate(targets if round_ % 2 == 0 else targets[::-1]):
            done = round_ * len(targets) + i + 1
            print(f"[{done}/{total}] {target.name} ...", file=sys.stderr, flush=True)
            runs[target.name].append(measure(procs, args, target, backend, warm_up=round_ == 0))
    return [combine(runs[target.name]) for target in targets]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which(args.wrk):
        raise SystemExit("wrk not found (apt-get install wrk)")
    if not shutil.which("nginx"):
        raise SystemExit("nginx not found (apt-get install nginx-light)")
    # A SIGTERM unwinds like Ctrl-C, so the finally below still stops everything.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    with scratch("mesh-bench-", keep=args.keep) as (tmp, procs):
        results = run(args, tmp, procs)
    elapsed = time.monotonic() - started

    rows = table(results)
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    setup = (f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency, "
             f"{args.rounds} pass(es) per target round-robin (every other round reversed) after a {args.warmup:g}s warm-up, "
             f"{os.cpu_count()} CPUs, "
             f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, {elapsed:.0f}s in all")
    print(plain(rows))
    print()
    for line in checks(results):
        print(line)
    print(setup)
    if args.profile:
        for path in args.profiles:
            print()
            print(summarize_profile(path))
    if args.markdown:
        text = "\n".join([f"`{command.strip()}`: {setup}.", "", markdown(rows), "",
                          *[f"- {line}" for line in checks(results)], ""])
        if args.markdown == "-":
            print(text)
        else:
            Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": setup, "results": [asdict(r) for r in results]},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
