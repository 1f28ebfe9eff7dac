#!/usr/bin/env python3
"""Issue 13's performance table, every row measured in one run, against its target.

One command runs, one after another, on 127.0.0.1 only:

1. ``bench/run.py --targets nginx,sidecar,gateway,mesh,mesh-tls --json ...``
   (wrk, in a process of its own): the gateway chain's req/s as a share of
   nginx's and its CPU per request; the empty chain's CPU per request as a
   multiple of nginx's; the extra CPU per request of mutual TLS between two
   sidecars over plain HTTP between the same two;
   then ``bench/run.py --targets sidecar-bare,sidecar-logged --rounds 12 -d 2``:
   what observing costs (metrics and the access log on, as `mesh up` runs a
   sidecar, against both off), from passes of the two side by side, in
   alternating order, so that each round's ratio is taken a second apart;
2. a smooth 1,000 req/s over 10 connections (10 ``hey -c 1 -q 100``, each
   in a process of its own, started 1 ms apart) to the app direct, through
   nginx and through a sidecar (empty chain), round-robin: the proxy's cores
   (its CPU time per second, from /proc) and its p50 over direct's;
3. the resident memory (VmRSS) of the sidecars of examples/hello run with
   ``mesh up -d``, idle, a few seconds after start;
4. ``bench/cold_start.py`` on the process runtime and on docker: the first
   request of a new key and the wake of a sleeping key, medians of ``--keys``,
   with the split;
5. ``bench/websocket.py``: 1 MiB WebSocket messages echoed through a sidecar
   as a share of direct.

It prints the table (what, measured, target, met?) with the command, date
and machine, and with ``--markdown FILE`` writes it; ``--json FILE`` keeps
every figure. Everything runs with Python's bytecode cached
(`cold_start.cached_bytecode`). Every process it starts is stopped by its pid in a ``finally``
block (the scripts it runs do the same with theirs, on SIGTERM too; the meshes
are stopped with ``mesh down``, which removes what each recorded).

    python bench/table.py                                 # about 6 minutes
    python bench/table.py --markdown /tmp/table.md --json /tmp/table.json
    python bench/table.py --quick                         # a smoke run, about 3 minutes
    python bench/table.py --profile /tmp/prof             # + py-spy on the wrk rows' sidecars
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cold_start import cached_bytecode  # noqa: E402
from run import (  # noqa: E402
    CLK_TCK,
    REPO,
    Processes,
    cpu_ticks,
    free_port,
    mesh_toml,
    process_tree,
    scratch,
    start_backend,
    start_nginx_proxy,
    start_sidecar,
)

HERE = Path(__file__).resolve().parent
WRK_TARGETS = "nginx,sidecar,gateway,mesh,mesh-tls"
OBSERVE_TARGETS = "sidecar-bare,sidecar-logged"
NGINX, EMPTY = "nginx reverse proxy", "sidecar, empty chain"
BARE, LOGGED = "sidecar, empty chain, no metrics", "sidecar, empty chain, access log"
GATEWAY = "sidecar, gateway chain (jwt, ratelimit, cache, router)"
PLAIN, TLS = "sidecar A -> sidecar B (plain HTTP)", "sidecar A -> sidecar B (mutual TLS)"
HEY_BIN = 1e-4  # hey prints response times in seconds with four decimals


# ---------------------------------------------------------------- the machine


def machine() -> dict[str, Any]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return {"cores": os.cpu_count(), "model": model, "kernel": platform.release(),
            "python": platform.python_version(), "load_before": os.getloadavg()[0]}


def source() -> str:
    """Which mesh is measured: the commit of this checkout and how many files differ from it."""
    git = shutil.which("git")
    if git is None:
        return str(REPO)
    head = subprocess.run([git, "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return f"{REPO} (not a git checkout)"
    dirty = subprocess.run([git, "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.splitlines()
    return f"commit {head.stdout.strip()}" + (f" with {len(dirty)} modified files" if dirty else "")


# ---------------------------------------------------------------- scripts run as processes of their own


def script(procs: Processes, name: str, argv: list[str], timeout: float) -> None:
    """Run a bench script to completion (its stderr, its progress, passes through); raise if it fails."""
    log = procs.logs / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.DEVNULL, stdout=out, cwd=REPO,
                                start_new_session=True)
    procs.started.append((name, proc))
    try:
        proc.wait(timeout)
    finally:
        Processes.stop(proc, timeout=120)  # SIGTERM: the script stops what it started
        procs.started.remove((name, proc))
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed with {proc.returncode}:\n{procs.log_tail(name, 40)}")


# ---------------------------------------------------------------- a smooth 1,000 req/s


@dataclass
class Pass:
    requests: int
    failed: int
    seconds: float
    cpu_seconds: float
    times: list[float]


def hey(procs: Processes, args: argparse.Namespace, port: int, pids: list[int], seconds: float) -> Pass:
    """One pass at ``--rate`` over ``--rate-connections``: that many ``hey -c 1`` processes, each at its share
    of the rate on a connection of its own, started 1/rate apart so that their requests interleave evenly
    (one ``hey -c 10`` starts its ten workers' tickers together: ten requests at once, every 10 ms)."""
    per_worker = args.rate / args.rate_connections
    argv = [args.hey, "-z", f"{seconds:g}s", "-c", "1", "-q", f"{per_worker:g}", "-t", "5", "-o", "csv",
            f"http://127.0.0.1:{port}/"]
    before = sum(cpu_ticks(pids)) if pids else 0
    began = time.monotonic()
    workers: list[subprocess.Popen[bytes]] = []
    outputs = []
    try:
        for _ in range(args.rate_connections):
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            procs.started.append(("hey", proc))
            workers.append(proc)
            time.sleep(1 / args.rate)
        for proc in workers:
            out, _ = proc.communicate(timeout=seconds + 30)
            if proc.returncode != 0:
                raise SystemExit(f"hey failed ({proc.returncode}): {out.decode(errors='replace')[-2000:]}")
            outputs.append(out.decode())
    finally:
        for proc in workers:
            Processes.stop(proc)
            procs.started.remove(("hey", proc))
    elapsed = time.monotonic() - began
    after = sum(cpu_ticks(pids)) if pids else 0
    times, failed = [], 0
    for line in "\n".join(outputs).splitlines():
        fields = line.split(",")
        if len(fields) < 7 or fields[0] == "response-time":
            continue
        if fields[6] == "200":
            times.append(float(fields[0]))
        else:
            failed += 1
    return Pass(len(times) + failed, failed, elapsed, (after - before) / CLK_TCK, times)


def grouped_median(values: list[float], width: float = HEY_BIN) -> float:
    """The median of values rounded to ``width``, interpolated within its bin (as if spread evenly in it)."""
    ranked = sorted(values)
    half = len(ranked) / 2
    middle = ranked[len(ranked) // 2]
    below = sum(1 for v in ranked if v < middle - width / 2)
    inside = sum(1 for v in ranked if abs(v - middle) <= width / 2)
    return middle - width / 2 + (half - below) / max(inside, 1) * width


def fixed_rate(procs: Processes, args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, float]]:
    """Direct, nginx and the sidecar at a smooth ``--rate``: cores used and p50, round-robin passes."""
    _, backend_port = start_backend(procs, tmp)
    nginx, nginx_port = start_nginx_proxy(procs, tmp, backend_port)
    sidecar = start_sidecar(procs, sys.executable, mesh_toml(tmp), "empty", backend_port, name="sidecar-rate")
    targets = {"direct": (backend_port, []), "nginx": (nginx_port, process_tree(nginx.pid)),
               "sidecar": (sidecar.public, process_tree(sidecar.proc.pid))}
    passes: dict[str, list[Pass]] = {name: [] for name in targets}
    for port, pids in targets.values():
        hey(procs, args, port, pids, 1)  # warm-up: connections made, code paths warm
    for round_ in range(args.rate_rounds):
        for name, (port, pids) in targets.items():
            print(f"[rate {round_ + 1}/{args.rate_rounds}] {name} ...", file=sys.stderr, flush=True)
            passes[name].append(hey(procs, args, port, pids, args.rate_seconds))
    found = {}
    for name, runs in passes.items():
        times = [t for r in runs for t in r.times]
        seconds = sum(r.seconds for r in runs)
        found[name] = {"requests": sum(r.requests for r in runs), "failed": sum(r.failed for r in runs),
                       "rate": sum(r.requests for r in runs) / (len(runs) * args.rate_seconds),
                       "cores": sum(r.cpu_seconds for r in runs) / seconds if targets[name][1] else 0.0,
                       "p50_ms": grouped_median(times) * 1000, "p99_ms": sorted(times)[int(len(times) * 0.99)] * 1000}
    return found


# ---------------------------------------------------------------- an idle sidecar's memory


def idle_rss(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """VmRSS of each sidecar of examples/hello (``mesh up -d``, process runtime), idle ``--settle`` s after start."""
    folder = tmp / "hello"
    shutil.copytree(REPO / "examples" / "hello", folder,
                    ignore=shutil.ignore_patterns(".mesh", "__pycache__"))
    toml = folder / "mesh.toml"
    toml.write_text(re.sub(r"expose = \d+", f"expose = {free_port()}", toml.read_text()))
    mesh = [sys.executable, "-m", "mesh"]
    try:
        up = subprocess.run([*mesh, "up", "-d", str(folder)], capture_output=True, text=True, timeout=300,
                            cwd=REPO)
        if up.returncode != 0:
            raise SystemExit(f"mesh up examples/hello failed:\n{up.stdout}{up.stderr}")
        time.sleep(args.settle)  # no traffic: what a sidecar holds once it has settled
        state = json.loads((folder / ".mesh" / "hello" / "state.json").read_text())
        rss = {}
        for instance in state["instances"]:
            pid = instance.get("pids", {}).get("sidecar")
            if pid:
                status = Path(f"/proc/{pid}/status").read_text()
                kb = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
                rss[instance["label"]] = kb / 1024
    finally:
        subprocess.run([*mesh, "down", str(folder)], capture_output=True, timeout=300, cwd=REPO)
    if not rss:
        raise SystemExit("examples/hello: no sidecar found in state.json")
    return {"mb": rss, "median_mb": statistics.median(rss.values())}


# ---------------------------------------------------------------- the table


def verdict(*met: bool) -> str:
    return "yes" if all(met) else "no"


def fewer(drop: float) -> str:
    """``9.5% fewer`` or, when the sidecar observing came out ahead, ``2.1% more``."""
    return f"{drop:.1%} fewer" if drop >= 0 else f"{-drop:.1%} more"


def observing_cost(bare: dict[str, Any], logged: dict[str, Any]) -> tuple[float, float, int]:
    """What observing costs: (req/s drop, drop of req/s per core by CPU/req, rounds compared).

    Each round measured both targets a few seconds apart, so each round's ratio is compared, and the
    median of the ratios taken: a round the shared machine slowed down slows both of its passes.
    """
    rps = [after / before for before, after in zip(bare["rps_runs"], logged["rps_runs"], strict=True)]
    cpu = [before / after for before, after in zip(bare["cpu_runs"], logged["cpu_runs"], strict=True)]
    return 1 - statistics.median(rps), 1 - statistics.median(cpu), len(rps)


def rows(found: dict[str, Any]) -> list[list[str]]:
    """[what, measured, target, met?] for each row of the issue's table, from what was measured."""
    out = [["what", "measured", "target", "met?"]]
    wrk = {r["target"]: r for r in found.get("wrk", [])}
    if wrk:
        nginx, empty, gateway = wrk[NGINX], wrk[EMPTY], wrk[GATEWAY]
        share = gateway["rps"] / nginx["rps"]
        cpu_x = gateway["proxy_cpu_us"] / nginx["proxy_cpu_us"]
        # 50 µs where nginx took 17: the target in CPU is 50/17 = 2.9x nginx's, on any machine.
        out.append(["gateway chain (jwt with cache hit, ratelimit, cache miss, router)",
                    f"{share:.2f}x nginx req/s ({gateway['rps']:,.0f} / {nginx['rps']:,.0f}); "
                    f"{gateway['proxy_cpu_us']:.0f} µs CPU/req = {cpu_x:.1f}x nginx's {nginx['proxy_cpu_us']:.0f}",
                    ">= 0.33x nginx req/s (<= 50 µs where nginx takes 17: <= 2.9x nginx's CPU/req)",
                    verdict(share >= 0.33, cpu_x <= 50 / 17)])
        empty_x = empty["proxy_cpu_us"] / nginx["proxy_cpu_us"]
        out.append(["empty chain CPU per request",
                    f"{empty_x:.1f}x nginx's ({empty['proxy_cpu_us']:.0f} / {nginx['proxy_cpu_us']:.0f} µs)",
                    "<= 2.0x nginx's", verdict(empty_x <= 2.0)])
    # Runs saved before the observing row had passes of its own measured it with the others.
    observed = {r["target"]: r for r in found.get("observe", [])} or wrk
    if BARE in observed and LOGGED in observed:
        drop, cpu_drop, rounds = observing_cost(observed[BARE], observed[LOGGED])
        out.append(["observing: metrics and access log on (the default) against both off, empty chain",
                    f"{fewer(drop)} req/s; {fewer(cpu_drop)} req/s per core by CPU/req "
                    f"(medians of {rounds} paired rounds)", "<= 10% fewer req/s (issue 10)",
                    verdict(drop <= 0.10)])
    if wrk:
        plain, tls = wrk[PLAIN], wrk[TLS]
        extra = tls["proxy_cpu_us"] / plain["proxy_cpu_us"] - 1
        out.append(["mutual TLS between two sidecars, extra CPU per request",
                    f"{extra:+.0%} ({tls['proxy_cpu_us']:.0f} / {plain['proxy_cpu_us']:.0f} µs, both sidecars)",
                    "<= +15%", verdict(extra <= 0.15)])
    rate = found.get("rate")
    if rate:
        direct, nginx, sidecar = rate["direct"], rate["nginx"], rate["sidecar"]
        over, nginx_over = sidecar["p50_ms"] - direct["p50_ms"], nginx["p50_ms"] - direct["p50_ms"]
        cores_x = sidecar["cores"] / nginx["cores"]
        # 0.07 core where nginx used 0.041: 1.7x nginx's cores, on any machine.
        out.append([f"at a smooth {found['setup']['rate']:,} req/s ({found['setup']['rate_connections']} "
                    f"connections)",
                    f"{sidecar['cores']:.3f} core = {cores_x:.1f}x nginx's, {over:+.2f} ms p50 over direct "
                    f"(nginx: {nginx['cores']:.3f} core, {nginx_over:+.2f} ms)",
                    "<= 0.07 core where nginx uses 0.041 (<= 1.7x nginx's), <= +0.3 ms p50",
                    verdict(cores_x <= 0.07 / 0.041, over <= 0.3)])
    rss = found.get("rss")
    if rss:
        out.append(["sidecar resident memory, idle", f"{rss['median_mb']:.1f} MB "
                    f"(median of {len(rss['mb'])}, examples/hello)", "<= 35 MB", verdict(rss["median_mb"] <= 35)])
    cold = found.get("cold", {})
    limits = {"process": 150.0, "docker": 700.0}
    for runtime, label in (("process", "process runtime (tiny stdlib app)"), ("docker", "Docker")):
        result = cold.get(runtime)
        if result is None:
            continue
        if "error" in result:
            out.append([f"first request of a new key, {label}", f"not measured: {result['error']}",
                        f"<= {limits[runtime]:.0f} ms", "?"])
            continue
        median = result["summary"]["cold"]["total"]["median"]
        out.append([f"first request of a new key, {label}", f"{median:.0f} ms (median of {result['keys']})",
                    f"<= {limits[runtime]:.0f} ms", verdict(median <= limits[runtime])])
    wakes = {rt: r["summary"]["wake"]["total"]["median"] for rt, r in cold.items()
             if "error" not in r and "wake" in r["summary"]}
    if wakes:
        out.append(["wake of a sleeping key", ", ".join(f"{rt} {ms:.0f} ms" for rt, ms in wakes.items()),
                    "same targets", verdict(*(ms <= limits[rt] for rt, ms in wakes.items()))])
    ws = found.get("websocket")
    if ws:
        out.append(["WebSocket tunnel, 1 MiB messages echoed",
                    f"{ws['ratio']:.2f}x direct ({ws['best']['sidecar']:.0f} / {ws['best']['direct']:.0f} MiB/s)",
                    ">= 0.5x direct throughput", verdict(ws["ratio"] >= 0.5)])
    return out


def splits(found: dict[str, Any]) -> list[list[str]]:
    """The split of the cold starts and wakes: median ms of each phase (see bench/cold_start.py)."""
    cold = {rt: r for rt, r in found.get("cold", {}).items() if "error" not in r}
    if not cold:
        return []
    phases = list(next(iter(cold.values()))["summary"]["cold"]["phases"])
    out = [["start", "total", *phases]]
    for runtime, result in cold.items():
        for kind in ("cold", "wake"):
            summary = result["summary"].get(kind)
            if summary is None:
                continue
            cells = [f"{s['median']:.0f}" if s else "?" for s in summary["phases"].values()]
            out.append([f"{runtime}, {kind}", f"{summary['total']['median']:.0f}", *cells])
    return out


def plain(table: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown(table: list[list[str]], numeric_from: int = 99) -> str:
    align = ["---" if i < numeric_from else "---:" for i in range(len(table[0]))]
    return "\n".join(["| " + " | ".join(table[0]) + " |", "| " + " | ".join(align) + " |",
                      *["| " + " | ".join(row) + " |" for row in table[1:]]])


def header(found: dict[str, Any]) -> str:
    m = found["machine"]
    loads = ", ".join(f"{part} {load:.1f}" for part, load in found.get("loads", {}).items())
    return (f"`{found['command']}`, {found['date']}, {found['source']}; {m['cores']} cores ({m['model']}), "
            f"Linux {m['kernel']}, Python {m['python']}; load average {m['load_before']:.2f} before, "
            f"{m['load_after']:.2f} after" + (f" (as each part began: {loads})" if loads else "")
            + f"; {found['seconds']:.0f} s in all.")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown ('-': stdout)")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1 wrk round of 2 s, 2 rate passes of 3 s, 3 keys, 20 WebSocket messages")
    p.add_argument("--skip", default="", help="comma-separated rows not to measure: wrk, observe, rate, rss, "
                                              "process, docker, websocket")
    p.add_argument("--profile", metavar="DIR", help="bench/run.py --profile DIR: py-spy on the wrk rows")
    p.add_argument("--rounds", type=int, default=5, help="bench/run.py --rounds (default 5)")
    p.add_argument("--duration", type=float, default=3.0, help="bench/run.py -d (default 3)")
    p.add_argument("--observe-rounds", type=int, default=12,
                   help="rounds of the observing row's two targets (default 12)")
    p.add_argument("--observe-duration", type=float, default=2.0,
                   help="seconds of each of the observing row's passes (default 2)")
    p.add_argument("--rate", type=int, default=1000, help="requests per second of the smooth load (default 1000)")
    p.add_argument("--rate-connections", type=int, default=10,
                   help="connections of the smooth load, one hey process each (default 10)")
    p.add_argument("--rate-seconds", type=float, default=5.0, help="seconds of one rate pass (default 5)")
    p.add_argument("--rate-rounds", type=int, default=2, help="rate passes per target, round-robin (default 2)")
    p.add_argument("--hey", default=shutil.which("hey") or "hey")
    p.add_argument("--settle", type=float, default=3.0, help="seconds an idle sidecar runs before its RSS is read")
    p.add_argument("--keys", type=int, default=20, help="bench/cold_start.py --keys (default 20)")
    p.add_argument("--ws-messages", type=int, default=100, help="bench/websocket.py --messages (default 100)")
    p.add_argument("--keep", action="store_true", help="keep the temp folder (logs, configs)")
    p.add_argument("--source", help="what is measured, for the header (default: this checkout's commit)")
    p.add_argument("--render", metavar="JSON", help="measure nothing: print (and --markdown) the table of a "
                                                    "run saved with --json")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.rate_rounds, args.rate_seconds = 1, 2.0, 1, 3.0
        args.observe_rounds, args.observe_duration = 2, 1.0
        args.keys, args.ws_messages, args.settle = 3, 20, 1.0
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def docker_answers() -> str | None:
    """None when a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker command"
    done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=60)
    return None if done.returncode == 0 else "no Docker engine answers (scripts/dockerd.sh)"


def measure(args: argparse.Namespace, tmp: Path, procs: Processes) -> dict[str, Any]:
    found: dict[str, Any] = {"setup": {"rate": args.rate, "rate_connections": args.rate_connections}}
    loads = found["loads"] = {}  # the load average as each part began: the machine is shared
    if "wrk" not in args.skip:
        loads["wrk"] = os.getloadavg()[0]
        out = tmp / "wrk.json"
        argv = [str(HERE / "run.py"), "--targets", WRK_TARGETS, "--rounds", str(args.rounds),
                "-d", f"{args.duration:g}", "--json", str(out)]
        script(procs, "wrk", argv + (["--profile", args.profile] if args.profile else []), timeout=900)
        found["wrk"] = json.loads(out.read_text())["results"]
        if args.profile:
            print((tmp / "wrk.log").read_text(), file=sys.stderr)
    if "observe" not in args.skip:
        loads["observe"] = os.getloadavg()[0]
        out = tmp / "observe.json"
        script(procs, "observe", [str(HERE / "run.py"), "--targets", OBSERVE_TARGETS, "--rounds",
                                  str(args.observe_rounds), "-d", f"{args.observe_duration:g}", "--json", str(out)],
               timeout=900)
        found["observe"] = json.loads(out.read_text())["results"]
    if "rate" not in args.skip:
        loads["rate"] = os.getloadavg()[0]
        if not shutil.which(args.hey):
            raise SystemExit("hey not found (apt-get install hey), or --skip rate")
        rate_procs = Processes(tmp)
        try:
            found["rate"] = fixed_rate(rate_procs, args, tmp)
        finally:
            rate_procs.stop_all()
    if "rss" not in args.skip:
        print("[rss] examples/hello ...", file=sys.stderr, flush=True)
        loads["rss"] = os.getloadavg()[0]
        found["rss"] = idle_rss(args, tmp)
    found["cold"] = {}
    for runtime in ("process", "docker"):
        if runtime in args.skip:
            continue
        why = docker_answers() if runtime == "docker" else None
        if why is not None:
            found["cold"][runtime] = {"error": why}
            continue
        out = tmp / f"cold-{runtime}.json"
        loads[runtime] = os.getloadavg()[0]
        script(procs, f"cold-{runtime}", [str(HERE / "cold_start.py"), "--runtime", runtime,
                                          "--keys", str(args.keys), "--json", str(out)], timeout=1200)
        found["cold"][runtime] = json.loads(out.read_text())
    if "websocket" not in args.skip:
        print("[websocket] ...", file=sys.stderr, flush=True)
        loads["websocket"] = os.getloadavg()[0]
        out = tmp / "websocket.json"
        script(procs, "websocket", [str(HERE / "websocket.py"), "--messages", str(args.ws_messages),
                                    "--json", str(out)], timeout=600)
        found["websocket"] = json.loads(out.read_text())
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return report(json.loads(Path(args.render).read_text()), args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through the finally below
    cached_bytecode()  # every process it starts, as an installed mesh runs
    started = time.monotonic()
    info = machine()
    with scratch("mesh-table-", keep=args.keep) as (tmp, procs):
        found = measure(args, tmp, procs)
    info["load_after"] = os.getloadavg()[0]
    given = argv if argv is not None else sys.argv[1:]
    found.update(machine=info, seconds=time.monotonic() - started, source=args.source or source(),
                 date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                 command=" ".join(["python bench/table.py", *map(shlex.quote, given)]))
    if args.json:
        Path(args.json).write_text(json.dumps(found, indent=2, default=str))
    return report(found, args)


def report(found: dict[str, Any], args: argparse.Namespace) -> int:
    table, split = rows(found), splits(found)
    print(plain(table))
    if split:
        print("\nsplit of the first request (median ms; bench/cold_start.py):")
        print(plain(split))
    print("\n" + header(found))
    if args.markdown:
        parts = [header(found), "", markdown(table)]
        if split:
            parts += ["", "Where a first request's time goes (median ms of each part, `bench/cold_start.py`):",
                      "", markdown(split, numeric_from=1)]
        text = "\n".join(parts) + "\n"
        if args.markdown == "-":
            print(text)
        else:
            Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
