"""bench/scale.py keeps running: its whole measurement on a tiny mesh, through its command line.

The sizes are tiny so the numbers mean nothing here; what is checked is that every part still
runs against the code it measures (the controller's `_publish`, real sidecars taking pushes and
reloading certificates, `rotate_ca`, `Policy`) and that the rows it derives its verdicts from exist.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scale() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def tiny(scale: ModuleType) -> object:
    return replace(scale.Settings(), repeat=1, checks=50, sidecars=2, pushes=3, burst=4, fan_out=(6,),
                   certs=2, rotate=3, budget=10.0, policy_sizes=(20,))


def test_the_tables_are_those_of_a_mesh(scale, tmp_path):
    shape = scale.Shape(services=12, instances=3, calls=4)
    names = scale.service_names(shape.services)
    tables = scale.route_tables(names, shape.calls)
    assert len(tables) == shape.routes == 48
    assert all(t["from"] != t["to"] for t in tables)
    assert [("methods" in t, "timeout" in t) for t in tables[:5]] == [(False, False)] * 3 + [(True, False),
                                                                                              (False, True)]
    (tmp_path / "mesh.toml").write_text(scale.mesh_toml(shape))
    config = scale.load(tmp_path / "mesh.toml")
    assert len(config.services) == 12 and len(config.routes) == 48
    planned = scale.plan(config)
    assert len(planned) == shape.sidecars
    assert len({inst.mesh_address for inst in planned}) == shape.sidecars


def test_a_run_on_a_tiny_mesh_measures_every_part(scale, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(scale.Settings, "quick", classmethod(lambda cls: tiny(scale)))
    out = tmp_path / "scale.json"
    assert scale.main(["--quick", "--services", "6", "--instances", "2", "--calls", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "6 services × 2 instances = 12 sidecars" in printed
    rows = {row["name"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["instances in the registry"]["value"] == 12
    assert rows["push body"]["value"] * 1e3 == pytest.approx(12 * rows["bytes per instance"]["value"])
    assert rows["first round: took it"]["value"] == 6
    assert rows["pushes, one at a time"]["note"].startswith("0 not answered")
    assert rows["4 pushes at once: answered 204"]["value"] == 4
    oversized = next(name for name in rows if name.startswith("a push of"))
    assert rows[oversized]["value"] != 204  # past the limit a sidecar refuses the registry
    for name in ("PUT /registry handler", "Balancer refresh", "CA.issue", "InstanceSet.certificate",
                 "POST /certs/reload, wall", "rotate_ca, per instance", "check: allowed, any call",
                 "check: denied, no route (logged)", "Outbound.lookup", "controller CPU per change",
                 "controller busy with no change", "rotating the CA"):
        assert rows[name]["value"] > 0, name
    sections = {row["section"] for row in json.loads(out.read_text())["rows"]}
    assert {"policy at 12 routes", "policy at 20 routes"} <= sections


def test_fan_out_is_bounded_by_the_mesh(scale, capsys):
    with pytest.raises(SystemExit):
        scale.main(["--services", "3", "--instances", "1", "--fan-out", "4"])
    assert "--fan-out: expected numbers from 1 to 3" in capsys.readouterr().err
