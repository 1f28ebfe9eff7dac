"""mesh.toml: every problem reported at once, each with its key path, found and expected."""

from __future__ import annotations

import pytest

from mesh import ConfigError, Duration, config


def load_text(tmp_path, text: str):
    (tmp_path / "mesh.toml").write_text(text)
    return config.load(tmp_path)


def problems_of(tmp_path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value.problems


GOOD = """
[mesh]
name = "shop"

[services.web]
command = "python web.py"
expose = 8080
health = "/healthz"
env = { LOG_LEVEL = "info" }
plugins = [ { use = "stamp", value = "x" } ]
timeout = "2s"

[services.convert]
command = "python convert.py"
scale = { min = 1, max = 4, cpu = 0.75 }

[services.sandbox]
command = "python sandbox.py"
instances = { key = "header:X-Session", sleep_after = "1m", max = 100 }

[[routes]]
from = "web"
to = "convert"
paths = ["/gif", "/gif/*"]
methods = ["post"]
timeout = "30s"
"""


def test_a_good_file_loads(tmp_path):
    cfg = load_text(tmp_path, GOOD)
    assert cfg.name == "shop" and list(cfg.services) == ["web", "convert", "sandbox"]
    web = cfg.services["web"]
    assert web.expose == 8080 and web.env == {"LOG_LEVEL": "info"} and web.timeout == 2.0
    assert web.plugin_specs[0].use == "stamp" and web.plugin_specs[0].create().value == "x"
    assert cfg.services["convert"].scale.max == 4
    assert cfg.services["sandbox"].instances.sleep_after == Duration(60)
    route = cfg.routes[0]
    assert (route.source, route.to, route.methods, route.timeout) == ("web", "convert", ["POST"], 30.0)


def test_every_problem_is_reported_at_once(tmp_path):
    problems = problems_of(tmp_path, """
[mesh]
nmae = "x"
[services.web]
command = "w"
prot = 80
expose = "eighty"
plugins = [ { use = "stamp", valeu = "x" }, { use = "nosuch" }, { value = 1 } ]
[services.api]
command = "a"
[[routes]]
from = "web"
to = "orders"
[[routes]]
from = "web"
to = "api"
methods = ["FETCH"]
timeout = "soon"
""")
    text = "\n".join(problems)
    assert "mesh: unknown option 'nmae', did you mean 'name'?" in problems
    assert "services.web: unknown option 'prot', did you mean 'port'?" in problems
    assert "services.web.expose: expected an integer, found 'eighty' (string)" in problems
    assert ("services.web.plugins[0] (stamp): unknown option 'valeu', did you mean 'value'?"
            in problems)
    assert "services.web.plugins[1]: unknown plugin 'nosuch'" in text
    assert "services.web.plugins[2]: expected a 'use' key" in text
    assert "routes[0].to: unknown service 'orders'" in text
    assert "routes[1].methods[0]: unknown HTTP method 'FETCH'" in problems
    assert "routes[1].timeout: expected a duration" in text
    assert len(problems) == 9


def test_typo_in_route_from_is_named_as_from(tmp_path):
    problems = problems_of(tmp_path, """
[services.web]
command = "w"
[[routes]]
to = "web"
""")
    assert problems == ["routes[0].from: missing, expected a string"]


def test_bad_toml_says_where(tmp_path):
    problems = problems_of(tmp_path, "[services.web\ncommand = 1\n")
    assert len(problems) == 1 and "not valid TOML" in problems[0] and "line 1" in problems[0]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path / "nowhere.toml")
    assert "no such file" in info.value.problems[0]


@pytest.mark.parametrize("table, expected", [
    ('[services.web]\n', "services.web: expected 'command'"),
    ('[services.web]\ncommand = "x"\nexpose = 70000\n', "services.web.expose: expected a port"),
    ('[services.web]\ncommand = "x"\nhealth = "healthz"\n', "services.web.health: expected a path"),
    ('[services.Web]\ncommand = "x"\n', "services.Web: a service name"),
    ('[services.web]\ncommand = "x"\nscale = { min = 3, max = 1 }\n',
     "services.web.scale: expected 0 <= min <= max, found min=3, max=1"),
    ('[services.web]\ncommand = "x"\ninstances = { key = "cookie:x" }\n',
     "services.web.instances: key: expected 'header:NAME'"),
    ('[services.web]\ncommand = "x"\nexpose = 8080\n[services.api]\ncommand = "y"\nexpose = 8080\n',
     "services.api.expose: port 8080 is already exposed by services.web"),
    ('[service.web]\ncommand = "x"\n', "service: unknown top-level key, did you mean 'services'?"),
    ('[mesh]\nplugin_path = ["nope"]\n[services.web]\ncommand = "x"\n', "mesh.plugin_path[0]: no such folder"),
    ('[services.web]\ncommand = "x"\nplugins = [ { use = "stamp", value = 3 } ]\n',
     "services.web.plugins[0] (stamp): value: expected a string, found 3 (integer)"),
])
def test_single_problems(tmp_path, table, expected):
    problems = problems_of(tmp_path, table)
    assert any(expected in p for p in problems), problems


def test_user_plugins_load_from_plugin_path(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "tag.py").write_text(
        "from mesh import Plugin, Duration\n"
        "class Tag(Plugin):\n"
        "    def __init__(self, name: str, wait: Duration = Duration(1)):\n"
        "        if not name: raise ValueError('name must not be empty')\n"
        "        self.name, self.wait = name, wait\n")
    cfg = load_text(tmp_path, """
[mesh]
plugin_path = ["plugins"]
[services.web]
command = "x"
plugins = [ { use = "tag.py:Tag", name = "a", wait = "250ms" } ]
""")
    plugin = cfg.services["web"].plugin_specs[0].create()
    assert plugin.name == "a" and plugin.wait == 0.25
    problems = problems_of(tmp_path, """
[mesh]
plugin_path = ["plugins"]
[services.web]
command = "x"
plugins = [ { use = "tag.py:Tag", name = "" }, { use = "tag.py:Nope" }, { use = "other.py:X" } ]
""")
    assert "services.web.plugins[0] (tag.py:Tag): name must not be empty" in problems
    assert any("no class 'Nope'" in p for p in problems)
    assert any("other.py not found on plugin_path" in p for p in problems)


def test_a_plugin_file_that_fails_to_import_is_a_problem_not_a_crash(tmp_path):
    (tmp_path / "bad.py").write_text("raise RuntimeError('broken at import')\n")
    problems = problems_of(tmp_path, """
[mesh]
plugin_path = ["."]
[services.web]
command = "x"
plugins = [ { use = "bad.py:Bad" } ]
""")
    assert "RuntimeError: broken at import" in problems[0]


def test_short_names_never_come_from_plugin_path(tmp_path):
    # A file named like a first-party plugin must not shadow it.
    (tmp_path / "stamp.py").write_text("raise RuntimeError('shadowed')\n")
    cfg = load_text(tmp_path, '[mesh]\nplugin_path = ["."]\n[services.web]\ncommand = "x"\n'
                              'plugins = [ { use = "stamp" } ]\n')
    assert type(cfg.services["web"].plugin_specs[0].create()).__module__ == "mesh_plugins.stamp"
