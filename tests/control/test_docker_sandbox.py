"""examples/sandbox on the docker runtime: code submitted to `/run` cannot steer its own sidecar.

The example's own app and mesh.toml, copied to a temporary folder (a name and
an `expose` port of the test's own), brought up with `mesh up -d --runtime
docker`. Code run in a session's sandbox tries what untrusted code would:
read the sidecar's `/config`, `PUT /registry`, find the admin token. Every
container, network and image is recorded by id and removed at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from ..docker_support import base_image, docker_engine  # noqa: F401
from ..harness import ATTACK, MeshMaker, fetch, free_port, unique_name

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sandbox"


def run(port: int, session: str, code: str) -> dict[str, Any]:
    answer = fetch(f"http://127.0.0.1:{port}/run", method="POST", data=code.encode(),
                   headers={"X-Session": session}, timeout=120)
    if answer.status != 200:
        pytest.fail(f"/run answered {answer.status}: {answer.body!r}")
    return answer.json()


@pytest.mark.docker
def test_code_run_in_the_sandbox_cannot_reach_its_sidecars_admin(docker_engine: Any, base_image: str,
                                                                   make_mesh: MeshMaker, tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    name, port = unique_name("s"), free_port()
    toml = (EXAMPLE / "docker" / "mesh.toml").read_text()
    assert 'name = "sandbox-docker"' in toml and "expose = 8083" in toml
    toml = toml.replace('name = "sandbox-docker"', f'name = "{name}"').replace("expose = 8083", f"expose = {port}")
    mesh = make_mesh(None, toml, None, folder=tmp_path / "docker", engine=docker_engine)
    up = mesh.run("up", "-d", "--runtime", "docker")
    assert up.returncode == 0, up.stdout + up.stderr
    assert run(port, "alice", "print(2 + 2)")["stdout"] == "4\n"  # the example works

    result = run(port, "mallory", ATTACK)
    assert result["exit"] == 0, result
    found = json.loads(result["stdout"].strip().splitlines()[-1])
    assert found.pop("uid") == 65534  # the example's app runs as nobody
    assert found.pop("token file") is False
    assert found.pop("raw socket") == "PermissionError"
    assert found == {"GET 127.0.0.1": "ConnectionRefusedError",
                     "PUT 127.0.0.1": "ConnectionRefusedError"}, found
    assert run(port, "mallory", "print(2 + 2)")["stdout"] == "4\n"  # and its sidecar serves as before

    down = mesh.run("down", "--volumes")  # the sessions' volumes too
    assert down.returncode == 0, down.stdout + down.stderr
    assert mesh.containers() == [] and mesh.networks() == []
