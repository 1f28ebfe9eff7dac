"""What a newcomer reads: `mesh --help`, `mesh COMMAND --help`, and the reason phrase of a plugin's answer."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import cli
from mesh.testing import run_mesh


def commands(parser: argparse.ArgumentParser, prefix: str = "mesh") -> Iterator[
        tuple[str, str | None, argparse.ArgumentParser]]:
    """Every subcommand under ``parser``, nested ones too: its full name, its summary and its parser."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            summaries = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", summaries.get(name), sub
                yield from commands(sub, f"{prefix} {name}")


def missing_help(parser: argparse.ArgumentParser) -> list[str]:
    """Each subcommand without a summary or a description, and each option or argument without help."""
    found = []
    parsers = [("mesh", "", parser), *commands(parser)]
    for name, summary, sub in parsers:
        if name != "mesh" and not (summary and summary.strip()):
            found.append(f"{name}: no summary in the list of commands")
        if not (sub.description and sub.description.strip()):
            found.append(f"{name}: no description")
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue  # its commands are checked one by one
            if not action.help or action.help == argparse.SUPPRESS or not action.help.strip():
                found.append(f"{name} {'/'.join(action.option_strings) or action.dest}: no help text")
    return found


def test_every_command_and_option_has_help() -> None:
    parser = cli.build_parser()  # as `mesh sidecar ...` builds it: with every sidecar option
    names = {name for name, _, _ in commands(parser)}
    assert {"mesh up", "mesh down", "mesh ps", "mesh check", "mesh sidecar"} <= names
    assert missing_help(parser) == []


def test_the_walk_finds_what_lacks_help() -> None:
    parser = argparse.ArgumentParser(prog="mesh", description="d")
    subs = parser.add_subparsers()
    bare = subs.add_parser("bare")
    bare.add_argument("--flag")
    subs.add_parser("ok", help="h", description="d").add_argument("--fine", help="yes")
    assert missing_help(parser) == ["mesh bare: no summary in the list of commands", "mesh bare: no description",
                                    "mesh bare --flag: no help text"]


@pytest.mark.parametrize("command, says", [
    ("down", "Stop the mesh that `mesh up -d` started"),
    ("up", "Start every service of the mesh with its sidecar"),
    ("ps", "List the mesh's services and instances"),
    ("check", "Validate mesh.toml and load every plugin"),
    ("sidecar", "Run the sidecar of one instance of a service"),
])
def test_command_help_says_what_it_does(capsys: pytest.CaptureFixture[str], command: str, says: str) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    assert exit.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # as one line, whatever the terminal's width
    assert says in out


def test_sidecar_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["sidecar", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag, words in [("--mesh-port", "port of the mesh listener (default: 15001)"),
                        ("--outbound-port", "the app's HTTP_PROXY (default: 15002)"),
                        ("--admin-port", "port of the admin listener"),
                        ("--app-host", "address of the app (default: 127.0.0.1)"),
                        ("--public-host", "address of the public listener")]:
        assert f"{flag} " in out and words in out


def test_mesh_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name, summary, _ in commands(cli.build_parser()):
        assert name.split()[-1] in out and " ".join(str(summary).split()[:3]) in " ".join(out.split())
    assert "`mesh COMMAND --help`" in " ".join(out.split())


TEAPOT = """
[mesh]
name = "tea"
plugin_path = ["plugins"]

[services.pot]
command = "python pot.py"
plugins = [{ use = "teapot.py:Teapot" }]
"""


async def test_a_plugins_418_goes_out_with_its_reason_phrase(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "teapot.py").write_text(
        "from mesh import Plugin, Response\n\n"
        "class Teapot(Plugin):\n"
        "    async def handle(self, request, call_next):\n"
        "        return Response(418)\n")
    async with run_mesh(TEAPOT, {}, root=tmp_path, tls=False) as mesh:
        host, _, port = mesh.url("pot").removeprefix("http://").rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: pot\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(10):
                status_line = await reader.readline()
        finally:
            writer.close()
    assert status_line == b"HTTP/1.1 418 I'm a Teapot\r\n"
