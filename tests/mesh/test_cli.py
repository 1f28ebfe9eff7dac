"""The `mesh` command: parsing, `mesh check`, and what every command does with a bad file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mesh import __version__, cli

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello"

GOOD = """
[mesh]
name = "shop"

[services.web]
command = "python web.py"
expose = 8080
plugins = [{ use = "stamp", value = "v1" }]

[services.orders]
command = "python orders.py"
health = "/healthz"

[[routes]]
from = "web"
to = "orders"
paths = ["/orders/*"]
methods = ["get"]
timeout = "5s"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mesh.toml"
    path.write_text(text)
    return path


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"mesh {__version__}"


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main([])
    assert exit.value.code == 2


def test_check_prints_what_it_loaded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", str(write(tmp_path, GOOD))]) == 0
    out = capsys.readouterr().out
    assert "mesh 'shop'" in out
    assert "web: command: python web.py; exposed on 127.0.0.1:8080" in out
    assert "plugins: stamp (value='v1')" in out
    assert "orders: command: python orders.py; health: /healthz" in out
    assert "web -> orders: GET /orders/*, timeout 5s" in out


def test_check_takes_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, GOOD)
    assert cli.main(["check", str(tmp_path)]) == 0
    assert f"{tmp_path / 'mesh.toml'}: ok" in capsys.readouterr().out


def test_check_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", str(HELLO)]) == 0
    out = capsys.readouterr().out
    assert "plugins: served_by.py:ServedBy" in out
    assert "web -> greeter: GET /hello" in out


@pytest.mark.parametrize("change, problem", [
    (("command = \"python web.py\"\nexpose", "comand = \"python web.py\"\nexpose"),
     "services.web: unknown option 'comand', did you mean 'command'?"),
    (('to = "orders"', 'to = "order"'),
     "routes[0].to: unknown service 'order', did you mean 'orders'?"),
    (('value = "v1"', 'valeu = "v1"'),
     "services.web.plugins[0] (stamp): unknown option 'valeu', did you mean 'value'?"),
    (('value = "v1"', 'value = 3'),
     "services.web.plugins[0] (stamp): value: expected a string, found 3 (integer)"),
])
def test_check_reports_each_problem_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               change: tuple[str, str], problem: str) -> None:
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    assert cli.main(["check", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [problem, "1 problem"]  # problems and their count on one stream
    assert captured.out == ""


def test_check_reports_every_problem_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD.replace('value = "v1"', 'valeu = "v1"').replace('to = "orders"', 'to = "order"')
    assert cli.main(["check", str(write(tmp_path, text))]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 3 and captured.err.splitlines()[-1] == "2 problems"
    assert captured.out == ""


def test_check_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", str(tmp_path / "nope.toml")]) == 1
    captured = capsys.readouterr()
    assert "no such file" in captured.err and captured.out == ""


LIFECYCLE = """
[mesh]
name = "life"
plugin_path = ["hooks"]

[mesh.defaults]
max_pending = 200

[services.web]
command = "python web.py"

[services.pool]
command = "python pool.py"
scale = { min = 1, max = 4, cpu = 0.5, cooldown = "20s" }
lifecycle = "hooks.py:Hooks"

[services.sandbox]
command = "python sandbox.py"
instances = { key = "header:X-Session", sleep_after = "1m", max = 10 }

[[routes]]
from = "web"
to = "pool"
max_pending = 7

[[routes]]
from = "web"
to = "sandbox"
"""


def test_check_shows_scale_instances_lifecycle_and_max_pending(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "hooks.py").write_text(
        "from mesh.lifecycle import Lifecycle\n\nclass Hooks(Lifecycle):\n    pass\n")
    assert cli.main(["check", str(write(tmp_path, LIFECYCLE))]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    out = captured.out
    assert "pool: command: python pool.py; scale: min 1, max 4, cpu 0.5, cooldown 20s; " \
           "lifecycle: hooks.py:Hooks" in out
    assert "sandbox: command: python sandbox.py; instances: one per header:X-Session, " \
           "sleep_after 60s, max 10, start_timeout 30s" in out
    assert "defaults: timeout 15s, max_pending 200, lb p2c" in out
    assert "web -> pool: any method any path, max_pending 7" in out
    assert "web -> sandbox: any method any path, max_pending 200" in out  # the default it gets


@pytest.mark.parametrize("key, problem", [
    ("fro", "routes[0]: unknown option 'fro', did you mean 'from'?"),
    ("source", "routes[0]: unknown option 'source', did you mean 'from'?"),
    ("colour", "routes[0]: unknown option 'colour' (known: from, max_pending, methods, mode, paths, "
               "plugins, retries, stream_idle_timeout, timeout, to)"),
])
def test_an_unknown_route_key_names_from_not_source(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     key: str, problem: str) -> None:
    text = GOOD.replace('from = "web"', f'from = "web"\n{key} = "web"')
    assert cli.main(["check", str(write(tmp_path, text))]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [problem, "1 problem"]


@pytest.mark.parametrize("command", [["up"], ["up", "-d"], ["ps"], ["ps", "--json"], ["down"], ["build"]])
def test_config_errors_exit_2_and_start_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                command: list[str]) -> None:
    path = write(tmp_path, GOOD.replace('to = "orders"', 'to = "order"'))
    assert cli.main([*command, str(path)]) == 2
    assert "routes[0].to: unknown service 'order'" in capsys.readouterr().err
    assert not (tmp_path / ".mesh").exists()


def test_docker_runtime_needs_build_or_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["up", "--runtime", "docker", str(write(tmp_path, GOOD))]) == 2
    assert "services.web: no 'build' or 'image' to run on the docker runtime" in capsys.readouterr().err
    assert not (tmp_path / ".mesh").exists()


def test_process_runtime_needs_a_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace('command = "python orders.py"', 'image = "orders:1"'))
    assert cli.main(["up", str(path)]) == 2
    assert "services.orders: no 'command' to run on the process runtime" in capsys.readouterr().err


def test_ps_and_down_when_nothing_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(write(tmp_path, GOOD))
    assert cli.main(["ps", path]) == 0
    assert "mesh 'shop' is not running" in capsys.readouterr().out
    assert cli.main(["ps", "--json", path]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["mesh"] == "shop"
    assert state["instances"] == []
    assert state["controller"]["running"] is False
    assert cli.main(["down", path]) == 0
    assert "mesh 'shop' is not running" in capsys.readouterr().out


def test_sidecar_command_is_wired(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(write(tmp_path, GOOD))
    assert cli.main(["sidecar", "--config", path, "--service", "nope"]) == 2
    assert "unknown service 'nope'" in capsys.readouterr().out


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def left_state(tmp_path: Path, phase: str, pids: dict[str, int]) -> dict[str, Any]:
    """state.json as a controller of GOOD's mesh leaves it when it is gone: stopped, or killed mid-run."""
    state = {
        "mesh": "shop", "config": str(tmp_path / "mesh.toml"), "runtime": "process", "phase": phase,
        "error": None, "controller": {"pid": dead_pid()}, "run": "0123456789abcdef",
        "instances": [{
            "service": service, "instance": 1, "label": service, "state": "running", "problem": None,
            "healthy": None, "public": "http://127.0.0.1:18080" if service == "web" else None,
            "addresses": {"app": f"127.0.0.1:{port}", "mesh": f"127.0.0.1:{port + 1}",
                          "outbound": f"127.0.0.1:{port + 2}", "admin": f"127.0.0.1:{port + 3}"},
            "pids": {"sidecar": pids[service], "app": pids[service]},
            "pgids": {"sidecar": pids[service], "app": pids[service]},
        } for service, port in (("web", 41000), ("orders", 42000))],
    }
    folder = tmp_path / ".mesh" / "shop"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps(state))
    return state


@pytest.mark.parametrize("phase", ["stopped", "running"])  # after `mesh down`; a controller killed mid-run
def test_ps_of_a_stopped_mesh_shows_no_stale_pids_or_addresses(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               phase: str) -> None:
    path = str(write(tmp_path, GOOD))
    gone = dead_pid()
    left_state(tmp_path, phase, {"web": gone, "orders": gone})

    assert cli.main(["ps", "--json", path]) == 0
    state = json.loads(capsys.readouterr().out)
    assert state["phase"] == "stopped"
    assert state["controller"] == {"pid": None, "running": False}
    for inst in state["instances"]:
        assert inst["state"] == "stopped"
        assert (inst["pids"], inst["pgids"], inst["addresses"], inst["public"]) == ({}, {}, {}, None)

    assert cli.main(["ps", path]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "mesh 'shop' is not running (its last run, on the process runtime: stopped)"
    assert str(gone) not in out and "127.0.0.1" not in out
    assert [line.split()[:3] for line in out.splitlines()[2:]] == [["web", "1", "stopped"],
                                                                  ["orders", "1", "stopped"]]


def test_ps_after_a_crash_shows_what_still_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(write(tmp_path, GOOD))
    left_state(tmp_path, "running", {"web": os.getpid(), "orders": dead_pid()})  # web outlived its controller

    assert cli.main(["ps", "--json", path]) == 0
    web, orders = json.loads(capsys.readouterr().out)["instances"]
    assert web["state"] == "running" and web["pids"] == {"sidecar": os.getpid(), "app": os.getpid()}
    assert web["addresses"]["mesh"] == "127.0.0.1:41001" and web["public"] == "http://127.0.0.1:18080"
    assert orders["state"] == "stopped" and (orders["pids"], orders["addresses"]) == ({}, {})

    assert cli.main(["ps", path]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == ("mesh 'shop': its controller is gone, 1 instance still running "
                                   "(process runtime); `mesh down` stops them")
    assert "127.0.0.1:41001" in out and "127.0.0.1:42001" not in out
