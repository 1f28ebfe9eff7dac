"""Batch jobs (``job = true``) through `mesh up`: a job listens on no port, its sidecar carries its
calls, `mesh up` and `mesh ps` report how it ended, and it is restarted only when ``restart =
"on-failure"`` asks; services can wait for a job to finish. On the process runtime, and on Docker
(marked docker). Every process and container a mesh starts is recorded and removed at teardown."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from mesh import config
from mesh.control.runtimes.procfs import pid_alive
from mesh.errors import ConfigError

from ..docker_support import base_image, docker_engine  # noqa: F401
from ..harness import DOCKER_APP, MeshMaker, by_label, docker_build, unique_name, wait_until

pytestmark = pytest.mark.slow

# A job: says whether it has a PORT, calls http://$CALL/ through its sidecar if asked, writes $WRITE,
# fails once with code 2 if FAIL_ONCE is set, then exits with $CODE (0 by default).
JOB = '''
import os, sys, urllib.error, urllib.request

print("PORT=" + str(os.environ.get("PORT")), flush=True)
target = os.environ.get("CALL")
if target:
    try:
        with urllib.request.urlopen(f"http://{target}/from-job", timeout=30) as response:
            print(f"called {target}: {response.status}", flush=True)
    except urllib.error.HTTPError as error:
        print(f"called {target}: {error.code}", flush=True)
    except OSError as error:
        print(f"called {target}: no answer {error!r}", flush=True)
if os.environ.get("FAIL_ONCE") and not os.path.exists("failed-once"):
    open("failed-once", "w").close()
    print("the first try fails", flush=True)
    sys.exit(2)
if os.environ.get("WRITE"):
    with open(os.environ["WRITE"], "w") as f:
        f.write("done")
sys.exit(int(os.environ.get("CODE", "0")))
'''


def said(out: str, label: str, text: str) -> bool:
    """Whether ``label`` (an app, a sidecar or ``mesh``) printed a line holding ``text``."""
    return any(line.partition(" | ")[0].strip() == label and text in line.partition(" | ")[2]
               for line in out.splitlines())


def _exited(mesh: Any, *labels: str) -> dict[str, dict[str, Any]]:
    """`mesh ps --json`'s instances by label, once each of ``labels`` is exited."""
    found: dict[str, dict[str, Any]] = {}

    def done() -> bool:
        found.update(by_label(mesh.ps()))
        return all(found[label]["state"] == "exited" for label in labels)
    wait_until(done, timeout=120, what=lambda: f"{labels} exited: {found}\n{mesh.output()}")
    return found


def test_jobs_run_report_their_exit_codes_and_are_not_restarted(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("batch", """
[services.web]
command = "python app.py"

[services.report]
command = "python job.py"
job = true
env = { CALL = "web" }
depends_on = ["web"]

[services.broken]
command = "python job.py"
job = true
env = { CODE = "3" }

[[routes]]
from = "report"
to = "web"
""", files={"job.py": JOB})
    popen = mesh.up()
    mesh.wait_phase("running")
    listed = _exited(mesh, "report", "broken")
    out = mesh.output()
    assert said(out, "mesh", "job report exited with code 0") and said(out, "mesh", "job broken failed with code 3")
    assert said(out, "report", "PORT=None")  # a job listens on nothing
    assert said(out, "report", "called web: 200")  # through its sidecar, by name
    report, broken = listed["report"], listed["broken"]
    assert (report["exit_code"], report["problem"], report["restarts"]) == (0, None, 0)
    assert (broken["exit_code"], broken["problem"], broken["restarts"]) == (3, "job failed with code 3", 0)
    # their sidecars stopped with them; the rest of the mesh runs on
    wait_until(lambda: not pid_alive(report["pids"]["sidecar"]) and not pid_alive(broken["pids"]["sidecar"]))
    assert listed["web"]["state"] == "running" and mesh.ps()["phase"] == "running"
    table = mesh.run("ps").stdout
    assert "exited (code 0)" in table and "exited (job failed with code 3)" in table
    time.sleep(1.5)  # a restart would have come after 0.5 s: none does
    again = by_label(mesh.ps())
    assert again["broken"]["restarts"] == 0 and again["broken"]["state"] == "exited"
    assert "restarting" not in mesh.output()
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=60) == 0
    mesh.assert_all_gone()


def test_a_job_is_restarted_on_failure_when_asked(make_mesh: MeshMaker) -> None:
    mesh = make_mesh("flaky", """
[services.flaky]
command = "python job.py"
job = true
restart = "on-failure"
env = { FAIL_ONCE = "1" }
""", files={"job.py": JOB})
    popen = mesh.up()
    mesh.wait_phase("running")
    flaky = _exited(mesh, "flaky")["flaky"]
    assert (flaky["exit_code"], flaky["restarts"], flaky["problem"]) == (0, 1, None)
    out = mesh.output()
    assert "job flaky failed with code 2; restarting it" in out
    assert out.index("failed with code 2") < out.index("job flaky exited with code 0")
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=60) == 0
    mesh.assert_all_gone()


def test_a_service_can_wait_for_a_job_to_finish(make_mesh: MeshMaker, tmp_path: Path) -> None:
    toml = """
[services.web]
command = "python app.py"
depends_on = ["migrate"]

[services.migrate]
command = "python job.py"
job = true
env = {{ WRITE = "migrated", CODE = "{code}" }}
"""
    mesh = make_mesh("migrate", toml.format(code=0), files={"job.py": JOB}, folder=tmp_path / "ok")
    popen = mesh.up()
    mesh.wait_phase("running")
    out = mesh.output()
    assert said(out, "mesh", "web: waiting for the job migrate to finish")
    assert out.index("job migrate exited with code 0") < out.index("app web 1 serving")
    assert (mesh.folder / "migrated").read_text() == "done"
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(timeout=60) == 0
    mesh.assert_all_gone()

    failing = make_mesh("migrate", toml.format(code=3), files={"job.py": JOB}, folder=tmp_path / "failing")
    popen = failing.up()
    assert popen.wait(timeout=120) == 1
    out = failing.output()
    assert "job migrate failed with code 3" in out
    assert "mesh up: web failed to start: it depends on migrate, which failed with code 3" in out
    assert "app web 1 serving" not in out
    failing.assert_all_gone()


def test_check_refuses_what_a_job_cannot_have(tmp_path: Path) -> None:
    (tmp_path / "mesh.toml").write_text("""
[mesh]
name = "m"

[services.report]
command = "x"
job = true
port = 8000
expose = 8080
health = "/healthz"
scale = { min = 1, max = 2 }

[services.sweep]
command = "x"
job = true
instances = { key = "header:X-Key" }
restart = "always"

[services.web]
command = "x"

[[routes]]
from = "web"
to = "report"
""")
    with pytest.raises(ConfigError) as failure:
        config.load(tmp_path)
    assert failure.value.problems == [
        "services.report.port: a job (job = true) listens on no port",
        "services.report.expose: a job (job = true) listens on no port: there is nothing to expose",
        "services.report.health: a job (job = true) is ready once its sidecar is; it has no health path",
        "services.report.scale: a job (job = true) runs `replicas` copies once; it cannot be a pool",
        "services.sweep.restart: expected one of 'on-failure', 'no', found 'always' (string)",
        "routes[0].to: services.report is a job (job = true): it takes no requests",
    ]


@pytest.mark.docker
def test_a_job_on_docker(make_mesh: MeshMaker, docker_engine: Any, base_image: str) -> None:  # noqa: F811
    """Its app container starts once its sidecar is ready (its first call goes through), it listens
    on nothing, and how it ended shows in `mesh up`'s output and `mesh ps`; it is not restarted."""
    mesh = make_mesh(unique_name(), """
[services.back]
build = "app"
port = 8000
health = "/healthz"

[services.report]
build = "job"
job = true
env = { CALL = "back", CODE = "3" }
depends_on = ["back"]

[[routes]]
from = "report"
to = "back"
""", None, files={**docker_build(DOCKER_APP), **docker_build(JOB, "job")}, engine=docker_engine)
    done = mesh.run("up", "-d", "--runtime", "docker", timeout=600)
    assert done.returncode == 0, f"mesh up -d failed:\n{done.stdout}\n{done.stderr}"
    listed: dict[str, dict[str, Any]] = {}

    def exited() -> bool:
        listed.update(by_label(mesh.ps()))
        return listed["report"]["state"] == "exited"
    wait_until(exited, timeout=180, what=lambda: f"{listed}\n{mesh.log()}")
    report = listed["report"]
    assert (report["exit_code"], report["problem"], report["restarts"]) == (3, "job failed with code 3", 0)
    log = mesh.log()
    assert said(log, "report", "PORT=None") and said(log, "report", "called back: 200"), log
    assert said(log, "mesh", "job report failed with code 3")
    assert listed["back"]["state"] == "running"
    assert mesh.run("down", timeout=300).returncode == 0
