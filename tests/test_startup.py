"""`mesh sidecar` starts with what a sidecar needs: no control plane, no other command, no metrics library.

A sidecar starts for every instance, and for a keyed service's new key while its client waits; what it
imports is most of that start. prometheus-client is imported at the first scrape of ``/metrics``. These
tests read what was imported (``sys.modules``, ``-X importtime``), never how long it took.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .harness import fetch, wait_until

# Packages a sidecar must not import before ``/metrics`` is scraped.
NOT_AT_START = ("prometheus_client", "mesh.control", "aiohttp", "docker", "importlib.metadata")


def loaded(names: list[str]) -> list[str]:
    return sorted(name for name in names for package in NOT_AT_START
                  if name == package or name.startswith(package + "."))


def test_the_sidecar_command_imports_none_of_the_others() -> None:
    code = ("import json, sys\n"
            "from mesh.cli import sidecar_parser\n"
            "import mesh.sidecar.sidecar\n"
            "sidecar_parser()\n"
            "print(json.dumps(sorted(sys.modules)))\n")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules = json.loads(found.stdout)
    assert "mesh.sidecar.sidecar" in modules
    assert loaded(modules) == []


def test_a_running_sidecar_has_not_imported_them_until_metrics_are_scraped(tmp_path: Path) -> None:
    (tmp_path / "mesh.toml").write_text('[mesh]\nname = "t"\n[services.web]\ncommand = "x"\n'
                                        'plugins = [{ use = "stamp", header = "X-Stamp", value = "1" }]\n')
    admin = socket.create_server(("127.0.0.1", 0))
    imports = tmp_path / "imports.txt"
    try:
        with imports.open("w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-X", "importtime", "-m", "mesh", "sidecar", "--config", str(tmp_path),
                 "--service", "web", "--app-port", "9", "--mesh-port", "0", "--outbound-port", "0",
                 "--admin-fd", str(admin.fileno())],
                stdout=subprocess.DEVNULL, stderr=stderr, stdin=subprocess.DEVNULL, pass_fds=[admin.fileno()])
        port = admin.getsockname()[1]
        try:
            wait_until(lambda: fetch(f"http://127.0.0.1:{port}/readyz", timeout=10).status == 200, timeout=120,
                       what="the sidecar's /readyz")
            at_start = [line.split("|")[-1].strip() for line in imports.read_text().splitlines()
                        if line.startswith("import time:")]
            assert "mesh.sidecar.sidecar" in at_start
            assert loaded(at_start) == []
            scraped = fetch(f"http://127.0.0.1:{port}/metrics", timeout=60)
            assert scraped.status == 200, scraped
            families = {family.name for family in text_string_to_metric_families(scraped.text)}
            assert {"mesh_requests", "mesh_plugin_calls", "mesh_upstream_idle_connections"} <= families
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    finally:
        admin.close()
    assert proc.returncode == 0, imports.read_text()[-2000:]
