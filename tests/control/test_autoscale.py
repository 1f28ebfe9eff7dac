"""Autoscaled pools (mesh.control.autoscale) on the process runtime: CPU from /proc, a pool that scales
up under a bounded CPU-burning load and back down after it, with a short window and cooldown.
Every process a test starts is killed at teardown by its recorded process group."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys

import pytest

from mesh.control.autoscale import process_group_cpu
from mesh.control.runtimes.procfs import run_processes

from ..harness import BURN_APP, Load, MeshMaker, eventually, fetch, free_port, wait_until


def test_process_group_cpu_counts_the_whole_group() -> None:
    # A group leader that starts a child burning ~0.4s of CPU and waits for it (cutime), then sleeps.
    code = ("import subprocess, sys, time\n"
            "subprocess.run([sys.executable, '-c', 'import time\\nend=time.process_time()+0.4\\n"
            "while time.process_time()<end: pass'])\n"
            "time.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        wait_until(lambda: (process_group_cpu(proc.pid) or 0.0) >= 0.4, every=0.1, what="0.4s of CPU counted")
        used = process_group_cpu(proc.pid) or 0.0
        assert 0.4 <= used < 3, used
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wait_until(lambda: process_group_cpu(proc.pid) is None, what="nothing left of the group")


@pytest.mark.slow
async def test_a_pool_scales_up_under_load_and_down_after(make_mesh: MeshMaker,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mesh")
    port = free_port()
    mesh = make_mesh("pool", f'''
[services.pool]
command = "python app.py"
expose = {port}
scale = {{ min = 1, max = 2, cpu = 0.1, cooldown = "2s" }}
''', BURN_APP)
    controller = mesh.make_controller()
    controller.autoscaler.window, controller.autoscaler.interval, controller.autoscaler.drain = 2.0, 0.25, 0.5

    def labels() -> list[str]:
        return [i["label"] for i in mesh.state()["instances"] if i["state"] == "running"]

    await mesh.start()
    assert labels() == ["pool.1"]  # min: one, numbered like the pool it may grow into

    # Bounded load: 3 clients, 150ms of CPU each request, until scaled up or 25s or 600 requests.
    load = Load(f"http://127.0.0.1:{port}/burn?ms=150", requests=600, seconds=25).start()
    try:
        await eventually(lambda: "pool.2" in labels() and len(controller.registry()["pool"]) == 2, every=0.1,
                         what=lambda: caplog.text)
    finally:
        await asyncio.to_thread(load.stop)
    added = [r.getMessage() for r in caplog.records if "adding pool.2" in r.getMessage()]
    assert added and added[0].startswith("pool: average CPU ") and " over 2s across 1 instance > 0.1" in added[0]
    assert "pool.2: ready after" in caplog.text
    assert mesh.state()["instances"][1]["state"] == "running"

    # No load: below 0.05 for the 2s cooldown, the newest instance is drained and removed.
    await eventually(lambda: labels() == ["pool.1"] and len(controller.instances) == 1, every=0.1,
                     what=lambda: caplog.text)
    removed = [r.getMessage() for r in caplog.records if "removing pool.2" in r.getMessage()]
    assert removed and " < 0.05 for 2s: removing pool.2 (draining 0.5s first)" in removed[0], removed
    assert "pool.2: stopped (scaled down)" in caplog.text
    assert controller.registry()["pool"] and len(controller.registry()["pool"]) == 1
    assert fetch(f"http://127.0.0.1:{port}/burn?ms=1").status == 200
    print(f"requests sent: {load.sent}; decisions:\n" + "\n".join(added + removed))

    await mesh.stop()
    mesh.assert_all_gone()
    assert run_processes(controller.run_id) == []
