"""What every task of a swarm-runtime service runs: its firewall, then its sidecar and its app, supervised.

A Swarm task is one container: the service's own image (built ``FROM
mesh/base``, so it holds mesh), started by the engine as::

    python3 -m mesh.control.swarm.task SPEC -- APP ARGV...

(``SPEC``: JSON from `mesh.control.swarm.services`; the app's argv: its image's
entrypoint and command). As root, with ``NET_ADMIN``, it

1. installs the namespace's firewall (`mesh.control.swarm.firewall`) and says
   so (`FIREWALL_MARKER`); nothing else runs before;
2. unpacks the folder of mesh.toml (a Docker config at `BUNDLE`) into
   `CONFIG_DIR`, readable by the sidecar's user only;
3. starts the sidecar as `SIDECAR_UID` (no capability left, the only user that
   can read the task's key, a Docker secret under `TLS_DIR`) and the app as its
   image's user, with no capability but ``NET_BIND_SERVICE``; neither can gain
   any (``no_new_privs``), so neither can undo the firewall;
4. supervises them: when the app ends, the sidecar stops and the task ends with
   the app's exit code (Swarm starts a new task when it is not 0, by the
   service's ``restart``); when the sidecar ends, so does the app, and the
   task fails; on SIGTERM (the service removed, scaled down or updated) the sidecar
   drains requests in flight first, then the app stops.

The sidecar's output comes out prefixed ``sidecar | `` and the supervisor's
own lines start with ``mesh-task:``; the app's output passes unchanged, so the
engine's service logs tell them apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import pwd
import signal
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from mesh.control.docker.layout import APP_GRACE, SIDECAR_GRACE
from mesh.control.swarm.firewall import FIREWALL_MARKER
from mesh.control.swarm.layout import BUNDLE, CONFIG_DIR, PROBE_GID, SIDECAR_UID

__all__ = ["SIDECAR_PREFIX", "TASK_PREFIX", "app_user", "main", "unpack"]

SIDECAR_PREFIX = "sidecar | "
TASK_PREFIX = "mesh-task: "
FIREWALL_REFUSED = 70  # the exit code when the firewall could not be installed: nothing else ran


def say(text: str) -> None:
    print(f"{TASK_PREFIX}{text}", file=sys.stderr, flush=True)


def install_firewall(v4: str, v6: str) -> str | None:
    """iptables-restore (the nf_tables backend, else the legacy one) for IPv4, and for IPv6 when the
    namespace has it; what went wrong, if anything. ``--noflush``: the engine's embedded DNS keeps
    its own nat rules in the namespace."""
    families = [("iptables", v4)]
    if Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").read_text().strip() == "0":
        families.append(("ip6tables", v6))
    for family, rules in families:
        errors = []
        for command in (f"{family}-restore", f"{family}-legacy-restore"):
            try:
                done = subprocess.run([command, "--noflush"], input=rules, capture_output=True, text=True,
                                      timeout=30)
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(f"{command}: {exc}")
                continue
            if done.returncode == 0:
                break
            errors.append(f"{command}: {done.stderr.strip() or f'exit code {done.returncode}'}")
        else:
            return f"{family} refused the rules: {'; '.join(errors)}"
    return None


def unpack(data: bytes, target: Path, owner: int | None = SIDECAR_UID) -> None:
    """The folder of mesh.toml (a gzipped tar of regular files) into ``target``, read-only (folders 0550,
    files 0440) and of ``owner`` (user and group: the sidecar's; None leaves them as they are): the app,
    even as root, has no capability to read or change another user's files."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            path = PurePosixPath(member.name)
            if path.is_absolute() or ".." in path.parts or not (member.isfile() or member.isdir()):
                raise ValueError(f"the bundle holds an unexpected entry: {member.name!r}")
            where = target.joinpath(*path.parts)
            if member.isdir():
                where.mkdir(parents=True, exist_ok=True)
                continue
            where.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            where.write_bytes(source.read())
    for each in sorted([target, *target.rglob("*")], reverse=True):
        if owner is not None:
            os.chown(each, owner, owner)
        each.chmod(0o550 if each.is_dir() else 0o440)


def app_user(user: str) -> tuple[int, int, str | None]:
    """The image's ``USER`` (``""``, ``name``, ``uid``, ``name:group``, ``uid:gid``) as (uid, gid, home),
    looked up in this container's /etc/passwd and /etc/group as the engine would."""
    import grp

    name, _, group = user.partition(":")
    entry: pwd.struct_passwd | None = None
    if not name:
        uid = 0
    elif name.isdigit():
        uid = int(name)
    else:
        entry = pwd.getpwnam(name)
        uid = entry.pw_uid
    if entry is None:
        with contextlib.suppress(KeyError):
            entry = pwd.getpwuid(uid)
    if group:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    else:
        gid = entry.pw_gid if entry is not None else 0
    return uid, gid, entry.pw_dir if entry is not None else None


def _setpriv(uid: int, gid: int, bounding: str) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
            f"--bounding-set={bounding}", "--no-new-privs", "--"]


async def _relay(stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stderr.write(SIDECAR_PREFIX + line.decode("utf-8", "replace").rstrip("\n") + "\n")
        sys.stderr.flush()


async def _stop(process: asyncio.subprocess.Process, grace: float) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _exit_code(returncode: int | None) -> int:
    """A child's exit as a shell says it: 128 + N when signal N ended it."""
    if returncode is None:
        return 0
    return 128 - returncode if returncode < 0 else returncode


async def supervise(spec: dict[str, Any], app: list[str]) -> int:
    """Start the sidecar, then the app; return the exit code the task ends with (see the module docstring)."""
    uid, gid, home = app_user(spec.get("user") or "")
    if uid == SIDECAR_UID or gid in (SIDECAR_UID, PROBE_GID):
        say(f"the image's user {spec.get('user')!r} is the sidecar's or the probe's ({SIDECAR_UID}, {PROBE_GID}): "
            f"refusing to run the app as it")
        return 78
    slot = os.environ.get("MESH_INSTANCE", "1")
    label = spec["service"] if spec.get("single") else f"{spec['service']}.{slot}"
    sidecar_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": "/tmp",
                   "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    sidecar = await asyncio.create_subprocess_exec(
        *_setpriv(SIDECAR_UID, SIDECAR_UID, "-all"), *spec["sidecar"], "--instance", label,
        env=sidecar_env, cwd=CONFIG_DIR, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    assert sidecar.stdout is not None
    relay = asyncio.ensure_future(_relay(sidecar.stdout))
    app_env = dict(os.environ)
    if home and uid != 0:
        app_env["HOME"] = home
    try:
        process = await asyncio.create_subprocess_exec(
            *_setpriv(uid, gid, "-all,+net_bind_service"), *app, env=app_env, stdin=subprocess.DEVNULL,
            start_new_session=True)
    except OSError as exc:
        say(f"cannot start the app {app}: {exc}")
        await _stop(sidecar, SIDECAR_GRACE)
        return 127
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    waits = {asyncio.ensure_future(sidecar.wait()): "sidecar", asyncio.ensure_future(process.wait()): "app",
             asyncio.ensure_future(stopping.wait()): "stop"}
    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    first = waits[next(iter(done))]
    code = 0
    if first == "app":
        code = _exit_code(process.returncode)
        say(f"the app exited with code {code}: stopping the sidecar")
    elif first == "sidecar":
        code = _exit_code(sidecar.returncode)
        say(f"the sidecar exited with code {code}: stopping the app")
        code = code or 1
    # The sidecar drains requests in flight to the app, which stops after it.
    await _stop(sidecar, SIDECAR_GRACE)
    await _stop(process, APP_GRACE)
    for wait in waits:
        wait.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(relay, 2)
    return code


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        say("usage: python3 -m mesh.control.swarm.task SPEC -- APP ARGV...")
        return 64
    spec: dict[str, Any] = json.loads(argv[0])
    problem = install_firewall(*spec["firewall"])
    if problem is not None:
        say(problem)
        return FIREWALL_REFUSED
    say(f"{FIREWALL_MARKER}; from outside this task only the sidecar's listeners answer")
    try:
        unpack(Path(BUNDLE).read_bytes(), Path(CONFIG_DIR))
    except (OSError, ValueError, tarfile.TarError) as exc:
        say(f"cannot unpack the mesh's files from {BUNDLE}: {exc}")
        return 66
    return asyncio.run(supervise(spec, argv[2:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
