"""Restarts, exits and lifecycle hooks (mesh.lifecycle), with a controller run in this process
on the process runtime. Every process a test starts is recorded by its mesh (tests/harness.py)
and killed at teardown (by its process group) if it is still there."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from mesh import config
from mesh.control.runtimes.procfs import pid_alive
from mesh.control.supervisor import Supervisor
from mesh.errors import ConfigError
from mesh.lifecycle import Lifecycle, load_lifecycle

from ..harness import MeshMaker, eventually, fetch, free_port

HOOKS = '''
import json, os
from mesh.lifecycle import Lifecycle

EVENTS = os.path.join(os.path.dirname(__file__), "events.jsonl")

def note(**event):
    with open(EVENTS, "a") as f:
        f.write(json.dumps(event) + "\\n")

class Record(Lifecycle):
    async def on_start(self, instance):
        note(hook="on_start", label=instance.label)

    async def on_stop(self, instance, exit_code, reason):
        note(hook="on_stop", label=instance.label, code=exit_code, reason=reason)

    async def on_error(self, instance, error):
        note(hook="on_error", label=instance.label, error=error)

class Broken:
    async def on_start(self, instance):
        raise RuntimeError("hook exploded")

    async def on_stop(self, instance, exit_code, reason):
        raise RuntimeError("stop hook exploded")
'''


# restarts


@pytest.mark.slow
async def test_a_killed_app_is_restarted_and_serves(make_mesh: MeshMaker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mesh")
    port = free_port()
    mesh = make_mesh("restart", f'\n[services.web]\ncommand = "python app.py"\nexpose = {port}\n')
    await mesh.start()
    answer = fetch(f"http://127.0.0.1:{port}/")
    assert answer.status == 200, answer.body
    before = mesh.instance("web")
    assert before["restarts"] == 0
    os.kill(before["pids"]["app"], signal.SIGKILL)

    def restarted() -> bool:
        now = mesh.instance("web")
        return now["restarts"] == 1 and now["state"] == "running" and now["problem"] is None
    await eventually(restarted, what=lambda: caplog.text + mesh.out.getvalue())
    after = mesh.instance("web")
    assert after["pids"]["app"] != before["pids"]["app"]
    assert after["pids"]["sidecar"] == before["pids"]["sidecar"]  # the sidecar kept running
    assert not pid_alive(before["pids"]["app"])
    answer = await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/")
    assert answer.status == 200, answer.body
    assert "web: the app exited with code -9 (killed by SIGKILL)" in caplog.text
    assert "web: restarting its app in 0.5s (restart 1)" in caplog.text
    assert "web: restarted (restart 1)" in caplog.text
    await mesh.stop()
    mesh.assert_all_gone()


@pytest.mark.slow
async def test_an_app_that_exits_0_is_not_restarted_and_its_sidecar_stops(
        make_mesh: MeshMaker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mesh")
    mesh = make_mesh("batch", '[services.job]\ncommand = "python app.py"\n'
                              'env = { EXIT_AFTER = "2", EXIT_CODE = "0" }\n\n'
                              '[services.web]\ncommand = "python app.py"\n')
    await mesh.start()
    sidecar = mesh.instance("job")["pids"]["sidecar"]
    await eventually(lambda: mesh.instance("job")["state"] == "exited", what="job exited")
    await eventually(lambda: not pid_alive(sidecar), what="job's sidecar stopped")
    job = mesh.instance("job")
    assert job["restarts"] == 0 and job["problem"] == "app exited with code 0"
    await asyncio.sleep(1.0)  # no restart comes
    assert mesh.instance("job")["restarts"] == 0 and not pid_alive(mesh.instance("job")["pids"]["app"])
    assert mesh.controller.registry()["job"] == []
    assert mesh.instance("web")["state"] == "running"
    assert mesh.controller.phase == "running"
    assert "job: the app exited with code 0 (done on purpose): not restarted" in caplog.text
    assert "job: sidecar stopped" in caplog.text
    # `mesh ps` (status) keeps it as exited, not stopped, while the controller runs
    from mesh.control.state import status
    mesh.controller.instances.save()
    listed = {i["label"]: i for i in status(mesh.controller.config)["instances"]}
    assert listed["job"]["state"] == "exited" and listed["web"]["state"] == "running"
    await mesh.stop()
    mesh.assert_all_gone()


async def test_backoff_doubles_caps_and_resets() -> None:
    class Fake:
        config = type("C", (), {"services": {}, "plugin_path": []})()

    sup = Supervisor(Fake())  # type: ignore[arg-type]
    delays = [sup._delay("x") for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    sup._up_since["x"] = -1e9  # up for ages: starts over
    assert sup._delay("x") == 0.5


# hooks


def test_lifecycle_is_checked_at_config_load(tmp_path: Path) -> None:
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "h.py").write_text(HOOKS + "\nclass NotAsync:\n    def on_start(self, i):\n        pass\n")
    base = '[mesh]\nname = "x"\nplugin_path = ["hooks"]\n[services.a]\ncommand = "true"\nlifecycle = "{}"\n'
    for use, expected in [("h.py:Missing", "no class 'Missing'"), ("nope.py:Record", "nope.py not found"),
                          ("h.py:NotAsync", "on_start must be 'async def'"), ("h.py", "expected 'file.py:Class'")]:
        (tmp_path / "mesh.toml").write_text(base.format(use))
        with pytest.raises(ConfigError) as caught:
            config.load(tmp_path)
        assert any(p.startswith("services.a.lifecycle: ") and expected in p for p in caught.value.problems), \
            caught.value.problems
    (tmp_path / "mesh.toml").write_text(base.format("h.py:Record"))
    assert config.load(tmp_path).services["a"].lifecycle == "h.py:Record"
    cls = load_lifecycle("h.py:Record", [tmp_path / "hooks"])
    assert issubclass(cls, Lifecycle)


async def test_default_hooks() -> None:
    hooks = Lifecycle()
    assert await hooks.on_idle(None) == "sleep"  # type: ignore[arg-type]
    assert hooks.choose_instance(None, [1, 2]) is None


@pytest.mark.slow
async def test_hooks_are_called_and_a_raising_hook_is_contained(
        make_mesh: MeshMaker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mesh")
    port = free_port()
    mesh = make_mesh("hooks", f'''plugin_path = ["hooks"]

[services.job]
command = "python app.py"
env = {{ EXIT_AFTER = "3", EXIT_CODE = "0" }}
lifecycle = "record.py:Record"

[services.flaky]
command = "python app.py"
env = {{ EXIT_AFTER = "3", EXIT_CODE = "3" }}
lifecycle = "record.py:Record"

[services.web]
command = "python app.py"
expose = {port}
lifecycle = "record.py:Broken"
''', files={"hooks/record.py": HOOKS})
    events_file = mesh.folder / "hooks" / "events.jsonl"
    await mesh.start()

    def events() -> list[dict[str, Any]]:
        if not events_file.exists():
            return []
        return [json.loads(line) for line in events_file.read_text().splitlines()]

    await eventually(lambda: {"hook": "on_stop", "label": "job", "code": 0, "reason": "exited"} in events(),
                     what=lambda: f"job's on_stop: {events()}")
    await eventually(lambda: {"hook": "on_stop", "label": "flaky", "code": 3, "reason": "crashed"} in events(),
                     what=lambda: f"flaky's on_stop: {events()}")
    assert {"hook": "on_error", "label": "flaky", "error": "app exited with code 3"} in events()
    # flaky comes back (and exits again after 1s): on_start again after its restart
    await eventually(lambda: [e for e in events() if e == {"hook": "on_start", "label": "flaky"}][1:],
                     what=lambda: f"flaky's second on_start: {events()}")
    assert {"hook": "on_start", "label": "job"} in events()
    # web's hook raised: logged, and the mesh and web keep running
    assert "web: lifecycle hook on_start raised; carrying on" in caplog.text
    assert "hook exploded" in caplog.text
    assert mesh.controller.phase == "running"
    assert (await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/")).status == 200
    await mesh.stop()
    assert "web: lifecycle hook on_stop raised; carrying on" in caplog.text
    # the shutdown is reported to the hooks of instances that were running
    assert any(e["hook"] == "on_stop" and e["label"] == "flaky" and e["reason"] in ("shutdown", "crashed")
               for e in events())
    assert not [e for e in events() if e["label"] == "job" and e.get("reason") == "shutdown"]
    mesh.assert_all_gone()


async def test_on_idle_decides_sleep_or_keep_and_a_broken_hook_means_sleep(caplog):
    from types import SimpleNamespace

    from mesh.control.supervisor import Supervisor
    from mesh.lifecycle import Lifecycle

    class Keep(Lifecycle):
        async def on_idle(self, instance):
            return "keep"

    class Broken(Lifecycle):
        async def on_idle(self, instance):
            raise RuntimeError("hook bug")

    supervisor = Supervisor.__new__(Supervisor)
    supervisor.hooks = {"keep": Keep(), "broken": Broken(), "plain": Lifecycle()}
    instance = lambda service: SimpleNamespace(service=service, label=f"{service}.k-1")  # noqa: E731
    assert await supervisor.sleep_when_idle(instance("keep")) is False
    assert await supervisor.sleep_when_idle(instance("plain")) is True
    assert await supervisor.sleep_when_idle(instance("none")) is True
    assert await supervisor.sleep_when_idle(instance("broken")) is True
    assert "hook bug" in caplog.text
