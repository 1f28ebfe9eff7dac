"""The listening sockets the controller opens for sidecars (process runtime): the sidecars hold them,
the controller keeps an exposed service's public one, and no app inherits any of them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ..harness import MeshMaker, fetch, free_port


def listening_inode(port: int) -> int:
    """The inode of the socket listening on 127.0.0.1:``port`` (from /proc/net/tcp)."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # LISTEN
            return int(fields[9])
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process ``pid`` has open."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[len("socket:["):-1]))
    return found


def group(pgid: int) -> list[int]:
    """The processes of process group ``pgid``."""
    members = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            members.append(int(entry))
    return members


@pytest.mark.slow
async def test_no_app_inherits_a_listening_socket_of_its_sidecar(make_mesh: MeshMaker) -> None:
    port = free_port()
    mesh = make_mesh("held", f'\n[services.web]\ncommand = "python app.py"\nexpose = {port}\nreplicas = 2\n')
    await mesh.start()
    public = listening_inode(port)
    assert public in socket_inodes(os.getpid())  # the controller's, for the mesh's life
    instances = mesh.state()["instances"]  # type: ignore[index]
    assert [i["public"] for i in instances] == [f"http://127.0.0.1:{port}"] * 2
    for instance in instances:
        sidecar = socket_inodes(instance["pids"]["sidecar"])
        held = {public} | {listening_inode(int(instance["addresses"][role].rsplit(":", 1)[1]))
                           for role in ("mesh", "outbound", "admin")}
        assert held <= sidecar
        apps = group(instance["pgids"]["app"])
        assert instance["pids"]["app"] in apps
        for pid in apps:
            assert not held & socket_inodes(pid), f"app process {pid} holds a socket of its sidecar"
    assert fetch(f"http://127.0.0.1:{port}/").status == 200
    await mesh.stop()
    mesh.assert_all_gone()
