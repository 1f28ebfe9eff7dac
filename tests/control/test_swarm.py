"""The swarm runtime: `mesh up --runtime swarm`, `mesh ps`, `mesh down` against the local engine's swarm.

The pure parts (each task's firewall, the Swarm service asked for, the bundle of
mesh.toml's folder, what the runtime refuses, the sidecar's DNS registry) run
without an engine. The rest needs one: when it is not in swarm mode, `mesh up`
refuses, naming the command that fixes it; then the module makes it a one-node
swarm (``docker swarm init --advertise-addr 127.0.0.1``) only if it is not a
manager already, and leaves the swarm at the end only if it made it. A
two-service mesh (``web`` exposed, calling ``back``, two replicas, by name)
comes up from images FROM mesh/base, is called through web's port on
127.0.0.1, loses a task without losing a request, and `mesh down` removes
every service, network, secret and config it made: checked by the ids recorded
while it ran. Whatever happens, what the tests made goes, by id.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh import config
from mesh.control.docker.layout import ADMIN_PORT, MESH_PORT, PUBLIC_PORT
from mesh.control.runtimes import RUNTIMES, get_runtime
from mesh.control.runtimes.swarm import SwarmRuntime
from mesh.control.swarm import engine
from mesh.control.swarm.firewall import task_rules
from mesh.control.swarm.instances import swarm_instance
from mesh.control.swarm.layout import KINDS, PROBE_GID, SIDECAR_UID, Record, service_name
from mesh.control.swarm.redis import redis_egress, redis_problems, redis_wanted
from mesh.control.swarm.rollout import sidecar_view
from mesh.control.swarm.scaling import AppCpu, app_group, free_slot
from mesh.control.swarm.services import BUNDLE_LIMIT, ServiceInputs, bundle, service_spec
from mesh.control.swarm.task import app_user, unpack
from mesh.sidecar.dns_registry import DnsName, DnsRegistry, parse_names, serving
from mesh.sidecar.registry import Registry

from ..docker_support import base_image, docker_engine  # noqa: F401
from ..harness import Load, Mesh, app, docker_build, fetch, free_port, unique_name, wait_until

MESH = '''
[services.web]
build = "app"
port = 8000
expose = {expose}
health = "/healthz"

[services.back]
build = "app"
port = 9000
health = "/healthz"
replicas = 2
env = {{ COLOUR = "blue" }}

[[services.back.routes]]
paths = ["/budget/*"]

[[services.back.routes.plugins]]
use = "ratelimit"
limit = "8/minute"
key = "path"
strategy = "moving-window"
storage = "redis://mesh-redis:6379/0"
storage_timeout = "5s"
on_storage_error = "deny"

[services.pool]
build = "app"
port = 7000
health = "/healthz"
scale = {{ min = 1, max = 2, cpu = 0.1, cooldown = "2s" }}

[[routes]]
from = "web"
to = "back"
paths = ["/allowed", "/allowed/*", "/budget/*"]
methods = ["GET"]

[[routes]]
from = "web"
to = "pool"
paths = ["/burn"]
methods = ["GET"]
'''

# The app of every service: /call/PATH calls back by name, /pool/PATH the pool, through the task's
# sidecar (and relays back's X-Stamp); /burn?ms=N burns N ms of CPU and answers its instance's number;
# else what it sees, as JSON. EXIT_AT_ONCE: it exits at once, with 3.
SWARM_APP = app('''
    KEYS = ["PORT", "HTTP_PROXY", "NO_PROXY", "MESH_SERVICE", "MESH_INSTANCE", "COLOUR"]

    class Handler(Base):
        def do_GET(self):
            url = urlparse(self.path)
            if url.path == "/healthz":
                return self.reply(200, b"ok")
            for prefix, service in (("/call/", "back"), ("/pool/", "pool")):
                if self.path.startswith(prefix):
                    try:
                        with urllib.request.urlopen(f"http://{service}/" + self.path[len(prefix):],
                                                    timeout=30) as response:
                            return self.relay(response.status, response.read(), response.headers.get("X-Stamp"))
                    except urllib.error.HTTPError as error:
                        return self.reply(error.code, error.read())
            if url.path == "/burn":
                end = time.process_time() + int(parse_qs(url.query).get("ms", ["0"])[0]) / 1000
                while time.process_time() < end:
                    pass
                return self.reply(200, os.environ["MESH_INSTANCE"].encode())
            self.reply(200, json.dumps({"path": self.path, "peer": self.headers.get("x-mesh-peer"),
                                        "env": {k: os.environ.get(k) for k in KEYS}}).encode())

        def relay(self, status, body, stamp):
            self.send_response(status)
            if stamp:
                self.send_header("X-Stamp", stamp)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    if os.environ.get("EXIT_AT_ONCE"):
        print("boom: this app gives up at once", flush=True)
        sys.exit(3)
    print(os.environ["MESH_SERVICE"], "listening on 0.0.0.0:%d" % int(os.environ["PORT"]), flush=True)
''', host="0.0.0.0")

# The autoscaler decides within seconds (`mesh.control.autoscale`).
SHORT = {"MESH_AUTOSCALE_WINDOW": "2", "MESH_AUTOSCALE_INTERVAL": "0.25", "MESH_AUTOSCALE_DRAIN": "0.5"}

# --- without an engine ---------------------------------------------------------------------------


def test_the_task_firewall_lets_in_only_the_sidecars_listeners() -> None:
    v4, v6 = task_rules("10.0.3.0/24", public=True)
    lines = v4.splitlines()
    assert [line for line in lines if "INPUT" in line and line.endswith("ACCEPT")] == [
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A INPUT -s 10.0.3.0/24 -p tcp --dport {MESH_PORT} -j ACCEPT",
        f"-A INPUT -p tcp --dport {PUBLIC_PORT} -j ACCEPT",
    ]
    assert lines.index("-A INPUT -p tcp -j REJECT --reject-with tcp-reset") > lines.index(
        f"-A INPUT -p tcp --dport {PUBLIC_PORT} -j ACCEPT")
    # out: other sidecars' mesh listeners, loopback (the engine's DNS); the admin port only for the probe group
    admin = (f"-A OUTPUT -o lo -p tcp --dport {ADMIN_PORT} -m owner ! --gid-owner {PROBE_GID} "
             f"-j REJECT --reject-with tcp-reset")
    for rules in (lines, v6.splitlines()):
        assert rules.index(admin) < rules.index("-A OUTPUT -o lo -j ACCEPT")
    assert f"-A OUTPUT -d 10.0.3.0/24 -p tcp --dport {MESH_PORT} -j ACCEPT" in lines
    assert lines[-3:] == ["-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset", "-A OUTPUT -j REJECT", "COMMIT"]
    assert "-A INPUT -j DROP" in v6.splitlines()
    private, _ = task_rules("10.0.3.0/24", public=False)
    assert f"--dport {PUBLIC_PORT}" not in private


def test_redis_for_ratelimit_on_swarm(tmp_path: Path) -> None:
    """A storage at mesh-redis is the mesh's own Redis, on the overlay; another address is one's own;
    either way only the sidecars of the services whose chains count there may go out to it."""
    (tmp_path / "mesh.toml").write_text('''[mesh]
name = "shop"

[services.web]
build = "app"
plugins = [{ use = "ratelimit", limit = "5/second", storage = "redis://mesh-redis:6379/0" }]

[services.api]
build = "app"

[services.back]
build = "app"

[[routes]]
from = "api"
to = "back"
plugins = [{ use = "ratelimit", limit = "5/second", storage = "redis://10.9.8.7:6380" },
           { use = "ratelimit", limit = "9/second", storage = "redis://redis.example:6379/1" }]
''')
    mesh = config.load(tmp_path)
    assert redis_wanted(mesh)
    assert redis_egress(mesh, "web", "10.0.3.0/24") == [("10.0.3.0/24", 6379)]
    assert redis_egress(mesh, "api", "10.0.3.0/24") == [(None, 6379), ("10.9.8.7", 6380)]  # the caller's chain
    assert redis_egress(mesh, "back", "10.0.3.0/24") == []
    v4, _ = task_rules("10.0.3.0/24", public=False, redis=redis_egress(mesh, "api", "10.0.3.0/24"))
    lines = v4.splitlines()
    rules = [f"-A OUTPUT -p tcp --dport 6379 -m owner --uid-owner {SIDECAR_UID} -j ACCEPT",
             f"-A OUTPUT -d 10.9.8.7 -p tcp --dport 6380 -m owner --uid-owner {SIDECAR_UID} -j ACCEPT"]
    assert all(lines.index(rule) < lines.index("-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset") for rule in rules)
    assert "--uid-owner" not in task_rules("10.0.3.0/24", public=False)[0]
    assert redis_problems(mesh) == []
    text = (tmp_path / "mesh.toml").read_text()
    (tmp_path / "mesh.toml").write_text(text.replace("mesh-redis:6379", "mesh-redis:7000").replace(
        "redis://10.9.8.7:6380", "redis+unix:///run/redis.sock") + "\n[services.mesh-redis]\nbuild = \"app\"\n")
    assert redis_problems(config.load(tmp_path)) == [
        "services.web: the Redis the mesh runs (mesh-redis) listens on 6379, not 7000",
        "the route api -> back: storage 'redis+unix:///run/redis.sock' is a unix socket, which tasks on swarm "
        "do not share; use redis://mesh-redis:6379/0 (a Redis the mesh runs) or a redis:// address",
        "services.mesh-redis: the name of the Redis the swarm runtime runs for mesh-redis: give the service "
        "another name"]


def test_not_a_swarm_manager_is_refused_with_the_fix() -> None:
    inactive = engine.swarm_problem({"Swarm": {"LocalNodeState": "inactive"}})
    assert inactive is not None and "not in swarm mode" in inactive
    assert "`docker swarm init --advertise-addr 127.0.0.1`" in inactive
    worker = engine.swarm_problem({"Swarm": {"LocalNodeState": "active", "ControlAvailable": False}})
    assert worker is not None and "worker, not a manager" in worker
    assert engine.swarm_problem({"Swarm": {"LocalNodeState": "active", "ControlAvailable": True}}) is None


def _runtime(folder: Path, toml: str) -> SwarmRuntime:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mesh.toml").write_text(toml)
    runtime = get_runtime("swarm", config.load(folder), output=lambda *_: None, on_exit=lambda *_: None,
                          run_id="r1")
    assert isinstance(runtime, SwarmRuntime)
    return runtime


def test_what_the_swarm_runtime_refuses(tmp_path: Path) -> None:
    assert "swarm" in RUNTIMES
    runtime = _runtime(tmp_path, f'''
[mesh]
name = "shop"

[services.web]
command = "python web.py"

[services.sandbox]
build = "sandbox"
instances = {{ key = "header:X-Session", sleep_after = "1m" }}

[services.api]
build = "api"
port = {MESH_PORT}
''')
    assert runtime.problems() == [
        "services.web: no 'build' or 'image' to run on the swarm runtime (it has only 'command': add "
        "build = \"folder\" with a Dockerfile FROM mesh/base)",
        "services.sandbox: keyed instances (instances = { key = ... }) do not run on the swarm runtime: one "
        "task per key needs a front that creates tasks through the engine, which mesh does not do on swarm; "
        "use --runtime process or docker",
        f"services.api.port: {MESH_PORT} is the sidecar's inside the task (it uses 15000, 15001, 15002, "
        "15080); give the app another port",
    ]


def test_plan_names_each_task_by_its_slot(tmp_path: Path) -> None:
    runtime = _runtime(tmp_path, MESH.format(expose=free_port()).replace("[services.web]", '''[mesh]
name = "shop"

[services.web]'''))
    web, back1, back2, pool1 = [swarm_instance(i) for i in runtime.plan()]
    assert [(i.label, i.index, i.slot, i.mesh_address) for i in (web, back1, back2, pool1)] == [
        ("web", 1, 1, "tasks.shop_web:15001"), ("back.1", 1, 1, "tasks.shop_back:15001"),
        ("back.2", 2, 2, "tasks.shop_back:15001"), ("pool.1", 1, 1, "tasks.shop_pool:15001")]
    assert "admin" not in back1.addresses() and back1.ports["app"] == 9000
    assert web.public_url is not None and back1.public_url is None


def _inputs(**changes: Any) -> ServiceInputs:
    inputs = ServiceInputs(
        image="sha256:" + "a" * 64, image_config={"Entrypoint": None, "Cmd": ["python3", "/app/app.py"], "User": ""},
        network="net1", subnet="10.0.3.0/24", bundle=("cfg1", "mesh-x-config"),
        tls={f: (f"id-{f}", f"mesh-x-{f}") for f in ("cert.pem", "key.pem", "ca.pem")},
        labels={"mesh.mesh": "shop"}, environment={"PORT": "8000", "MESH_INSTANCE": "1"}, start_period=30)
    for key, value in changes.items():
        setattr(inputs, key, value)
    return inputs


def test_the_swarm_service_asked_for(tmp_path: Path) -> None:
    expose = free_port()
    (tmp_path / "mesh.toml").write_text(f'[mesh]\nname = "shop"\n{MESH.format(expose=expose)}')
    mesh = config.load(tmp_path)
    web = service_spec(mesh, "web", _inputs())
    assert web["name"] == service_name("shop", "web") == "shop_web"
    assert web["endpoint_spec"] == {"Mode": "dnsrr", "Ports": [
        {"Protocol": "tcp", "PublishedPort": expose, "TargetPort": PUBLIC_PORT, "PublishMode": "host"}]}
    template = web["task_template"]
    assert template["Placement"] == {"MaxReplicas": 1}  # host mode: one task per node holds the port
    assert template["RestartPolicy"]["Condition"] == "on-failure"
    container = template["ContainerSpec"]
    assert container["Command"] == ["/opt/mesh/bin/python3", "-m", "mesh.control.swarm.task"]
    spec, dashes, *app = container["Args"]
    assert dashes == "--" and app == ["python3", "/app/app.py"]
    task = json.loads(spec)
    assert task["service"] == "web" and task["single"] is True
    sidecar = task["sidecar"]
    assert sidecar[sidecar.index("--tls") + 1] == "/run/secrets/mesh-tls"
    assert [sidecar[i + 1] for i, arg in enumerate(sidecar) if arg == "--registry-dns"] == [
        f"web=tasks.shop_web:{MESH_PORT}", f"back=tasks.shop_back:{MESH_PORT}", f"pool=tasks.shop_pool:{MESH_PORT}"]
    assert container["User"] == f"0:{PROBE_GID}" and container["CapabilityAdd"] == ["NET_ADMIN"]
    assert "MESH_INSTANCE={{.Task.Slot}}" in container["Env"]
    assert not any("PRIVATE KEY" in value or "pem" in value for value in container["Env"])
    assert {s["File"]["Name"]: (s["SecretID"], s["File"]["UID"], s["File"]["Mode"]) for s in container["Secrets"]} == {
        f"mesh-tls/{f}": (f"id-{f}", str(SIDECAR_UID), 0o400) for f in ("cert.pem", "key.pem", "ca.pem")}
    assert container["Configs"][0]["File"]["Name"] == "/mesh/bundle.tar.gz"
    assert container["Healthcheck"]["Test"][0] == "CMD" and container["Healthcheck"]["Retries"] == 2
    back = service_spec(mesh, "back", _inputs())
    assert back["mode"] == {"replicated": {"Replicas": 2}}
    assert back["endpoint_spec"] == {"Mode": "dnsrr"} and "Placement" not in back["task_template"]
    assert json.loads(back["task_template"]["ContainerSpec"]["Args"][0])["single"] is False
    assert back["update_config"]["Order"] == "start-first" and web["update_config"]["Order"] == "stop-first"
    # back calls no one (but itself): it resolves only its own tasks
    sidecar = json.loads(back["task_template"]["ContainerSpec"]["Args"][0])["sidecar"]
    assert [sidecar[i + 1] for i, arg in enumerate(sidecar) if arg == "--registry-dns"] == [
        f"back=tasks.shop_back:{MESH_PORT}"]
    # a failed update rolls back as it rolls out; the replica count is the pool's of the moment
    assert back["update_config"]["FailureAction"] == "rollback"
    assert (back["rollback_config"]["Order"], web["rollback_config"]["Order"]) == ("start-first", "stop-first")
    assert service_spec(mesh, "pool", _inputs(replicas=2))["mode"] == {"replicated": {"Replicas": 2}}
    assert service_spec(mesh, "pool", _inputs())["mode"] == {"replicated": {"Replicas": 1}}
    labelled = service_spec(mesh, "back", _inputs(version="0123456789ab"))["task_template"]["ContainerSpec"]
    assert labelled["Labels"] == {"mesh.mesh": "shop", "mesh.config-version": "0123456789ab"}
    assert "mesh.config-version" not in container["Labels"]


class _Nodes:
    """What `engine.swarm_problems` asks of an engine: a manager of ``nodes`` ready nodes."""

    def __init__(self, nodes: int) -> None:
        self.api = self
        self.count = nodes

    def info(self) -> dict[str, Any]:
        return {"Swarm": {"LocalNodeState": "active", "ControlAvailable": True}}

    def nodes(self) -> list[dict[str, Any]]:
        return [{"Status": {"State": "ready"}}] * self.count


def test_an_exposed_service_needs_a_node_per_task(tmp_path: Path) -> None:
    (tmp_path / "mesh.toml").write_text('''[mesh]
name = "shop"

[services.web]
build = "app"
expose = 8080
scale = { min = 1, max = 3 }

[services.back]
build = "app"
replicas = 4
''')
    mesh = config.load(tmp_path)
    assert engine.swarm_problems(_Nodes(1), mesh) == [  # type: ignore[arg-type]
        "services.web: expose publishes on each node running a task (host mode, one task per node), so "
        "scale.max = 3 needs 3 nodes; this swarm has 1 ready"]
    assert engine.swarm_problems(_Nodes(3), mesh) == []  # type: ignore[arg-type]


def test_the_slot_a_new_task_gets() -> None:
    assert free_slot(set()) == 1
    assert free_slot({1, 2}) == 3
    assert free_slot({1, 3}) == 2  # Swarm fills the lowest free slot


def _process(proc: Path, pid: int, argv: list[str], *, parent: int, group: int,
             ticks: tuple[int, int, int, int] = (0, 0, 0, 0), children: tuple[int, ...] = ()) -> None:
    folder = proc / str(pid)
    (folder / "task" / str(pid)).mkdir(parents=True)
    (folder / "task" / str(pid) / "children").write_text(" ".join(map(str, children)) + " ")
    (folder / "cmdline").write_bytes(b"\0".join(arg.encode() for arg in argv) + b"\0")
    (folder / "stat").write_text(f"{pid} ({Path(argv[0]).name}) S {parent} {group} {group} 0 -1 0 0 0 0 0 "
                                 + " ".join(map(str, ticks)) + " 20 0 1 0")
    (folder / "cgroup").write_text("12:cpu,cpuacct:/docker/c0ffee\n")


def test_the_cpu_of_a_tasks_app_is_its_process_group(tmp_path: Path) -> None:
    """docker-init, the supervisor, the sidecar (its own group) and the app with a child: only the
    app's group counts, its reaped children included."""
    proc = tmp_path / "proc"
    _process(proc, 100, ["/sbin/docker-init", "--"], parent=1, group=100, children=(101,))
    _process(proc, 101, ["/opt/mesh/bin/python3", "-m", "mesh.control.swarm.task"], parent=100, group=100,
             ticks=(900, 100, 0, 0), children=(102, 103))
    _process(proc, 102, ["/opt/mesh/bin/python3", "/opt/mesh/bin/mesh", "sidecar", "--service", "pool"],
             parent=101, group=102, ticks=(700, 0, 0, 0))
    _process(proc, 103, ["python3", "/app/app.py"], parent=101, group=103, ticks=(150, 50, 30, 20), children=(104,))
    _process(proc, 104, ["ffmpeg"], parent=103, group=103, ticks=(40, 10, 0, 0))
    assert app_group(100, "c0ffee", proc) == 103
    assert app_group(100, "another", proc) is None  # not that container's: another PID namespace
    assert app_group(999, "c0ffee", proc) is None

    class Engine:
        api = None

        def inspect_container(self, container: str) -> dict[str, Any]:
            return {"State": {"Running": True, "Pid": 100}}

    client = Engine()
    client.api = client  # type: ignore[assignment]
    ticks = os.sysconf("SC_CLK_TCK")
    assert AppCpu(proc).seconds(client, "c0ffee") == pytest.approx(300 / ticks)  # type: ignore[arg-type]


def test_a_reload_updates_the_services_whose_sidecars_see_a_change(tmp_path: Path) -> None:
    files = {"plugins/tag.py": "from mesh import Plugin\n\nclass Tag(Plugin):\n    pass\n",
             "keys/jwks.json": "{}"}
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    toml = '''[mesh]
name = "shop"
plugin_path = ["plugins"]

[services.web]
build = "app"
plugins = [{ use = "tag.py:Tag" }]

[services.back]
build = "app"
env = { COLOUR = "blue" }

[services.pool]
build = "app"

[[routes]]
from = "web"
to = "back"
paths = ["/a"]
'''

    def views(text: str) -> dict[str, str]:
        (tmp_path / "mesh.toml").write_text(text)
        mesh = config.load(tmp_path)
        return {name: sidecar_view(mesh, name) for name in mesh.services}

    def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
        return {name for name in before if before[name] != after[name]}

    first = views(toml)
    assert views(toml) == first
    assert changed(first, views(toml.replace('"blue"', '"green"'))) == {"back"}
    assert changed(first, views(toml.replace('paths = ["/a"]', 'paths = ["/a", "/b"]'))) == {"web", "back"}
    assert changed(first, views(toml.replace("[services.pool]", "[services.pool]\ntimeout = \"3s\""))) == {"pool"}
    (tmp_path / "plugins/tag.py").write_text(files["plugins/tag.py"] + "# edited\n")
    assert changed(first, views(toml)) == {"web"}  # the only one with a plugin from plugin_path
    edited = views(toml)
    (tmp_path / "keys/jwks.json").write_text('{"keys": []}')
    assert changed(edited, views(toml)) == {"web", "back", "pool"}  # a file any plugin may read


def test_the_bundle_is_the_folder_of_mesh_toml_without_its_state(tmp_path: Path) -> None:
    (tmp_path / "mesh.toml").write_text('[mesh]\nname = "shop"\n[services.web]\nbuild = "app"\n')
    for path, text in {"app/app.py": "print()", "plugins/stamp.py": "X = 1", "keys/jwks.json": "{}",
                       ".mesh/shop/ca/ca.key": "SECRET", "plugins/__pycache__/stamp.cpython-311.pyc": "x"}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    mesh = config.load(tmp_path)
    packed = bundle(mesh)
    assert packed == bundle(mesh)  # the same files, the same bytes: the same Docker config
    with tarfile.open(fileobj=io.BytesIO(packed), mode="r:gz") as archive:
        assert sorted(archive.getnames()) == ["keys/jwks.json", "mesh.toml", "plugins/stamp.py"]
    unpack(packed, tmp_path / "out", owner=None)
    assert (tmp_path / "out" / "plugins" / "stamp.py").read_text() == "X = 1"
    (tmp_path / "big.bin").write_bytes(os.urandom(BUNDLE_LIMIT + 1))
    with pytest.raises(ValueError, match="more than a Docker config holds"):
        bundle(mesh)


def test_unpack_refuses_what_leaves_its_folder(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as archive:
        info = tarfile.TarInfo("../escape")
        archive.addfile(info, io.BytesIO(b""))
    with pytest.raises(ValueError, match="unexpected entry"):
        unpack(raw.getvalue(), tmp_path / "out", owner=None)
    assert not (tmp_path / "escape").exists()


def test_the_apps_user_from_its_image() -> None:
    assert app_user("")[:2] == (0, 0)
    assert app_user("root")[:2] == (0, 0)
    assert app_user("4242")[:2] == (4242, 0)
    assert app_user("4242:4343")[:2] == (4242, 4343)


def test_the_record_of_what_a_run_made(tmp_path: Path) -> None:
    record = Record.load(tmp_path)
    record.add("services", "s1")
    record.add("secrets", "x1")
    record.add("secrets", "x1")
    record.discard("services", "s1")
    assert Record.load(tmp_path).ids == {"services": [], "networks": [], "secrets": ["x1"], "configs": []}
    assert Record.load(tmp_path / "missing").ids == {kind: [] for kind in KINDS}


# --- the sidecar's registry from DNS -------------------------------------------------------------


def test_registry_dns_names_are_checked() -> None:
    services = ["web", "back"]
    assert parse_names(["back=tasks.shop_back:15001"], services) == [DnsName("back", "tasks.shop_back", 15001)]
    for bad, said in (("back", "expected SERVICE=HOST:PORT"), ("back=tasks.x", "expected SERVICE=HOST:PORT"),
                      ("nope=tasks.x:1", "unknown service 'nope'"), ("back=h:0", "from 1 to 65535")):
        with pytest.raises(ValueError, match=said):
            parse_names([bad], services)
    with pytest.raises(ValueError, match="named twice"):
        parse_names(["back=a:1", "back=b:1"], services)


async def test_the_dns_registry_follows_the_answers() -> None:
    answers: dict[str, Any] = {"tasks.b": ["10.0.0.2:15001", "10.0.0.3:15001"], "tasks.w": []}
    now = [100.0]

    async def resolver(host: str, port: int) -> list[str]:
        answer = answers[host]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    registry = Registry({"web": ["127.0.0.1:1"], "other": ["127.0.0.1:2"]})
    watcher = DnsRegistry(registry, [DnsName("back", "tasks.b", 15001), DnsName("web", "tasks.w", 15001)],
                          resolver=resolver, stale_after=3.0, clock=lambda: now[0])
    assert await watcher.refresh() is True
    assert registry.as_dict() == {"web": [], "other": ["127.0.0.1:2"],
                                  "back": ["10.0.0.2:15001", "10.0.0.3:15001"]}
    version = registry.version
    assert await watcher.refresh() is False and registry.version == version  # the same: nothing changes
    answers["tasks.b"] = OSError("Temporary failure in name resolution")
    now[0] += 2.5
    assert await watcher.refresh() is False  # no answer: kept, for a while
    now[0] += 2.0
    assert await watcher.refresh() is False
    assert registry.instances("back") == [("10.0.0.2", 15001), ("10.0.0.3", 15001)]
    now[0] += 1.5  # unanswered for 3.5s: gone
    assert await watcher.refresh() is True and registry.instances("back") == []
    answers["tasks.b"] = ["10.0.0.4:15001"]
    assert await watcher.refresh() is True and registry.instances("back") == [("10.0.0.4", 15001)]


async def test_serving_resolves_first_and_watches_until_the_sidecar_stops() -> None:
    calls: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return [f"10.0.0.{len(calls)}:{port}"]

    registry = Registry()
    watcher = DnsRegistry(registry, [DnsName("back", "tasks.b", 15001)], every=0.01, resolver=resolver)
    seen: list[list[tuple[str, int]]] = []

    async def sidecar() -> None:
        seen.append(registry.instances("back"))  # resolved before it serves
        while len(calls) < 3:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(serving(sidecar(), watcher), 30)
    assert seen == [[("10.0.0.1", 15001)]]
    count = len(calls)
    await asyncio.sleep(0.05)
    assert len(calls) == count  # the watching stopped with it


# --- against the engine --------------------------------------------------------------------------


@pytest.mark.docker
def test_up_refuses_an_engine_not_in_swarm_mode(docker_engine: Any, tmp_path: Path) -> None:  # noqa: F811
    if engine.swarm_problem(docker_engine.info()) is None:
        pytest.skip("the engine is a swarm manager already (not made one by these tests): cannot see the refusal")
    mesh = Mesh(tmp_path, unique_name(), MESH.format(expose=free_port()), None, files=docker_build(SWARM_APP),
                engine=docker_engine)
    try:
        done = mesh.run("up", "--runtime", "swarm", timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "not in swarm mode" in done.stderr
        assert "`docker swarm init --advertise-addr 127.0.0.1`" in done.stderr
        assert not (mesh.state_dir / "state.json").exists()  # nothing started
    finally:
        assert not mesh.cleanup()


@pytest.fixture(scope="module")
def swarm(docker_engine: Any) -> Iterator[Any]:  # noqa: F811
    """The engine as a swarm manager: made one here only if it is not one, and left as it was found."""
    import docker

    made = False
    bridge_before = {n.id for n in docker_engine.networks.list(names=["docker_gwbridge"])}
    if engine.swarm_problem(docker_engine.info()) is not None:
        try:
            docker_engine.swarm.init(advertise_addr="127.0.0.1")
        except docker.errors.APIError as exc:
            pytest.skip(f"this engine cannot become a one-node swarm ({exc.explanation or exc})")
        made = True
    try:
        yield docker_engine
    finally:
        if made:
            bridges = [n.id for n in docker_engine.networks.list(names=["docker_gwbridge"])
                       if n.id not in bridge_before]
            docker_engine.swarm.leave(force=True)
            for bridge in bridges:  # made by the swarm's first task
                docker_engine.api.remove_network(bridge)


class SwarmMesh:
    """The two-service mesh on the swarm, and every Swarm object seen of it, by id."""

    def __init__(self, mesh: Mesh, client: Any) -> None:
        self.mesh = mesh
        self.client = client
        self.seen: dict[str, set[str]] = {kind: set() for kind in KINDS}

    def objects(self) -> dict[str, list[dict[str, Any]]]:
        """The mesh's services, networks, secrets and configs in the engine (by labels), all remembered."""
        found = engine.mesh_objects(self.client, self.mesh.name, str(self.mesh.state_dir.resolve()))
        for kind, items in found.items():
            self.seen[kind].update(item.get("ID") or item["Id"] for item in items)
        for kind, ids in Record.load(self.mesh.state_dir).ids.items():
            self.seen[kind].update(ids)
        return found

    def left(self) -> dict[str, list[str]]:
        """What of ``seen`` still exists."""
        import docker

        api = self.client.api
        inspect = {"services": api.inspect_service, "networks": api.inspect_network,
                   "secrets": api.inspect_secret, "configs": api.inspect_config}
        found: dict[str, list[str]] = {}
        for kind, ids in self.seen.items():
            for object_id in ids:
                try:
                    inspect[kind](object_id)
                except docker.errors.NotFound:
                    continue
                found.setdefault(kind, []).append(object_id)
        return found

    def remove_all(self) -> list[str]:
        import docker

        api = self.client.api
        failures = []
        for kind, remove in (("services", api.remove_service), ("networks", api.remove_network),
                             ("secrets", api.remove_secret), ("configs", api.remove_config)):
            deadline = time.monotonic() + 60
            for object_id in self.seen[kind]:
                while True:
                    try:
                        remove(object_id)
                        break
                    except docker.errors.NotFound:
                        break
                    except docker.errors.APIError as exc:  # still in use by tasks stopping
                        if "not found" in str(exc.explanation):  # removed meanwhile (said with a 500)
                            break
                        if time.monotonic() > deadline:
                            failures.append(f"{kind} {object_id[:12]}: {exc}")
                            break
                        time.sleep(0.5)
        return failures


@pytest.fixture(scope="module")
def running(swarm: Any, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmMesh]:
    """The mesh (web, back, pool), up in the background (`mesh up -d --runtime swarm`)."""
    mesh = Mesh(tmp_path_factory.mktemp("swarm-mesh"), unique_name(), MESH.format(expose=free_port()), None,
                files=docker_build(SWARM_APP), engine=swarm, env=SHORT)
    up = SwarmMesh(mesh, swarm)
    try:
        started = time.monotonic()
        done = mesh.run("up", "-d", "--runtime", "swarm", "--timeout", "120", timeout=300)
        up.objects()
        assert done.returncode == 0, f"mesh up -d failed:\n{done.stdout}\n{done.stderr}\n{mesh.log()}"
        print(f"\nmesh up -d --runtime swarm: {time.monotonic() - started:.1f}s")
        yield up
    finally:
        up.objects()
        failures = up.remove_all() + mesh.cleanup()
        assert not failures, f"could not remove what the tests created: {failures}"


def _instances(state: dict[str, Any], service: str) -> list[dict[str, Any]]:
    return [i for i in state["instances"] if i["service"] == service]


def _web(running: SwarmMesh) -> str:
    public = _instances(running.mesh.ps(), "web")[0]["public"]
    assert public and public.startswith("http://127.0.0.1:"), public
    return str(public)


@pytest.mark.docker
def test_calls_by_name_over_mutual_tls(running: SwarmMesh) -> None:
    web = _web(running)
    reached = set()
    for _ in range(40):  # both tasks of back, in a bounded number of calls
        status, _, body = fetch(f"{web}/call/allowed/x", timeout=30)
        assert status == 200, body
        seen = json.loads(body)
        assert seen["path"] == "/allowed/x" and seen["peer"] == "web"  # web's certificate, over mutual TLS
        assert seen["env"]["COLOUR"] == "blue" and seen["env"]["HTTP_PROXY"] == "http://127.0.0.1:15002"
        reached.add(seen["env"]["MESH_INSTANCE"])
        if reached == {"1", "2"}:
            break
    assert reached == {"1", "2"}
    status, _, body = fetch(f"{web}/call/admin", timeout=30)
    assert status == 403 and b"no route allows 'web' to call GET /admin on 'back'" in body
    status, _, body = fetch(f"{web}/who", timeout=30)  # from outside: no peer
    assert status == 200 and json.loads(body)["peer"] is None


@pytest.mark.docker
def test_ps_shows_the_services_and_their_tasks(running: SwarmMesh) -> None:
    state = running.mesh.ps()
    assert state["runtime"] == "swarm" and state["controller"]["running"] is True
    assert [(i["label"], i["state"]) for i in state["instances"]] == [
        ("web", "running"), ("back.1", "running"), ("back.2", "running"), ("pool.1", "running")]
    assert all(i["swarm"]["task_state"] == "running" and i["swarm"]["container"] for i in state["instances"])
    services = {s["service"]: s for s in state["swarm"]["services"]}
    assert {name: (s["replicas"], s["running"], len(s["tasks"])) for name, s in services.items()} == {
        "web": (1, 1, 1), "back": (2, 2, 2), "pool": (1, 1, 1), "mesh-redis": (1, 1, 1)}
    text = running.mesh.run("ps")
    assert text.returncode == 0 and "running (swarm runtime" in text.stdout


@pytest.mark.docker
def test_what_the_engine_holds(running: SwarmMesh) -> None:
    found = running.objects()
    name = running.mesh.name
    services = {s["Spec"]["Name"]: s for s in found["services"]}
    assert set(services) == {f"{name}_web", f"{name}_back", f"{name}_pool", f"{name}_mesh-redis"}
    for service in services.values():
        assert service["Spec"]["EndpointSpec"]["Mode"] == "dnsrr"
        assert service["Spec"]["Labels"]["mesh.mesh"] == name
    web_ports = services[f"{name}_web"]["Endpoint"]["Ports"]
    assert [(p["PublishMode"], p["TargetPort"]) for p in web_ports] == [("host", PUBLIC_PORT)]
    [network] = found["networks"]
    details = running.client.api.inspect_network(network["Id"])
    assert details["Driver"] == "overlay" and "encrypted" in details["Options"]
    assert details["Attachable"] is False and details["Labels"]["mesh.mesh"] == name
    assert len(found["secrets"]) == 9 and len(found["configs"]) == 1  # cert, key, CA per service; mesh.toml's folder


@pytest.mark.docker
def test_the_app_is_reachable_only_through_its_sidecar(running: SwarmMesh) -> None:
    back = _instances(running.mesh.ps(), "back")[0]
    container = running.client.containers.get(back["swarm"]["container"])
    code, output = container.exec_run(["iptables", "-S", "INPUT"])
    assert code == 0, output
    rules = output.decode().splitlines()
    assert rules[-2:] == ["-A INPUT -p tcp -j REJECT --reject-with tcp-reset", "-A INPUT -j DROP"]
    assert not any("9000" in rule for rule in rules)  # the app's port: never let in
    probe = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', 15000), timeout=3); print('open')\n"
             "except OSError as exc:\n    print(type(exc).__name__)\n")
    # the probe group (health checks, docker exec) reaches the admin port; any other group, the app's, does not
    assert container.exec_run(["python3", "-c", probe])[1].decode().strip() == "open"
    assert container.exec_run(["python3", "-c", probe], user="0:0")[1].decode().strip() == "ConnectionRefusedError"
    code, output = container.exec_run(["python3", "-c", (
        "import os\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
        "    status = open(f'/proc/{pid}/status').read()\n"
        "    caps = status.split('CapBnd:')[1].split()[0]\n"
        "    uid = status.split('Uid:')[1].split()[0]\n"
        "    if argv[:2] == [b'python3', b'/app/app.py']: print('app', uid, caps)\n"
        "    if argv[1:3] == [b'/opt/mesh/bin/mesh', b'sidecar']: print('sidecar', uid, caps)\n")])
    assert code == 0, output
    found = sorted(output.decode().split("\n")[:-1])
    # the sidecar: its own user, no capability; the app: no capability but binding low ports
    assert found == ["app 0 0000000000000400", f"sidecar {SIDECAR_UID} 0000000000000000"], found


@pytest.mark.docker
def test_ratelimit_counts_in_the_redis_the_mesh_runs(running: SwarmMesh) -> None:
    """back's two tasks share one budget per path in the mesh's Redis: 8 of 12 calls pass, wherever
    they land. Redis is one task on the overlay, publishing nothing; only sidecars reach it."""
    web = _web(running)
    path = f"/call/budget/{unique_name()}"  # a budget of its own
    statuses = [fetch(f"{web}{path}", timeout=30).status for _ in range(12)]
    assert statuses == [200] * 8 + [429] * 4
    name = running.mesh.name
    [redis] = [s for s in running.objects()["services"] if s["Spec"]["Name"] == f"{name}_mesh-redis"]
    assert redis["Spec"]["Labels"]["mesh.mesh"] == name and not redis["Endpoint"].get("Ports")
    assert redis["Spec"]["TaskTemplate"]["Networks"][0]["Aliases"] == ["mesh-redis"]
    back = _instances(running.mesh.ps(), "back")[0]
    container = running.client.containers.get(back["swarm"]["container"])
    probe = ("import socket\ntry:\n    socket.create_connection(('mesh-redis', 6379), timeout=5); print('open')\n"
             "except OSError as exc:\n    print(type(exc).__name__)\n")
    as_sidecar = container.exec_run(["python3", "-c", probe], user=f"{SIDECAR_UID}:{SIDECAR_UID}")[1].decode()
    as_app = container.exec_run(["python3", "-c", probe], user="0:0")[1].decode()
    assert (as_sidecar.strip(), as_app.strip()) == ("open", "ConnectionRefusedError")


@pytest.mark.docker
def test_a_killed_task_is_replaced_and_no_request_is_lost(running: SwarmMesh) -> None:
    web = _web(running)
    back = _instances(running.mesh.ps(), "back")
    victim = back[0]["swarm"]
    statuses: list[int] = []
    deadline = time.monotonic() + 60
    killed = False
    replaced = False
    while time.monotonic() < deadline and len(statuses) < 400:
        status, _, body = fetch(f"{web}/call/allowed/x", timeout=30)
        statuses.append(status)
        assert status == 200, (len(statuses), body)
        if not killed and len(statuses) >= 5:
            running.client.api.kill(victim["container"])
            killed = True
        if killed and len(statuses) % 10 == 0:
            now = {i["label"]: i["swarm"] for i in _instances(running.mesh.ps(), "back")}
            replaced = now["back.1"]["task"] != victim["task"] and now["back.1"]["task_state"] == "running"
            if replaced:
                break
    assert killed and replaced, f"back.1 not replaced after {len(statuses)} calls"
    wait_until(lambda: all(i["state"] == "running" for i in running.mesh.ps()["instances"]), timeout=60,
               what="every instance running again")


@pytest.mark.docker
def test_a_pool_scales_its_swarm_service_on_cpu(running: SwarmMesh) -> None:
    """Under load through web, the pool's app burns CPU (read from /proc): one more replica, serving;
    without load, that task alone is stopped and the count goes back to one."""
    web = _web(running)
    first = _instances(running.mesh.ps(), "pool")
    assert [(i["label"], i["state"], i["swarm"]["slot"]) for i in first] == [("pool.1", "running", 1)]
    load = Load(f"{web}/pool/burn?ms=200", requests=400, seconds=60, clients=2, timeout=30).start()
    seen: dict[str, Any] = {}

    def scaled() -> bool:
        seen["state"] = running.mesh.ps()
        return [i["state"] for i in _instances(seen["state"], "pool")] == ["running", "running"]

    try:
        wait_until(scaled, timeout=75, every=0.5, what=running.mesh.log)
        # Checked while the load still holds the CPU up: without it the pool may scale down at once.
        answered = set()
        for _ in range(40):  # both tasks serve, in a bounded number of calls
            status, _, body = fetch(f"{web}/pool/burn?ms=1", timeout=30)
            assert status == 200, body
            answered.add(body.decode())
            if answered == {"1", "2"}:
                break
        assert answered == {"1", "2"}
    finally:
        load.stop()
    log = running.mesh.log()
    added = [line for line in log.splitlines() if "adding pool.2" in line]
    assert added and "pool: average CPU " in added[0] and " over 2s across 1 instance > 0.1" in added[0], log
    state = seen["state"]
    pool = {i["label"]: i["swarm"] for i in _instances(state, "pool")}
    assert pool["pool.2"]["slot"] == 2 and pool["pool.2"]["task_state"] == "running"
    assert pool["pool.1"]["task"] == first[0]["swarm"]["task"]  # untouched: only the count changed
    assert {s["service"]: s["replicas"] for s in state["swarm"]["services"]}["pool"] == 2

    # No load: below 0.05 for the 2s cooldown; pool.2's task (the newest) is the one that goes.
    wait_until(lambda: "pool.2: stopped (scaled down)" in running.mesh.log(), timeout=60, every=0.5,
               what=running.mesh.log)
    state = running.mesh.ps()
    assert [(i["label"], i["state"], i["swarm"]["task"]) for i in _instances(state, "pool")] == [
        ("pool.1", "running", first[0]["swarm"]["task"])]
    service = next(s for s in state["swarm"]["services"] if s["service"] == "pool")
    assert (service["replicas"], service["running"]) == (1, 1)
    answer = fetch(f"{web}/pool/burn?ms=1", timeout=30)
    assert (answer.status, answer.body) == (200, b"1")
    print(f"\nrequests sent: {load.sent}; {added[0]}")


class Calls:
    """Calls through web to back on a thread, one after the other, until stopped (at most 240s or 3000
    calls): each call's status and, when answered, back's colour and stamp."""

    def __init__(self, web: str) -> None:
        self.web = web
        self.answers: list[tuple[int, str | None, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + 240
        while not self._stop.is_set() and time.monotonic() < deadline and len(self.answers) < 3000:
            answer = fetch(f"{self.web}/call/allowed/x", timeout=30)
            try:
                colour = answer.json()["env"]["COLOUR"]
            except (ValueError, KeyError):
                colour = answer.body.decode(errors="replace")
            self.answers.append((answer.status, colour, answer.headers.get("X-Stamp")))

    def __enter__(self) -> Calls:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def _reload(running: SwarmMesh, old: str, new: str) -> tuple[subprocess.CompletedProcess[str], Calls]:
    """mesh.toml with ``old`` made ``new``, then `mesh reload` under steady calls to back."""
    toml = running.mesh.folder / "mesh.toml"
    text = toml.read_text()
    assert old in text
    toml.write_text(text.replace(old, new))
    with Calls(_web(running)) as calls:
        wait_until(lambda: len(calls.answers) >= 3, timeout=60, what="the first calls")
        done = running.mesh.run("reload", timeout=330)
        count = len(calls.answers)
        wait_until(lambda: len(calls.answers) >= count + 3, timeout=60,
                   what=lambda: f"calls after the reload: {calls.answers[-5:]}\n{done.stdout}{done.stderr}")
    return done, calls


@pytest.mark.docker
def test_reload_rolls_only_the_changed_service(running: SwarmMesh) -> None:
    """back's env and plugins change: its tasks are replaced one at a time, a new one first, while
    calls to it keep succeeding; web's and pool's tasks keep running the version they ran."""
    before = running.mesh.ps()
    tasks = {i["label"]: i["swarm"]["task"] for i in before["instances"]}
    assert {i["version"] for i in before["instances"]} == {before["version"]}
    done, calls = _reload(running, 'env = { COLOUR = "blue" }', 'env = { COLOUR = "green" }\n'
                          'plugins = [{ use = "mesh_plugins.stamp:Stamp", value = "reloaded" }]')
    assert done.returncode == 0, done.stdout + done.stderr + running.mesh.log()
    assert "; updated back" in done.stdout, done.stdout
    assert {status for status, _, _ in calls.answers} == {200}, calls.answers
    assert calls.answers[0][1:] == ("blue", None) and calls.answers[-1][1:] == ("green", "reloaded")
    after = running.mesh.ps()
    assert after["version"] != before["version"] and after["reload"]["error"] is None
    for inst in after["instances"]:
        changed = inst["service"] == "back"
        assert inst["state"] == "running"
        assert (inst["swarm"]["task"] != tasks[inst["label"]]) is changed, inst
        assert inst["version"] == (after["version"] if changed else before["version"]), inst
    back = next(s for s in running.objects()["services"] if s["Spec"]["Labels"]["mesh.service"] == "back")
    assert back["UpdateStatus"]["State"] == "completed"
    assert len(running.objects()["configs"]) == 2  # web's and pool's folder, and back's new one


@pytest.mark.docker
def test_a_failed_reload_is_rolled_back(running: SwarmMesh) -> None:
    """back's new tasks exit at once: Swarm rolls the update back, `mesh reload` fails saying so, and
    back's tasks, calls and version are those from before."""
    before = running.mesh.ps()
    tasks = {i["label"]: i["swarm"]["task"] for i in before["instances"]}
    colour = 'env = { COLOUR = "green" }'
    done, calls = _reload(running, colour, 'env = { COLOUR = "green", EXIT_AT_ONCE = "1" }')
    assert done.returncode == 1, done.stdout + done.stderr
    assert "mesh reload: not applied, the mesh serves the version it served" in done.stderr, done.stderr
    assert "back: the rolling update failed and was rolled back" in done.stderr, done.stderr
    assert {status for status, _, _ in calls.answers} == {200}, calls.answers
    after = running.mesh.ps()
    assert after["version"] == before["version"] and after["reload"]["error"]
    assert {i["label"]: (i["swarm"]["task"], i["version"]) for i in after["instances"]} == {
        i["label"]: (tasks[i["label"]], i["version"]) for i in before["instances"]}


@pytest.mark.docker
def test_down_removes_everything_it_made(running: SwarmMesh) -> None:
    before = running.objects()
    assert all(before[kind] for kind in KINDS), before
    done = running.mesh.run("down", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert running.left() == {}
    assert not any(engine.mesh_objects(running.client, running.mesh.name,
                                       str(running.mesh.state_dir.resolve())).values())
    assert Record.load(running.mesh.state_dir).ids == {kind: [] for kind in KINDS}
    state = running.mesh.ps()
    assert state["controller"]["running"] is False
    assert {i["state"] for i in state["instances"]} == {"stopped"}
