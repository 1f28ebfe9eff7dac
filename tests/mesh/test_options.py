from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest

from mesh import Duration, Plugin, Rate
from mesh.options import OptionError, bind, convert


@pytest.mark.parametrize("text, seconds", [("250ms", 0.25), ("30s", 30), ("1m", 60), ("2h", 7200),
                                           ("1d", 86400), (5, 5.0), ("1.5s", 1.5)])
def test_durations(text, seconds):
    assert convert(text, Duration) == seconds


@pytest.mark.parametrize("bad", ["soon", "-1s", "1 week", True, "", "10"])
def test_bad_durations(bad):
    with pytest.raises(OptionError, match="expected a duration"):
        convert(bad, Duration, where="ttl")


@pytest.mark.parametrize("text, amount, seconds", [("100/minute", 100, 60), ("10/second", 10, 1),
                                                   ("5/2 hours", 5, 7200), ("1/day", 1, 86400)])
def test_rates(text, amount, seconds):
    rate = convert(text, Rate)
    assert (rate.amount, rate.seconds, rate.text) == (amount, seconds, text)


def test_scalars_are_strict():
    assert convert(3, float) == 3.0
    for value, hint in ((True, int), (1, bool), ("1", int), (1, str), (1.5, int)):
        with pytest.raises(OptionError):
            convert(value, hint, where="x")


def test_containers_unions_and_literals():
    assert convert(["1/s", "5/m"], list[Rate]) == [Rate(1, 1), Rate(5, 60)]
    assert convert({"a": "1s"}, dict[str, Duration]) == {"a": 1.0}
    assert convert("x", str | list[str]) == "x"
    assert convert(["x"], str | list[str]) == ["x"]
    assert convert("audit", Literal["enforce", "audit"]) == "audit"
    with pytest.raises(OptionError, match=r"limits\[1\]: expected a rate"):
        convert(["1/s", "lots"], list[Rate], where="limits")
    with pytest.raises(OptionError, match="expected one of 'enforce', 'audit', found 'x'"):
        convert("x", Literal["enforce", "audit"], where="mode")


def test_paths_resolve_against_the_mesh_folder(tmp_path):
    assert convert("keys/a.pem", Path, root=tmp_path) == tmp_path / "keys/a.pem"
    assert convert("/abs", Path, root=tmp_path) == Path("/abs")


class Limiter(Plugin):
    def __init__(self, limit: Rate, burst: int = 1, ttl: Duration = Duration(1)):
        if burst > 100:
            raise ValueError("burst must be at most 100")
        self.limit, self.burst, self.ttl = limit, burst, ttl


def test_bind_builds_the_plugin_from_typed_options():
    problems: list[str] = []
    plugin = bind(Limiter, {"limit": "10/second", "ttl": "5s"}, where="p", problems=problems, label="lim")
    assert problems == [] and plugin.limit == Rate(10, 1) and plugin.ttl == 5.0


def test_bind_reports_every_problem():
    problems: list[str] = []
    assert bind(Limiter, {"limt": "1/s", "burst": "ten"}, where="p[0]", problems=problems, label="lim") is None
    assert problems == [
        "p[0] (lim): unknown option 'limt', did you mean 'limit'?",
        "p[0] (lim): burst: expected an integer, found 'ten' (string)",
        "p[0] (lim): missing required option 'limit' (a rate like '100/minute')",
    ]
    problems = []
    bind(Limiter, {"limit": "1/s", "burst": 500}, where="p[0]", problems=problems, label="lim")
    assert problems == ["p[0] (lim): burst must be at most 100"]
