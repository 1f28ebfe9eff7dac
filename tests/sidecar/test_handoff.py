"""Listening sockets a sidecar is given: checked when inherited, sent over a unix socket, served."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.sidecar.handoff import Offer, Receiver, inherited

from ..harness import fetch


def test_only_a_listening_tcp_socket_is_taken() -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    idle = socket.socket()
    datagram = socket.socket(type=socket.SOCK_DGRAM)
    read, write = os.pipe()
    try:
        taken = inherited(os.dup(listening.fileno()))
        assert taken.getsockname() == listening.getsockname() and not taken.get_inheritable()
        taken.close()
        for sock, why in ((idle, "not listening"), (datagram, "not a TCP socket")):
            with pytest.raises(ValueError, match=why):
                inherited(sock.fileno())
            sock.getsockname()  # still open: refusing it does not close it
        with pytest.raises(ValueError, match="not an open socket"):
            inherited(read)
        os.fstat(read)
    finally:
        for each in (listening, idle, datagram):
            each.close()
        os.close(read)
        os.close(write)


async def test_a_socket_is_handed_over_a_unix_socket_with_a_long_path(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120) / "public.sock"  # longer than a socket address may be
    offer = Offer(path)
    listening = socket.create_server(("127.0.0.1", 0))
    try:
        assert oct(path.parent.stat().st_mode & 0o777) == "0o700"
        receiver = Receiver(str(path))
        receiving = asyncio.ensure_future(receiver.receive())
        await offer.give(listening, "public", timeout=5)
        name, sock = await asyncio.wait_for(receiving, 5)
        receiver.close()
        with sock:
            assert name == "public" and sock.getsockname() == listening.getsockname()
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        offer.close()
        listening.close()
    assert not path.exists()


async def test_an_offer_hands_the_socket_only_to_the_sidecars_process(tmp_path: Path) -> None:
    """Another process of the same user (an app on the process runtime) connecting first gets nothing."""
    path = tmp_path / "public.sock"
    offer = Offer(path)
    listening = socket.create_server(("127.0.0.1", 0))
    intruder = Receiver(str(path))  # this test's process: not the sidecar's pid
    sidecar = subprocess.Popen(
        [sys.executable, "-c", "import asyncio, sys\n"
         "from mesh.sidecar.handoff import Receiver\n"
         "name, sock = asyncio.run(Receiver(sys.argv[1]).receive())\n"
         "print(name, sock.getsockname()[1], flush=True)\n", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        stolen = asyncio.ensure_future(intruder.receive())
        await offer.give(listening, "public", timeout=60, peer=sidecar.pid)
        out, _ = await asyncio.to_thread(sidecar.communicate, timeout=60)
        assert out.split() == ["public", str(listening.getsockname()[1])]
        with pytest.raises(ConnectionError):  # hung up on, unanswered
            await asyncio.wait_for(stolen, 10)
    finally:
        sidecar.kill()
        sidecar.wait()
        intruder.close()
        offer.close()
        listening.close()


async def test_a_starter_that_hangs_up_hands_nothing_over(tmp_path: Path) -> None:
    offer = Offer(tmp_path / "public.sock")
    receiver = Receiver(str(tmp_path / "public.sock"))
    try:
        receiving = asyncio.ensure_future(receiver.receive())
        await asyncio.sleep(0)
        offer.close()  # the queued connection goes with the listening socket
        with pytest.raises(ConnectionError):  # reset, or closed before a socket was handed over
            await asyncio.wait_for(receiving, 5)
        with pytest.raises(TimeoutError):
            await Offer(tmp_path / "other.sock").give(socket.socket(), "public", timeout=0.05)
    finally:
        receiver.close()
        offer.close()


TOML = '[mesh]\nname = "t"\n[services.web]\ncommand = "x"\n'


def _sidecar(folder: Path, *options: str, **popen: object) -> subprocess.Popen[str]:
    (folder / "mesh.toml").write_text(TOML)
    return subprocess.Popen(
        [sys.executable, "-m", "mesh", "sidecar", "--config", str(folder), "--service", "web", "--app-port", "9",
         "--mesh-port", "0", "--outbound-port", "0", "--admin-port", "0", *options],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL, **popen)  # type: ignore[call-overload]


def test_mesh_sidecar_serves_an_inherited_public_socket(tmp_path: Path) -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    proc = _sidecar(tmp_path, "--public-fd", str(listening.fileno()), pass_fds=[listening.fileno()])
    try:
        # It answers from the socket given (the app is not up: 503), not a port of its own.
        answer = fetch(f"http://127.0.0.1:{port}/", timeout=60)
        assert answer.status == 503 and "not up yet" in answer.text, answer
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        listening.close()
    assert proc.returncode == 0, output
    assert f"public=127.0.0.1:{port}" in output


def test_mesh_sidecar_refuses_what_is_not_a_listening_socket(tmp_path: Path) -> None:
    idle = socket.socket()
    try:
        proc = _sidecar(tmp_path, "--public-fd", str(idle.fileno()), pass_fds=[idle.fileno()])
        output, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2 and f"--public-fd {idle.fileno()}: " in output and "not listening" in output
    finally:
        idle.close()
    proc = _sidecar(tmp_path, "--public-port", "0", "--public-handoff", str(tmp_path / "none.sock"))
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--public-port and --public-handoff" in output, output
    proc = _sidecar(tmp_path, "--public-handoff", str(tmp_path / "none.sock"))
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "cannot connect" in output, output
