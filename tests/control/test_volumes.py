"""Per-key state (``instances = { ..., volume = "/data" }``): a key's folder or named volume, through `mesh up`.

On the process runtime a key's volume is a folder (0700) under the state
folder, on Docker a named volume mounted in the key's app container only;
either way the app finds it in ``MESH_VOLUME``, it outlives sleeps and the
mesh's runs, and only `mesh down --volumes` removes it. Names come from a
digest of the key, never the key (which comes from a request). Every process,
container, network, image and volume a test makes is recorded and removed at
its end.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest

from mesh import config
from mesh.control.keyed import key_volume
from mesh.control.runtimes.procfs import pid_alive
from mesh.errors import ConfigError

from ..docker_support import base_image, docker_engine  # noqa: F401
from ..harness import Answer, Mesh, MeshMaker, app, fetch, free_port, unique_name, wait_until

SAFE = re.compile(r"sandbox-k-[0-9a-f]{32}\Z")

# GET /: its pid, MESH_VOLUME and what is in it; PUT /files/NAME writes the body there, GET /files/NAME reads it.
VOLUME_APP = app('''
    VOLUME = os.environ.get("MESH_VOLUME")

    class Handler(Base):
        def do_GET(self):
            if self.path.startswith("/files/"):
                path = os.path.join(VOLUME, self.path[len("/files/"):])
                if not os.path.isfile(path):
                    return self.reply(404, b"no such file")
                with open(path, "rb") as f:
                    return self.reply(200, f.read())
            self.reply(200, json.dumps({"pid": os.getpid(), "volume": VOLUME,
                                        "files": sorted(os.listdir(VOLUME)) if VOLUME else None}).encode())

        def do_PUT(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with open(os.path.join(VOLUME, self.path[len("/files/"):]), "wb") as f:
                f.write(body)
            self.reply(200, b"written")
''')

TOML = """
[services.sandbox]
command = "python app.py"
expose = {port}
instances = {{ key = "header:X-Session", sleep_after = "1500ms", max = 10, start_timeout = "20s", volume = "/data" }}
"""

HOSTILE = ["../../etc", "..", "/", "k" * 4000, "ключ/../..", " spaced\tkey "]


# --- names and the config key ----------------------------------------------------------------------

def test_hostile_keys_map_to_safe_distinct_names() -> None:
    keys = [*HOSTILE, "", "alice", "\udcff", "a/b", "A/B"]
    names = [key_volume("sandbox", key) for key in keys]
    assert all(SAFE.match(name) for name in names), names
    assert len(set(names)) == len(keys)
    assert key_volume("sandbox", "alice") == key_volume("sandbox", "alice")
    assert key_volume("other", "alice") != key_volume("sandbox", "alice")


def _load(tmp_path: Path, instances: str) -> config.MeshConfig:
    (tmp_path / "mesh.toml").write_text(f'[services.s]\ncommand = "x"\ninstances = {instances}\n')
    return config.load(tmp_path)


def test_volume_is_an_absolute_path(tmp_path: Path) -> None:
    spec = _load(tmp_path, '{ key = "header:X", volume = "/var/lib/app" }').services["s"].instances
    assert spec is not None and spec.volume == "/var/lib/app"
    assert _load(tmp_path, '{ key = "header:X" }').services["s"].instances.volume is None  # type: ignore[union-attr]
    for bad in ("data", "/", "/a/../b", "//data", "/data/", "/a\nb", ""):
        with pytest.raises(ConfigError) as caught:
            _load(tmp_path, f'{{ key = "header:X", volume = {bad!r} }}'.replace("'", '"').replace("\n", "\\n"))
        assert "services.s.instances: volume: expected an absolute path" in str(caught.value), bad


# --- the process runtime ---------------------------------------------------------------------------

def _private(path: Path) -> bool:
    return path.is_dir() and stat.S_IMODE(path.stat().st_mode) == 0o700


@pytest.mark.slow
def test_a_keys_folder_outlives_sleep_and_runs_until_down_volumes(make_mesh: MeshMaker) -> None:
    port = free_port()
    mesh = make_mesh("vols", TOML.format(port=port), VOLUME_APP)
    folder = mesh.state_dir / "volumes"

    def call(key: str, path: str = "/", data: bytes | None = None) -> Answer:
        return fetch(f"http://127.0.0.1:{port}{path}", method="PUT" if data is not None else None, data=data,
                     headers={"X-Session": key})

    up = mesh.run("up", "-d", timeout=90)
    assert up.returncode == 0, up.stdout + up.stderr
    assert not folder.exists()  # nothing until a key's first start

    assert call("alice", "/files/note.txt", b"alice's note").status == 200
    alice = call("alice").json()
    assert alice["files"] == ["note.txt"]
    assert Path(alice["volume"]) == (folder / key_volume("sandbox", "alice")).resolve()
    assert _private(folder) and _private(Path(alice["volume"]))

    # Another key: a folder of its own, without alice's file.
    bob = call("bob").json()
    assert bob["volume"] != alice["volume"] and bob["files"] == []
    assert call("bob", "/files/note.txt").status == 404
    [row] = [i for i in mesh.keyed("sandbox") if i["key"] == "alice"]
    assert row["volume"] == key_volume("sandbox", "alice")

    # Asleep (its process gone), then woken by a request: the same folder, the file still there.
    wait_until(lambda: {i["state"] for i in mesh.keyed("sandbox")} == {"sleeping"}, every=0.1,
               what=lambda: f"both asleep: {mesh.keyed('sandbox')}")
    assert not pid_alive(alice["pid"])
    again = call("alice", "/files/note.txt")
    assert again.status == 200 and again.body == b"alice's note"
    woken = call("alice").json()
    assert woken["pid"] != alice["pid"] and woken["volume"] == alice["volume"]

    # Keys from a request never make a path: each gets a digest-named folder under volumes/, nothing else.
    for key in HOSTILE:
        wire = key.encode().decode("latin-1")  # as raw UTF-8 on the wire
        assert call(wire, "/files/mine", key.encode()).status == 200, key
    rows = mesh.keyed("sandbox")
    assert {r["volume"] for r in rows} == {p.name for p in folder.iterdir()}
    assert all(r["volume"] == key_volume("sandbox", r["key"]) and SAFE.match(r["volume"]) for r in rows), rows
    assert all(_private(p) for p in folder.iterdir())
    assert not (mesh.state_dir / "etc").exists() and not (mesh.folder / "etc").exists()
    assert fetch(f"http://127.0.0.1:{port}/", headers={"X-Session": ""}).status == 400  # no key: nothing

    # `mesh down` keeps the folders; the next `mesh up` gives the key the same one.
    done = mesh.run("down", timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    mesh.assert_all_gone()
    assert (Path(alice["volume"]) / "note.txt").read_bytes() == b"alice's note"
    up = mesh.run("up", "-d", timeout=90)
    assert up.returncode == 0, up.stdout + up.stderr
    answer = call("alice", "/files/note.txt")
    assert answer.status == 200 and answer.body == b"alice's note"
    assert call("alice").json()["volume"] == alice["volume"]

    # `mesh down --volumes`: the mesh stops, then every key's folder goes.
    done = mesh.run("down", "--volumes", timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"removed {len(HOSTILE) + 2} volumes" in done.stdout, done.stdout
    mesh.assert_all_gone()
    assert not folder.exists()
    again_down = mesh.run("down", "--volumes", timeout=90)
    assert again_down.returncode == 0 and "removed 0 volumes" in again_down.stdout, again_down.stdout


@pytest.mark.slow
def test_an_app_without_a_volume_has_no_mesh_volume(make_mesh: MeshMaker) -> None:
    port = free_port()
    mesh = make_mesh("novol", TOML.format(port=port).replace(', volume = "/data"', ""), VOLUME_APP)
    up = mesh.run("up", "-d", timeout=90)
    assert up.returncode == 0, up.stdout + up.stderr
    answer = fetch(f"http://127.0.0.1:{port}/", headers={"X-Session": "alice"})
    assert answer.status == 200 and answer.json()["volume"] is None
    assert "volume" not in mesh.keyed("sandbox")[0]
    done = mesh.run("down", timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (mesh.state_dir / "volumes").exists()



# --- Docker: examples/sandbox/docker keeps a session's files across a sleep --------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sandbox"


def _run(port: int, session: str, code: str) -> dict[str, Any]:
    answer = fetch(f"http://127.0.0.1:{port}/run", method="POST", data=code.encode(),
                   headers={"X-Session": session}, timeout=120)
    assert answer.status == 200, f"/run answered {answer.status}: {answer.body!r}"
    result: dict[str, Any] = answer.json()
    return result


class _Volumes:
    """The engine's volumes of a mesh (by its state folder's label), each name recorded to remove at the end."""

    def __init__(self, engine: Any, mesh: Mesh) -> None:
        self.engine, self.mesh, self.seen = engine, mesh, set[str]()

    def now(self) -> dict[str, dict[str, Any]]:
        where = {"label": [f"mesh.state={self.mesh.state_dir.resolve()}"]}
        found = {v["Name"]: v for v in self.engine.api.volumes(filters=where).get("Volumes") or []}
        self.seen.update(found)
        return found

    def remove_all(self) -> None:
        import docker

        for name in self.seen:
            try:
                self.engine.api.remove_volume(name, force=True)
            except docker.errors.NotFound:
                pass


@pytest.mark.docker
def test_docker_sandbox_keeps_a_sessions_files_across_a_sleep(docker_engine: Any, base_image: str,
                                                              make_mesh: MeshMaker, tmp_path: Path) -> None:
    shutil.copytree(EXAMPLE / "app", tmp_path / "app", ignore=shutil.ignore_patterns("__pycache__"))
    name, port = unique_name("v"), free_port()
    toml = (EXAMPLE / "docker" / "mesh.toml").read_text()
    for old, new in (('name = "sandbox-docker"', f'name = "{name}"'), ("expose = 8083", f"expose = {port}"),
                     ('sleep_after = "1m"', 'sleep_after = "5s"')):
        assert old in toml
        toml = toml.replace(old, new)
    mesh = make_mesh(None, toml, None, folder=tmp_path / "docker", engine=docker_engine)
    volumes = _Volumes(docker_engine, mesh)
    try:
        up = mesh.run("up", "-d", "--runtime", "docker")
        assert up.returncode == 0, up.stdout + up.stderr
        wrote = _run(port, "alice", 'import os; open("notes.txt", "w").write("hi"); print(os.getcwd())')
        assert wrote["exit"] == 0 and wrote["stdout"].startswith("/data/"), wrote
        bob = _run(port, "bob", "import os; print(os.getcwd()); print(os.listdir('/data')); print(os.listdir())")
        cwd, inside, files = bob["stdout"].splitlines()
        assert cwd != wrote["stdout"].strip() and inside == repr([Path(cwd).name]) and files == "[]", bob

        # Alice's volume: labelled as this mesh's (never with the key), in her app container only.
        rows = {r["key"]: r for r in mesh.keyed("sandbox")}
        found = volumes.now()
        assert len(found) == 2, found
        mine = [v for v in found.values() if v["Labels"].get("mesh.key") == rows["alice"]["label"]]
        assert len(mine) == 1
        labels = mine[0]["Labels"]
        assert labels["mesh.mesh"] == name and labels["mesh.role"] == "volume" and labels["mesh.service"] == "sandbox"
        assert "alice" not in mine[0]["Name"] and "alice" not in "".join(labels.values())
        assert mine[0]["Name"].endswith(rows["alice"]["volume"])
        assert _run(port, "alice", "print(1)")["exit"] == 0  # awake now, for a few seconds
        containers = [c for c in mesh.containers() if c["Labels"].get("mesh.key") == rows["alice"]["label"]]
        mesh.remember()
        mounts = {c["Labels"]["mesh.role"]: [m for m in c["Mounts"] if m["Type"] == "volume"] for c in containers}
        assert [(m["Name"], m["Destination"]) for m in mounts["app"]] == [(mine[0]["Name"], "/data")]
        assert mounts["sidecar"] == []

        # Asleep (both containers removed), then woken: the file is still there.
        wait_until(lambda: {i["state"] for i in mesh.keyed("sandbox")} == {"sleeping"}, every=0.2, timeout=90,
                   what=lambda: f"both asleep: {mesh.keyed('sandbox')}")
        assert not [c for c in mesh.containers() if "mesh.key" in c["Labels"]]
        assert _run(port, "alice", 'print(open("notes.txt").read())')["stdout"] == "hi\n"

        # `mesh down` keeps the volumes; the next `mesh up` finds alice's file; `--volumes` removes them.
        down = mesh.run("down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert set(volumes.now()) == set(found)
        up = mesh.run("up", "-d", "--runtime", "docker")
        assert up.returncode == 0, up.stdout + up.stderr
        assert _run(port, "alice", 'print(open("notes.txt").read())')["stdout"] == "hi\n"
        down = mesh.run("down", "--volumes")
        assert down.returncode == 0, down.stdout + down.stderr
        assert "removed 2 volumes" in down.stdout, down.stdout
        assert volumes.now() == {} and mesh.containers() == [] and mesh.networks() == []
    finally:
        volumes.now()
        mesh.cleanup()  # first: a volume in use by a container stays
        volumes.remove_all()


def test_volume_names_on_docker_keep_meshes_of_one_name_apart() -> None:
    from mesh.control.docker.volumes import volume_name

    one, two = volume_name("m", "/a/.mesh/m", "sandbox-k-0"), volume_name("m", "/b/.mesh/m", "sandbox-k-0")
    assert one != two and one.startswith("mesh-m-") and one.endswith("-sandbox-k-0")
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", one)
    assert os.sep not in one
