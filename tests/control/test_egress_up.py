"""Egress end to end: `mesh up` on the process runtime, apps calling servers outside the mesh.

The "outside" servers run in this process on 127.0.0.2, a loopback address no part of the mesh;
the apps reach them the way any HTTP client does, through HTTP_PROXY and HTTPS_PROXY (CONNECT),
and their sidecars apply the [[egress]] entries. A process may also skip its sidecar: the
process runtime has no firewall (docs/config.md says so); the last check shows it. On Docker
the namespace firewall lets only the sidecar out; the last test shows that.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.control.docker.firewall import ENTRYPOINT, firewall_rules
from mesh.control.docker.layout import SIDECAR_UID

from ..docker_support import Leftovers, base_image, docker_engine  # noqa: F401
from ..harness import MeshMaker, app, docker_build, fetch, free_port, unique_name
from ..outside import OUTSIDE, outside_certificate

pytestmark = pytest.mark.slow


# GET /get?url=...: the app fetches url as any client would (the proxies from its environment, the
# CA file in $CA for https) and answers with what came back; /direct?port=N: a TCP connection of its own.
CALLER = app('''
    import ssl

    class Handler(Base):
        def do_GET(self):
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if url.path == "/direct":
                with socket.create_connection(("127.0.0.2", int(query["port"][0])), timeout=10) as sock:
                    sock.sendall(b"GET /direct HTTP/1.0\\r\\nHost: 127.0.0.2\\r\\n\\r\\n")
                    return self.reply(200, sock.recv(65536))
            context = ssl.create_default_context(cafile=os.environ["CA"])
            try:
                with urllib.request.urlopen(query["url"][0], timeout=20, context=context) as answer:
                    return self.reply(answer.status, answer.read())
            except urllib.error.HTTPError as error:
                return self.reply(error.code, error.read())
            except urllib.error.URLError as error:
                return self.reply(599, str(error.reason).encode())
''')


class _Outside(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"outside {self.path} host={self.headers['Host']} peer={self.headers.get('x-mesh-peer')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """An HTTP and an HTTPS server on 127.0.0.2 (their ports), and the CA file that trusts the second."""
    cert, key = outside_certificate(tmp_path)
    plain = ThreadingHTTPServer((OUTSIDE, 0), _Outside)
    secure = ThreadingHTTPServer((OUTSIDE, 0), _Outside)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in (plain, secure)]
    for thread in threads:
        thread.start()
    try:
        yield plain.server_address[1], secure.server_address[1], cert
    finally:
        for server in (plain, secure):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(timeout=10)


def test_apps_reach_only_the_hosts_their_egress_entries_allow(make_mesh: MeshMaker,
                                                             outside: tuple[int, int, Path]) -> None:
    http_port, https_port, cert = outside
    web, other = free_port(), free_port()
    mesh = make_mesh("egress", f"""
[services.web]
command = "python app.py"
expose = {web}
env = {{ CA = "{cert}" }}

[services.other]
command = "python app.py"
expose = {other}
env = {{ CA = "{cert}" }}

[[egress]]
from = "web"
hosts = ["{OUTSIDE}"]
ports = [{http_port}]
paths = ["/allowed/*"]

[[egress]]
from = "web"
hosts = ["{OUTSIDE}"]
ports = [{https_port}]
""", CALLER)
    popen = mesh.up()
    state = mesh.wait_phase("running")

    def get(port: int, url: str) -> tuple[int, str]:
        answer = fetch(f"http://127.0.0.1:{port}/get?url={quote(url, safe='')}")
        return answer.status, answer.text

    # Plain HTTP through HTTP_PROXY: the allowed path reaches the host, with the app's Host and no mesh header.
    status, text = get(web, f"http://{OUTSIDE}:{http_port}/allowed/x?q=1")
    assert (status, text) == (200, f"outside /allowed/x?q=1 host={OUTSIDE}:{http_port} peer=None")
    # Any other path, and any host or port no entry names: 403 naming the host.
    for url in (f"http://{OUTSIDE}:{http_port}/secret", f"http://{OUTSIDE}:{https_port + 1}/allowed/x"):
        status, text = get(web, url)
        assert status == 403 and OUTSIDE in text and "[[egress]]" in text, (url, text)
    # HTTPS through HTTPS_PROXY: a CONNECT tunnel, TLS end to end between the app and the host.
    assert get(web, f"https://{OUTSIDE}:{https_port}/tls") == (200, f"outside /tls host={OUTSIDE}:{https_port} "
                                                                     f"peer=None")
    # A service with no entry reaches nothing outside, either way.
    status, text = get(other, f"http://{OUTSIDE}:{http_port}/allowed/x")
    assert status == 403 and OUTSIDE in text
    status, text = get(other, f"https://{OUTSIDE}:{https_port}/tls")
    assert status == 599 and "403" in text  # urllib: the tunnel was refused

    admin = next(i["addresses"]["admin"] for i in state["instances"] if i["service"] == "web")
    found = [(s.labels, s.value) for family in text_string_to_metric_families(fetch(f"http://{admin}/metrics").text)
             for s in family.samples if s.name == "mesh_requests_total"]
    assert sum(value for labels, value in found if labels["route"] == "web->egress") == 4
    assert sum(value for labels, value in found
               if labels["route"] == "web->egress" and labels["method"] == "CONNECT") == 1

    # The process runtime has no firewall: a process that skips its sidecar is not stopped (documented).
    assert fetch(f"http://127.0.0.1:{other}/direct?port={http_port}").text.startswith("HTTP/1.0 200")

    popen.terminate()
    assert popen.wait(timeout=60) == 0


def test_on_docker_the_firewall_lets_out_only_the_sidecars_uid_and_only_with_egress() -> None:
    closed = firewall_rules("172.30.0.0/16", "172.30.0.1", "172.31.0.1")[0].splitlines()
    assert not [line for line in closed if "--uid-owner" in line or "--dport 53" in line]
    lines = firewall_rules("172.30.0.0/16", "172.30.0.1", "172.31.0.1", egress=True,
                           resolvers=["10.9.8.7"])[0].splitlines()
    out = [line for line in lines if line.startswith("-A OUTPUT")]
    uid = f"-A OUTPUT -p tcp -m owner --uid-owner {SIDECAR_UID} -j ACCEPT"
    # the mesh network (but other sidecars' mesh listeners) and its gateway stay closed to the sidecar too
    assert out.index("-A OUTPUT -d 172.30.0.1/32 -j REJECT") < out.index(uid)
    assert out.index("-A OUTPUT -d 172.30.0.0/16 -j REJECT") < out.index(uid)
    assert [line for line in out if "--dport 53" in line] == [
        "-A OUTPUT -d 10.9.8.7/32 -p udp --dport 53 -j ACCEPT", "-A OUTPUT -d 10.9.8.7/32 -p tcp --dport 53 -j ACCEPT"]
    assert out[-3:] == [uid, "-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset", "-A OUTPUT -j REJECT"]
    assert f"--reuid={SIDECAR_UID}" in ENTRYPOINT and "--ambient-caps=+dac_override " in ENTRYPOINT


# On Docker: for every address on purpose; /direct?host=H&port=N: a TCP connection of its own;
# /become: a process of its own that tries to take the sidecar's uid, then to connect out as it.
DOCKER_CALLER = app('''
    import subprocess

    BECOME = "import os, socket, sys; os.setgid(%d); os.setuid(%d); socket.create_connection((sys.argv[1], 8080), 5)"

    class Handler(Base):
        def do_GET(self):
            url = urlparse(self.path)
            query = parse_qs(url.query)
            if url.path == "/healthz":
                return self.reply(200, b"ok")
            if url.path == "/direct":
                try:
                    with socket.create_connection((query["host"][0], int(query["port"][0])), timeout=5):
                        return self.reply(200, b"open")
                except OSError as error:
                    return self.reply(200, type(error).__name__.encode())
            if url.path == "/become":
                uid = int(query["uid"][0])
                done = subprocess.run([sys.executable, "-c", BECOME % (uid, uid), query["host"][0]],
                                      capture_output=True, timeout=20)
                lines = done.stderr.decode(errors="replace").strip().splitlines() or ["exit %d" % done.returncode]
                return self.reply(200, lines[-1].encode())
            try:
                with urllib.request.urlopen(query["url"][0], timeout=20) as answer:
                    return self.reply(answer.status, answer.read())
            except urllib.error.HTTPError as error:
                return self.reply(error.code, error.read())
''', host="0.0.0.0")


@pytest.mark.docker
def test_on_docker_the_apps_only_way_out_is_its_sidecar(make_mesh: MeshMaker, docker_engine: Any,
                                                        base_image: str) -> None:
    """An allowed call goes out through the sidecar (uid `SIDECAR_UID`, the only one the namespace
    firewall lets out, on the mesh's egress network); a denied one gets 403; the app's own connections
    are refused, and it cannot take the sidecar's uid.

    The "outside" host is a container on a network this test creates, attached (by id, under a name
    of the test's) to the mesh's egress network once `mesh up` made it: never an outside address.
    """
    record = Leftovers(docker_engine)
    outside = unique_name("outside")
    try:
        network = docker_engine.networks.create(unique_name("egress"), driver="bridge", internal=True,
                                                labels={"mesh.test": "egress"})
        record.network(network.id)
        server = docker_engine.containers.run(base_image, ["python3", "-m", "http.server", "8080"], detach=True,
                                              network=network.id, labels={"mesh.test": "egress"})
        record.container(server.id)
        mesh = make_mesh(unique_name(), f"""
[services.web]
build = "app"
port = 8000
expose = {free_port()}
health = "/healthz"

[[egress]]
from = "web"
hosts = ["{outside}"]
ports = [8080]
""", None, files=docker_build(DOCKER_CALLER), engine=docker_engine)
        done = mesh.run("up", "-d", "--runtime", "docker")
        assert done.returncode == 0, f"mesh up -d failed:\n{done.stdout}\n{done.stderr}"
        public = mesh.state()["instances"][0]["public"]
        networks = {n["Labels"]["mesh.role"]: n["Id"] for n in mesh.networks()}
        assert set(networks) == {"mesh", "edge", "egress"}
        egress = networks["egress"]
        docker_engine.api.connect_container_to_network(server.id, egress, aliases=[outside])
        host = docker_engine.api.inspect_container(server.id)["NetworkSettings"]["Networks"][
            docker_engine.api.inspect_network(egress)["Name"]]["IPAddress"]

        def get(url: str) -> tuple[int, str]:
            answer = fetch(f"{public}/get?url={quote(url, safe='')}")
            return answer.status, answer.text

        status, text = get(f"http://{outside}:8080/")
        assert status == 200 and "Directory listing" in text, text
        for url, named in ((f"http://{outside}:8081/", f"{outside}:8081"), (f"http://{host}:8080/", host)):
            status, text = get(url)
            assert status == 403 and named in text and "[[egress]]" in text, (url, text)
        # The app's own connection, to the host the sidecar just reached, is refused at once.
        started = time.monotonic()
        assert fetch(f"{public}/direct?host={host}&port=8080").text == "ConnectionRefusedError"
        assert time.monotonic() - started < 5
        # As root in its container, the app cannot become the sidecar's uid (nor its gid).
        said = fetch(f"{public}/become?uid={SIDECAR_UID}&host={host}").text
        assert said.startswith("PermissionError"), said

        docker_engine.api.disconnect_container_from_network(server.id, egress)
        assert mesh.run("down").returncode == 0
        assert mesh.containers() == [] and mesh.networks() == []
        assert not docker_engine.api.networks(ids=[egress])
    finally:
        failures = record.remove_all()
        assert not failures, f"could not remove what the test created: {failures}"
