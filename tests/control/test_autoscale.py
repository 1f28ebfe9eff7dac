"""Autoscaled pools (mesh.control.autoscale) on the process runtime: CPU from /proc, a pool that scales
up under a bounded CPU-burning load and back down after it, with a short window and cooldown.
Every process a test starts is killed at teardown by its recorded process group."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mesh import config
from mesh.control.autoscale import process_group_cpu
from mesh.control.controller import Console, Controller
from mesh.control.runtimes.base import group_alive, pid_alive, run_processes

BURN = '''
import os, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        query = parse_qs(urlparse(self.path).query)
        end = time.process_time() + int(query.get("ms", ["0"])[0]) / 1000
        while time.process_time() < end:   # burn CPU
            pass
        body = f"{os.environ['MESH_INSTANCE']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


async def until(check: Any, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


def test_process_group_cpu_counts_the_whole_group() -> None:
    # A group leader that starts a child burning ~0.4s of CPU and waits for it (cutime), then sleeps.
    code = ("import subprocess, sys, time\n"
            "subprocess.run([sys.executable, '-c', 'import time\\nend=time.process_time()+0.4\\n"
            "while time.process_time()<end: pass'])\n"
            "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        used = 0.0
        while time.monotonic() < deadline:
            used = process_group_cpu(proc.pid) or 0.0
            if used >= 0.4:
                break
            time.sleep(0.1)
        assert 0.4 <= used < 3, used
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 5
    while process_group_cpu(proc.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_group_cpu(proc.pid) is None  # nothing left of the group


@pytest.fixture
async def controllers() -> AsyncIterator[list[Controller]]:
    made: list[Controller] = []
    seen: set[int] = set()
    try:
        yield made
    finally:
        for controller in made:
            controller.stop()
            for inst in controller.state()["instances"]:
                seen.update(inst.get("pgids", {}).values())
        await asyncio.sleep(0)
        for controller in made:
            for group in seen:
                if group_alive(group):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(group, signal.SIGKILL)
            for pid in run_processes(controller.run_id):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
async def test_a_pool_scales_up_under_load_and_down_after(
        tmp_path: Path, controllers: list[Controller], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mesh")
    port = free_port()
    (tmp_path / "app.py").write_text(BURN)
    (tmp_path / "mesh.toml").write_text(f'''[mesh]
name = "pool"

[services.pool]
command = "python app.py"
expose = {port}
scale = {{ min = 1, max = 2, cpu = 0.5, cooldown = "2s" }}
''')
    out = io.StringIO()
    controller = Controller(config.load(tmp_path), timeout=20, console=Console(out))
    controllers.append(controller)
    controller.autoscaler.window, controller.autoscaler.interval, controller.autoscaler.drain = 2.0, 0.25, 0.5
    task = asyncio.ensure_future(controller.run())
    pgids: set[int] = set()
    pids: set[int] = set()

    def labels() -> list[str]:
        state = controller.state()
        for inst in state["instances"]:
            pgids.update(inst["pgids"].values())
            pids.update(inst["pids"].values())
        return [i["label"] for i in state["instances"] if i["state"] == "running"]

    assert await until(lambda: controller.phase != "starting" or task.done(), 30), out.getvalue()
    assert controller.phase == "running", out.getvalue()
    assert labels() == ["pool.1"]  # min: one, numbered like the pool it may grow into

    # Bounded load: 3 clients, 150ms of CPU each request, until scaled up or 25s or 600 requests.
    stop = threading.Event()
    sent = [0]
    lock = threading.Lock()

    def client() -> None:
        deadline = time.monotonic() + 25
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if sent[0] >= 600:
                    return
                sent[0] += 1
            get(f"http://127.0.0.1:{port}/burn?ms=150")

    loaders = [asyncio.ensure_future(asyncio.to_thread(client)) for _ in range(3)]
    try:
        scaled_up = await until(lambda: "pool.2" in labels() and controller.registry()["pool"].__len__() == 2, 30)
    finally:
        stop.set()
        await asyncio.gather(*loaders)
    assert scaled_up, caplog.text
    added = [r.getMessage() for r in caplog.records if "adding pool.2" in r.getMessage()]
    assert added and added[0].startswith("pool: average CPU ") and " over 2s across 1 instance > 0.5" in added[0]
    assert "pool.2: ready after" in caplog.text
    assert controller.state()["instances"][1]["state"] == "running"

    # No load: below 0.25 for the 2s cooldown, the newest instance is drained and removed.
    assert await until(lambda: labels() == ["pool.1"] and len(controller.instances) == 1, 20), caplog.text
    removed = [r.getMessage() for r in caplog.records if "removing pool.2" in r.getMessage()]
    assert removed and " < 0.25 for 2s: removing pool.2 (draining 0.5s first)" in removed[0], removed
    assert "pool.2: stopped (scaled down)" in caplog.text
    assert controller.registry()["pool"] and len(controller.registry()["pool"]) == 1
    assert get(f"http://127.0.0.1:{port}/burn?ms=1") == 200
    print(f"requests sent: {sent[0]}; decisions:\n" + "\n".join(added + removed))

    controller.stop()
    assert await asyncio.wait_for(task, 40) == 0
    assert not [p for p in pids if pid_alive(p)]
    assert not [g for g in pgids if group_alive(g)]
    assert run_processes(controller.run_id) == []
