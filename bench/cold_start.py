#!/usr/bin/env python3
"""Cold start of a keyed service: the first request of a new key, through `mesh up -d`.

Copies examples/sandbox into a temporary folder (its mesh.toml with the
expose port changed to a free one), runs ``mesh up -d`` on the runtime
asked for, then for N distinct new keys times one ``POST /run`` each
(``print(1)``) through the exposed front: that request plans the key's
instance, issues its certificate, starts its sidecar and app, waits for both
to be ready and is then served. A second request of the same key is timed
too (warm). Prints median, min and max of each; stops the mesh with
``mesh down`` whatever happens.

    /tmp/venv/bin/python bench/cold_start.py                     # process runtime, 10 keys
    /tmp/venv/bin/python bench/cold_start.py --runtime docker
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(url: str, key: str) -> float:
    request = urllib.request.Request(url, data=b"print(1)", headers={"X-Session": key}, method="POST")
    began = time.perf_counter()
    with OPENER.open(request, timeout=120) as response:
        response.read()
        assert response.status == 200, response.status
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="process", choices=["process", "docker"])
    parser.add_argument("--keys", type=int, default=10)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mesh-cold-"))
    folder = work / "sandbox"
    shutil.copytree(ROOT / "examples" / "sandbox", folder,
                    ignore=shutil.ignore_patterns(".mesh", ".sandbox-data", "__pycache__"))
    if args.runtime == "docker":
        folder = folder / "docker"
    port = free_port()
    toml = folder / "mesh.toml"
    toml.write_text(re.sub(r"expose = \d+", f"expose = {port}", toml.read_text()))
    mesh = [sys.executable, "-m", "mesh"]
    try:
        up = subprocess.run([*mesh, "up", "-d", str(folder), "--runtime", args.runtime],
                            capture_output=True, text=True, timeout=600)
        if up.returncode != 0:
            print(up.stdout, up.stderr, file=sys.stderr)
            return 1
        url = f"http://127.0.0.1:{port}/run"
        post(url, "warm-up")  # the first start also warms the OS's caches
        cold, warm = [], []
        for i in range(args.keys):
            key = f"bench-{i}-{time.time_ns()}"
            cold.append(post(url, key))
            warm.append(post(url, key))
        print(f"runtime {args.runtime}, {args.keys} new keys (sandbox example, POST /run print(1)):")
        for name, values in (("cold (first request of a key)", cold), ("warm (second request)", warm)):
            ms = [v * 1000 for v in values]
            print(f"  {name:<32} median {statistics.median(ms):7.1f} ms   "
                  f"min {min(ms):7.1f}   max {max(ms):7.1f}")
        return 0
    finally:
        subprocess.run([*mesh, "down", str(folder)], capture_output=True, timeout=300)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
