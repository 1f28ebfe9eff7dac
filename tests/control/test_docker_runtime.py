"""The docker runtime: `mesh up --runtime docker`, `mesh ps`, `mesh down` against the real engine.

The pure parts (firewall rules, sizes, names, what the runtime refuses) run
without an engine. The rest starts one small two-service mesh in a temporary
folder (images FROM mesh/base, cached by Docker between runs), checks it from
the host's 127.0.0.1 and from a probe container on the mesh's own network, then
crashes its controller and brings it down. Without an engine those tests skip,
or fail when MESH_REQUIRE_DOCKER=1. Every container, network and image they
make is recorded by id and removed at the end, whatever happened.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh import config
from mesh.control.docker.firewall import firewall_rules
from mesh.control.docker.layout import ADMIN_PORT, MESH_PORT, PUBLIC_PORT, container_name, mesh_alias, network_names
from mesh.control.docker.resources import memory_bytes
from mesh.control.runtimes import get_runtime
from mesh.control.runtimes.base import StartFailed
from mesh.control.runtimes.docker import DockerRuntime
from mesh.sidecar.admin import operator_token

from ..docker_support import base_image, docker_engine  # noqa: F401
from ..harness import ATTACK, DOCKER_APP, Mesh, docker_build, fetch, free_port, unique_name, wait_until

MESH = '''
[services.front]
build = "app"
port = 8000
expose = {expose}
health = "/healthz"
cpus = 0.5
memory = "64m"

[services.back]
build = "app"
port = 9000
health = "/healthz"
env = {{ COLOUR = "blue" }}

[[routes]]
from = "front"
to = "back"
paths = ["/allowed", "/allowed/*"]
methods = ["GET"]
'''

# --- without an engine ---------------------------------------------------------------------------

def test_firewall_lets_in_only_the_sidecars_listeners() -> None:
    v4, v6 = firewall_rules("172.30.0.0/16", "172.30.0.1", "172.31.0.1")
    accepted = [line for line in v4.splitlines() if "INPUT" in line and line.endswith("ACCEPT")]
    assert accepted == [
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        f"-A INPUT -d 127.0.0.1/32 -p tcp --dport {ADMIN_PORT} -m conntrack --ctstate DNAT -j ACCEPT",
        f"-A INPUT -s 172.30.0.0/16 -p tcp --dport {MESH_PORT} -j ACCEPT",
    ]
    lines = v4.splitlines()
    # everything else refused, after the exceptions; loopback spoofing dropped before routing
    assert lines.index("-A INPUT -p tcp -j REJECT --reject-with tcp-reset") > lines.index(accepted[-1])
    assert "-A PREROUTING ! -i lo -d 127.0.0.0/8 -j DROP" in lines
    assert (f"-A PREROUTING -s 172.31.0.1/32 -p tcp --dport {ADMIN_PORT} "
            f"-j DNAT --to-destination 127.0.0.1:{ADMIN_PORT}") in lines
    # out: only other sidecars' mesh listeners, never the host's side of the mesh network
    assert f"-A OUTPUT -d 172.30.0.0/16 -p tcp --dport {MESH_PORT} -j ACCEPT" in lines
    assert lines.index("-A OUTPUT -d 172.30.0.1/32 -j REJECT") < lines.index(
        f"-A OUTPUT -d 172.30.0.0/16 -p tcp --dport {MESH_PORT} -j ACCEPT")
    assert v4.count("COMMIT") == 3 and v6.count("COMMIT") == 1
    assert "-A INPUT -j DROP" in v6.splitlines()
    # nothing in the namespace (the app) connects to the admin port: that comes before loopback is let out
    for rules in (lines, v6.splitlines()):
        closed = f"-A OUTPUT -o lo -p tcp --dport {ADMIN_PORT} -j REJECT --reject-with tcp-reset"
        assert rules.index(closed) < rules.index("-A OUTPUT -o lo -j ACCEPT")
    assert f"--dport {PUBLIC_PORT}" not in v4  # a public listener serves a socket of the host's (no port here)


@pytest.mark.parametrize(("text", "expected"), [
    ("64m", 64 << 20), ("64M", 64 << 20), ("64MB", 64 << 20), ("64MiB", 64 << 20),
    ("1.5g", 3 << 29), ("1g", 1 << 30), (str(8 << 20), 8 << 20), (16 << 20, 16 << 20),
])
def test_memory_sizes(text: str | int, expected: int) -> None:
    assert memory_bytes(text) == expected


@pytest.mark.parametrize("text", ["lots", "64x", "-5m", "1m"])
def test_memory_sizes_refused(text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        memory_bytes(text)


def _runtime(tmp_path: Path, toml: str) -> DockerRuntime:
    (tmp_path / "mesh.toml").write_text(toml)
    runtime = get_runtime("docker", config.load(tmp_path), output=lambda *_: None,
                          on_exit=lambda *_: None, run_id="r1")
    assert isinstance(runtime, DockerRuntime)
    return runtime


def test_what_the_docker_runtime_refuses(tmp_path: Path) -> None:
    (tmp_path / "inside").mkdir()
    outside = tmp_path.parent / f"plugins-{uuid.uuid4().hex[:8]}"
    outside.mkdir()
    try:
        runtime = _runtime(tmp_path / "inside", f'''
[mesh]
name = "shop"
plugin_path = ["{outside}"]

[services.web]
command = "python web.py"

[services.api]
build = "api"
port = {MESH_PORT}
memory = "lots"
cpus = 0
''')
        assert runtime.problems() == [
            "services.web: no 'build' or 'image' to run on the docker runtime (it has only 'command': "
            "use --runtime process, or add build = \"folder\" with a Dockerfile)",
            f"services.api.port: {MESH_PORT} is the sidecar's inside the instance (it uses "
            "15000, 15001, 15002, 15080); give the app another port",
            "services.api.memory: expected a size like '256m', '1g' or '512MiB', found 'lots'",
            "services.api.cpus: expected more than 0, found 0",
            f"mesh.plugin_path: {outside} is outside {tmp_path / 'inside'}; the docker runtime mounts "
            "only the folder of mesh.toml into sidecars",
        ]
    finally:
        outside.rmdir()


def test_plan_names_every_instance(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    toml = '''
[mesh]
name = "shop"

[services.web]
image = "shop-web"
expose = {expose}
replicas = 2

[services.api]
build = "api"
port = 9000
'''
    try:
        expose = free_port()
        instances = _runtime(tmp_path, toml.format(expose=expose)).plan()
        assert [(i.label, i.host, i.mesh_address) for i in instances] == [
            ("web.1", "web-1.shop", "web-1.shop:15001"), ("web.2", "web-2.shop", "web-2.shop:15001"),
            ("api", "api-1.shop", "api-1.shop:15001")]
        web1, web2, api = instances
        assert web1.ports["app"] == 8000 and api.ports["app"] == 9000
        assert web1.ports["public"] == web2.ports["public"] == expose  # one socket, both serve it
        assert "public" not in api.ports
        assert api.addresses() == {"app": "127.0.0.1:9000", "mesh": "api-1.shop:15001",
                                   "outbound": "127.0.0.1:15002"}  # admin: once published
        assert api.containers == {"sidecar": {"name": "mesh-shop-api-1", "id": None},
                                             "app": {"name": "mesh-shop-api-1-app", "id": None}}
        with pytest.raises(StartFailed, match="the port is in use"):
            _runtime(tmp_path, toml.format(expose=busy.getsockname()[1])).plan()
    finally:
        busy.close()
    assert container_name("shop", "web", 2, "app") == "mesh-shop-web-2-app"
    assert mesh_alias("shop", "web", 2) == "web-2.shop"
    assert network_names("shop") == {"mesh": "mesh-shop", "edge": "mesh-shop-edge"}


# --- against the engine --------------------------------------------------------------------------

def docker_mesh(engine: Any, folder: Path, toml: str = MESH, **values: Any) -> Mesh:
    """The two-service mesh (or ``toml``) under a name of its own, its images FROM mesh/base."""
    return Mesh(folder, unique_name(), toml.format(**values), None, files=docker_build(DOCKER_APP), engine=engine)


@pytest.fixture(scope="module")
def running(docker_engine: Any, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """The two-service mesh, up in the background (`mesh up -d --runtime docker`)."""
    mesh = docker_mesh(docker_engine, tmp_path_factory.mktemp("docker-mesh"), expose=free_port())
    try:
        started = time.monotonic()
        done = mesh.run("up", "-d", "--runtime", "docker")
        assert done.returncode == 0, f"mesh up -d failed:\n{done.stdout}\n{done.stderr}"
        print(f"\nmesh up -d --runtime docker: {time.monotonic() - started:.1f}s")
        yield mesh
    finally:
        failures = mesh.cleanup()
        assert not failures, f"could not remove what the tests created: {failures}"


def _instance(state: dict[str, Any], service: str) -> dict[str, Any]:
    return next(i for i in state["instances"] if i["service"] == service)


def _mesh_address(client: Any, container_id: str, network: str) -> str:
    networks = client.api.inspect_container(container_id)["NetworkSettings"]["Networks"]
    return str(networks[network]["IPAddress"])


@pytest.mark.docker
def test_up_says_what_it_builds_and_where_it_listens(running: Mesh) -> None:
    up = running.run("ps")
    assert up.returncode == 0, up.stderr
    assert "running (docker runtime" in up.stdout
    log = running.log()
    assert f"checking the images of '{running.name}'" in log
    assert "mesh-firewall: installed" in log


@pytest.mark.docker
def test_calls_go_through_the_mesh(running: Mesh) -> None:
    public = _instance(running.state(), "front")["public"]
    status, _, body = fetch(f"{public}/call/allowed/x")
    assert status == 200, body
    seen = json.loads(body)
    assert seen["path"] == "/allowed/x"
    assert seen["peer"] == "front"  # from front's certificate, over mutual TLS
    assert seen["env"] == {"PORT": "9000", "HTTP_PROXY": "http://127.0.0.1:15002",
                           "NO_PROXY": "127.0.0.1,localhost", "MESH_SERVICE": "back",
                           "MESH_INSTANCE": "1", "COLOUR": "blue"}
    status, _, body = fetch(f"{public}/call/admin")
    assert status == 403 and b"no route allows 'front' to call GET /admin on 'back'" in body
    status, _, body = fetch(f"{public}/who")  # outside callers have no peer
    assert status == 200 and json.loads(body)["peer"] is None


@pytest.mark.docker
def test_the_app_is_reachable_only_through_its_sidecar(running: Mesh, docker_engine: Any,
                                                       base_image: str) -> None:
    state = running.state()
    mesh_network = network_names(running.name)["mesh"]
    targets = {}
    for service, port in (("back", 9000), ("front", 8000)):
        sidecar = _instance(state, service)["containers"]["sidecar"]["id"]
        targets[service] = (_mesh_address(docker_engine, sidecar, mesh_network), port)
    probe = '''
import json, socket, sys
found = {}
for name, host, port in json.loads(sys.argv[1]):
    sock = socket.socket()
    sock.settimeout(3)
    try:
        sock.connect((host, port))
        found[name] = "open"
    except OSError as exc:
        found[name] = type(exc).__name__
    finally:
        sock.close()
print(json.dumps(found))
'''
    tries = [[f"{service} {what}", host, port]
             for service, (host, app) in targets.items()
             for what, port in (("app", app), ("mesh", MESH_PORT), ("admin", ADMIN_PORT),
                                ("outbound", 15002), ("public", PUBLIC_PORT))]
    network = next(docker_engine.networks.get(n["Id"]) for n in running.networks()
                   if n["Name"] == mesh_network)
    container = docker_engine.containers.create(base_image, ["python3", "-c", probe, json.dumps(tries)],
                                                network=network.id, labels={"mesh.test": "probe"})
    running.record.container(container.id)
    container.start()
    assert container.wait(timeout=60)["StatusCode"] == 0, container.logs().decode()
    found = json.loads(container.logs(stderr=False).decode().strip().splitlines()[-1])
    assert found.pop("back mesh") == "open" and found.pop("front mesh") == "open"
    # The app ports bind 0.0.0.0, and still: refused. So are the sidecar's other listeners.
    assert all(result in ("ConnectionRefusedError", "TimeoutError") for result in found.values()), found
    assert found["back app"] == found["front app"] == "ConnectionRefusedError"  # a reset, at once


@pytest.mark.docker
def test_containers_networks_and_limits(running: Mesh, docker_engine: Any) -> None:
    state = running.state()
    front = _instance(state, "front")["containers"]
    app = docker_engine.api.inspect_container(front["app"]["id"])
    assert app["HostConfig"]["NanoCpus"] == 500_000_000
    assert app["HostConfig"]["Memory"] == 64 << 20
    assert app["HostConfig"]["NetworkMode"] == f"container:{front['sidecar']['id']}"
    assert app["Config"]["Labels"]["mesh.role"] == "app"
    assert app["Config"]["Labels"]["mesh.run"] == state["run"]
    sidecar = docker_engine.api.inspect_container(front["sidecar"]["id"])
    published = sidecar["HostConfig"]["PortBindings"]
    assert set(published) == {f"{ADMIN_PORT}/tcp"}  # the public listener serves a socket of the host's
    assert all(b["HostIp"] == "127.0.0.1" for bindings in published.values() for b in bindings)
    mounts = {m["Destination"]: m for m in sidecar["Mounts"]}
    assert all(not m["RW"] for m in mounts.values() if m["Type"] == "bind" and m["Destination"] != "/mesh/logs")
    assert "/mesh/tls" in mounts and "/mesh/config" in mounts and "/mesh/handoff" in mounts
    assert not any(m["Destination"].startswith("/mesh") for m in app["Mounts"])  # nothing of the sidecar's
    container = docker_engine.containers.get(front["sidecar"]["id"])
    # the state folder (the CA key) is not in the container
    code, output = container.exec_run(["sh", "-c", "ls -A /mesh/config/.mesh | wc -l"])
    assert (code, output.decode().strip()) == (0, "0"), output
    # the sidecar process itself runs without NET_ADMIN (bit 12): it cannot undo the firewall
    # (docker-init, PID 1, keeps the container's set: it only reaps and forwards signals)
    code, output = container.exec_run(["python3", "-c", (
        "import os\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
        "    if b'sidecar' in argv and not argv[0].endswith(b'docker-init'):\n"
        "        print(open(f'/proc/{pid}/status').read().split('CapBnd:')[1].split()[0])\n")])
    bounding = output.decode().split()
    assert code == 0 and bounding, output
    assert all(int(mask, 16) & (1 << 12) == 0 for mask in bounding), bounding
    networks = {n["Name"]: docker_engine.api.inspect_network(n["Id"]) for n in running.networks()}
    names = network_names(running.name)
    assert set(networks) == set(names.values())
    assert networks[names["mesh"]]["Internal"] is True
    assert networks[names["edge"]]["Options"]["com.docker.network.bridge.enable_icc"] == "false"


@pytest.mark.docker
def test_the_controller_reaches_each_admin_listener_on_the_host(running: Mesh) -> None:
    token = operator_token(running.state_dir)
    assert token is not None
    for inst in running.state()["instances"]:
        admin = inst["addresses"]["admin"]
        assert admin.startswith("127.0.0.1:")
        assert fetch(f"http://{admin}/registry").status == 401  # the operator's, with the run's token only
        assert fetch(f"http://{admin}/healthz").status == 200
        # the mounted certificate folder, read again
        assert fetch(f"http://{admin}/certs/reload", method="POST", headers=token.headers()).status == 204
        status, _, body = fetch(f"http://{admin}/registry", headers=token.headers())
        assert status == 200
        assert json.loads(body)["services"] == {"front": [f"front-1.{running.name}:{MESH_PORT}"],
                                                "back": [f"back-1.{running.name}:{MESH_PORT}"]}


@pytest.mark.docker
def test_the_app_can_neither_reach_nor_read_its_sidecars_admin(running: Mesh, docker_engine: Any) -> None:
    for service in ("front", "back"):
        containers = _instance(running.state(), service)["containers"]
        networks = docker_engine.api.inspect_container(containers["sidecar"]["id"])["NetworkSettings"]["Networks"]
        addresses = sorted(n["IPAddress"] for n in networks.values())
        app = docker_engine.containers.get(containers["app"]["id"])
        code, output = app.exec_run(["python3", "-c", ATTACK, *addresses])
        assert code == 0, output
        found = json.loads(output.decode().strip().splitlines()[-1])
        # The app runs as root, as its sidecar does: the rule does not go by uid.
        assert found.pop("uid") == 0
        assert found.pop("token file") is False
        assert found.pop("raw socket") == "PermissionError"
        assert len(found) == 2 * (1 + len(addresses))
        assert set(found.values()) == {"ConnectionRefusedError"}, found


@pytest.mark.docker
def test_ps_shows_the_containers(running: Mesh, docker_engine: Any) -> None:
    state = running.ps()
    assert state["runtime"] == "docker" and state["controller"]["running"] is True
    assert [(i["service"], i["state"]) for i in state["instances"]] == [("front", "running"),
                                                                        ("back", "running")]
    for inst in state["instances"]:
        for role, container in inst["containers"].items():
            assert container["status"] == "running"
            assert container["name"] == container_name(running.name, inst["service"], 1, role)
            found = docker_engine.api.inspect_container(container["id"])
            assert found["Name"] == f"/{container['name']}"


@pytest.mark.docker
def test_a_killed_app_container_is_restarted(running: Mesh, docker_engine: Any) -> None:
    back = _instance(running.state(), "back")["containers"]["app"]["id"]
    docker_engine.api.kill(back)
    # the controller noticed, and restarted it
    wait_until(lambda: "back: restarted (restart 1)" in running.log(), timeout=60, every=0.2, what=running.log)
    text = running.log()
    assert "back: the app exited with code 137 (killed by SIGKILL?)" in text
    assert "back: restarting its app in 0.5s (restart 1)" in text
    inst = _instance(running.ps(), "back")
    assert (inst["state"], inst["problem"], inst["restarts"]) == ("running", None, 1)
    assert inst["containers"]["app"]["id"] != back
    public = _instance(running.state(), "front")["public"]
    wait_until(lambda: fetch(f"{public}/call/allowed").status == 200, every=0.2,
               what="back in the registry, serving")


@pytest.mark.docker
def test_down_after_a_crash_removes_this_mesh_and_nothing_else(running: Mesh, docker_engine: Any,
                                                               base_image: str) -> None:
    # Look-alikes: the same mesh name, but another state folder; and an unlabelled network.
    labels = {"mesh.mesh": running.name, "mesh.state": "/elsewhere/.mesh/x", "mesh.role": "app"}
    decoy = docker_engine.containers.create(base_image, ["true"], labels=labels, network_mode="none")
    running.record.container(decoy.id)
    decoy_network = docker_engine.networks.create(f"decoy-{running.name}", internal=True,
                                                  labels={**labels, "mesh.role": "mesh"})
    running.record.network(decoy_network.id)

    # A controller that crashed: `mesh up` again first clears what it left (it holds the exposed port).
    running.kill_controller()
    assert running.containers() and running.networks()
    assert running.ps()["controller"]["running"] is False
    up = running.run("up", "-d", "--runtime", "docker")
    assert up.returncode == 0, up.stdout + up.stderr
    log = running.log()
    assert "removed 4 containers and 2 networks an earlier `mesh up`" in log
    assert fetch(f"{_instance(running.state(), 'front')['public']}/call/allowed").status == 200

    # And again; now `mesh down` finds what it left by label.
    running.kill_controller()
    down = running.run("down")
    assert down.returncode == 0, down.stderr
    assert "removed 4 containers and 2 networks" in down.stdout
    assert running.containers() == [] and running.networks() == []
    docker_engine.api.inspect_container(decoy.id)  # still there
    docker_engine.api.inspect_network(decoy_network.id)
    assert running.run("down").stdout.strip() == f"mesh '{running.name}' is not running"

    # Up again, and down with its controller alive.
    up = running.run("up", "-d", "--runtime", "docker")
    assert up.returncode == 0, up.stdout + up.stderr
    assert fetch(f"{_instance(running.state(), 'front')['public']}/call/allowed").status == 200
    down = running.run("down")
    assert down.returncode == 0 and f"mesh '{running.name}' stopped" in down.stdout, down.stderr
    assert running.containers() == [] and running.networks() == []
    assert _instance(running.ps(), "back")["state"] == "stopped"


@pytest.mark.docker
def test_a_failed_start_shows_the_apps_last_lines_and_leaves_nothing(docker_engine: Any, base_image: str,
                                                                     tmp_path: Path) -> None:
    toml = MESH.replace('env = {{ COLOUR = "blue" }}', 'env = {{ EXIT_AT_ONCE = "1" }}')
    mesh = docker_mesh(docker_engine, tmp_path, toml, expose=free_port())
    try:
        done = mesh.run("up", "-d", "--runtime", "docker", "--timeout", "20")
        assert done.returncode == 1
        assert "back failed to start: the app exited with code 3 before it was ready" in done.stderr
        assert "back | boom: this app gives up at once" in done.stderr
        assert mesh.containers() == [] and mesh.networks() == []
    finally:
        failures = mesh.cleanup()
        assert not failures, failures
