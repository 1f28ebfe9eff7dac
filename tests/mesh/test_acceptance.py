"""The whole contract at once, the way a user meets it: `mesh up` on two echo services.

A user plugin from a folder outside the project, a declared and an undeclared
route, 8 MiB up and 32 MiB down through the sidecars, a plugin that raises,
and SIGTERM stopping everything.
"""

from __future__ import annotations

import hashlib
import os
import signal

import pytest

from mesh.control.runtimes.procfs import group_alive, pid_alive

from ..harness import ECHO_APP, MeshMaker, fetch, free_port, recorded, wait_until

PLUGINS = '''
from mesh import Plugin, Response

class Tag(Plugin):
    def __init__(self, value: str):
        self.value = value

    async def handle(self, request, call_next):
        if request.path == "/explode":
            raise RuntimeError("the plugin broke")
        response = await call_next(request)
        response.headers["X-Tag"] = self.value
        return response
'''

TOML = '''plugin_path = ["{plugins}"]

[services.front]
command = "python echo.py front"
expose = {port}
health = "/healthz"
plugins = [ {{ use = "tag.py:Tag", value = "from-user-plugin" }} ]

[services.back]
command = "python echo.py back"
health = "/healthz"

[[routes]]
from = "front"
to = "back"
paths = ["/ok", "/ok/*", "/big", "/upload"]
'''

@pytest.mark.slow
def test_two_echo_services_end_to_end(make_mesh: MeshMaker, tmp_path_factory) -> None:
    plugins = tmp_path_factory.mktemp("user-plugins")
    (plugins / "tag.py").write_text(PLUGINS)
    port = free_port()
    mesh = make_mesh("accept", TOML.format(plugins=plugins, port=port), None, files={"echo.py": ECHO_APP})
    popen = mesh.up()
    mesh.wait_phase("running")
    base = f"http://127.0.0.1:{port}"

    status, headers, body = fetch(base + "/hello")
    assert status == 200 and body.startswith(b"front /hello") and headers["X-Tag"] == "from-user-plugin"

    # Declared route, by name through HTTP_PROXY; the receiving app learns the caller.
    status, _, body = fetch(base + "/call/back/ok/1")
    assert status == 200 and body == b"back /ok/1 peer=front"
    # Undeclared path: refused with a reason naming caller, target and path.
    status, _, body = fetch(base + "/call/back/secret")
    assert status == 403 and b"'front'" in body and b"'back'" in body and b"/secret" in body

    # 8 MiB up, through front's sidecar and on to back through both sidecars.
    upload = os.urandom(8 << 20)
    digest = hashlib.sha256(upload).hexdigest().encode()
    status, _, body = fetch(base + "/upload", data=upload)
    assert status == 200 and body == b"front got %d %s" % (len(upload), digest)
    status, _, body = fetch(base + "/relay/back/upload", data=upload)
    assert status == 200 and body == b"back got %d %s" % (len(upload), digest)

    # 32 MiB down, from back through both sidecars.
    status, _, body = fetch(base + "/call/back/big")
    assert status == 200 and len(body) == 32 << 20 and body.strip(b"d") == b""

    # A plugin that raises: 500 with the request id; the traceback is in the log; serving goes on.
    status, headers, body = fetch(base + "/explode")
    assert status == 500 and headers["x-request-id"].encode() in body and b"the plugin broke" not in body
    wait_until(lambda: "the plugin broke" in mesh.output(), every=0.1, what="the traceback in the log")
    log = mesh.output()
    assert "the plugin broke" in log and headers["x-request-id"] in log
    assert fetch(base + "/hello").status == 200

    state = mesh.state()
    pids, pgids = recorded(state), recorded(state, "pgids")
    popen.send_signal(signal.SIGTERM)
    assert popen.wait(30) == 0
    assert not any(pid_alive(p) for p in pids)
    assert not any(group_alive(g) for g in pgids)
