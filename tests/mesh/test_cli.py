"""The `mesh` command: parsing, `mesh check`, and what every command does with a bad file."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert captured.out.splitlines()[0] == problem
    assert "problem" in captured.err


def test_check_reports_every_problem_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = GOOD.replace('value = "v1"', 'valeu = "v1"').replace('to = "orders"', 'to = "order"')
    assert cli.main(["check", str(write(tmp_path, text))]) == 1
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_check_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", str(tmp_path / "nope.toml")]) == 1
    assert "no such file" in capsys.readouterr().out


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
