"""Images for the docker runtime: mesh/base made from Debian packages and PyPI, service images.

Needs a Docker engine (scripts/dockerd.sh starts one) and root to build the
base the first time (debootstrap); the base is kept between runs. Without an
engine these tests skip, or fail when MESH_REQUIRE_DOCKER=1. Every container
and image a test makes beyond the cached base is removed by its id.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import docker
import pytest

import mesh
from mesh.config import load
from mesh.control.docker import images, rootfs

from ..docker_support import base_image, docker_engine, leftovers, run_container  # noqa: F401

VERSION = mesh.__version__


def _unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def _service_folder(folder: Path, greeting: str = "hello") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Dockerfile").write_text(
        "FROM mesh/base\n"
        "COPY app.py /app/app.py\n"
        'CMD ["python3", "/app/app.py"]\n')
    (folder / "app.py").write_text(
        "import aiohttp, mesh\n"
        f"print('{greeting} from mesh', mesh.__version__, 'aiohttp', aiohttp.__version__)\n")
    return folder


# --- without an engine ---------------------------------------------------------------------------

def test_docker_client_says_how_to_start_the_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    with pytest.raises(images.DockerUnavailable) as caught:
        images.docker_client(timeout=5)
    message = str(caught.value)
    assert f"unix://{tmp_path}/no-engine.sock" in message
    assert "scripts/dockerd.sh" in message


def test_source_hash_follows_the_source(tmp_path):
    root = images.source_root()
    copy = tmp_path / "src"
    copy.mkdir()
    shutil.copy(root / "pyproject.toml", copy)
    for package in ("mesh", "plugins"):
        shutil.copytree(root / package, copy / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    first = images.source_hash(copy)
    (copy / "mesh" / "__pycache__").mkdir(exist_ok=True)
    (copy / "mesh" / "__pycache__" / "junk.cpython-311.pyc").write_bytes(b"junk")
    assert images.source_hash(copy) == first, "caches are not source"
    with open(copy / "mesh" / "config.py", "a") as f:
        f.write("\n# changed\n")
    assert images.source_hash(copy) != first


def test_mounts_under(tmp_path):
    assert rootfs.mounts_under(tmp_path) == []
    assert "/" in rootfs.mounts_under(Path("/"))
    assert rootfs._unescape(r"/tmp/a\040b") == "/tmp/a b"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount")
def test_temporary_trees_are_unmounted_before_removal(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("host data")
    tree = tmp_path / "work"
    (tree / "rootfs" / "proc").mkdir(parents=True)
    (tree / "rootfs" / "host").mkdir()
    subprocess.run(["mount", "-t", "proc", "proc", str(tree / "rootfs" / "proc")], check=True)
    subprocess.run(["mount", "--bind", str(precious), str(tree / "rootfs" / "host")], check=True)
    try:
        assert len(rootfs.mounts_under(tree)) == 2
        lines: list[str] = []
        assert rootfs.remove_tree(tree, lines.append)
        assert not tree.exists()
        assert (precious / "keep").read_text() == "host data", "removal reached into a mount"
    finally:
        for point in rootfs.mounts_under(tree):
            subprocess.run(["umount", "-l", point])


def test_build_service_wants_a_dockerfile(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(images.ImageError, match="has no Dockerfile"):
        images.build_service(None, "mesh-x-y", tmp_path / "empty", log=lambda _: None)
    with pytest.raises(images.ImageError, match="does not exist"):
        images.build_service(None, "mesh-x-y", tmp_path / "missing", log=lambda _: None)


# --- the base image -------------------------------------------------------------------------------

@pytest.mark.docker
def test_base_image_has_mesh_and_its_dependencies(docker_engine, base_image, leftovers):
    code, output = run_container(
        docker_engine, base_image,
        ["python3", "-c", "import mesh, aiohttp, httptools, uvloop, jwt, limits, cachetools; "
                          "print(mesh.__version__)"],
        leftovers)
    assert code == 0, output
    assert output.strip().splitlines()[-1] == VERSION


@pytest.mark.docker
def test_base_image_has_the_mesh_command(docker_engine, base_image, leftovers):
    code, output = run_container(docker_engine, base_image, ["mesh", "--version"], leftovers)
    assert (code, output.strip()) == (0, f"mesh {VERSION}")


@pytest.mark.docker
def test_base_image_can_firewall_its_namespace(docker_engine, base_image, leftovers):
    code, output = run_container(docker_engine, base_image, ["iptables", "--version"], leftovers)
    assert code == 0 and output.startswith("iptables v1."), output
    # what the docker runtime does in an app's network namespace: only loopback may reach the app
    code, output = run_container(
        docker_engine, base_image,
        ["sh", "-c", "iptables -A INPUT -p tcp --dport 8000 ! -i lo -j DROP && iptables -S INPUT"],
        leftovers, cap_add=["NET_ADMIN"])
    assert code == 0, output
    assert "--dport 8000 -j DROP" in output


@pytest.mark.docker
def test_base_image_is_tagged_and_labelled(docker_engine, base_image):
    # built again (a no-op unless the mesh source changed since the session began)
    image = docker_engine.images.get(images.build_base(docker_engine, log=lambda _: None))
    assert images.base_tag() in image.tags and "mesh/base:latest" in image.tags
    assert image.labels[images.LABEL_VERSION] == VERSION
    assert image.labels[images.LABEL_SOURCE] == images.source_hash()
    config = image.attrs["Config"]
    assert config["WorkingDir"] == "/app"
    assert config["Cmd"] == ["python3"]
    assert any(e.startswith("PATH=/opt/mesh/bin:") for e in config["Env"])


@pytest.mark.docker
def test_base_image_is_cached(docker_engine, base_image):
    current = images.build_base(docker_engine, log=lambda _: None)
    lines: list[str] = []
    started = time.monotonic()
    assert images.build_base(docker_engine, log=lines.append) == current
    assert time.monotonic() - started < 10
    assert any("up to date" in line for line in lines), lines


# --- service images -------------------------------------------------------------------------------

@pytest.mark.docker
def test_service_image_from_mesh_base(docker_engine, base_image, leftovers, tmp_path):
    folder = _service_folder(tmp_path / "web")
    name = f"mesh-{_unique()}-web"
    lines: list[str] = []
    first = leftovers.image(images.build_service(docker_engine, name, folder, log=lines.append,
                                                 network_mode="none"))
    image = docker_engine.images.get(first)
    assert f"{name}:latest" in image.tags
    assert image.labels[images.LABEL_CONTEXT] == images.context_hash(folder, base_image)

    code, output = run_container(docker_engine, first, None, leftovers)
    assert code == 0, output
    assert f"hello from mesh {VERSION} aiohttp" in output

    # unchanged folder: nothing rebuilt
    lines.clear()
    assert images.build_service(docker_engine, name, folder, log=lines.append,
                                network_mode="none") == first
    assert any("up to date" in line for line in lines), lines

    # changed folder: a new image, and the replaced one is gone
    _service_folder(folder, greeting="hi")
    second = leftovers.image(images.build_service(docker_engine, name, folder,
                                                  log=lines.append, network_mode="none"))
    assert second != first
    assert not any(first == i.id for i in docker_engine.images.list(all=True))
    code, output = run_container(docker_engine, second, None, leftovers)
    assert code == 0 and "hi from mesh" in output, output


@pytest.mark.docker
def test_failed_service_build_says_why(docker_engine, base_image, leftovers, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "Dockerfile").write_text("FROM mesh/base\nRUN echo about to fail && exit 3\n")
    name = f"mesh-{_unique()}-broken"
    with pytest.raises(images.ImageError) as caught:
        images.build_service(docker_engine, name, folder, log=lambda _: None, network_mode="none")
    message = str(caught.value)
    assert name in message and "non-zero code: 3" in message and "about to fail" in message
    with pytest.raises(docker.errors.ImageNotFound):
        docker_engine.images.get(name)


def _write_mesh(root: Path, mesh_name: str, services: str) -> Path:
    (root / "mesh.toml").write_text(f'[mesh]\nname = "{mesh_name}"\n\n{services}')
    return root / "mesh.toml"


@pytest.mark.docker
def test_ensure_images_builds_what_mesh_build_needs(docker_engine, base_image, leftovers,
                                                    tmp_path):
    mesh_name = _unique()
    _service_folder(tmp_path / "services" / "web")
    config = load(_write_mesh(tmp_path, mesh_name, (
        '[services.web]\nbuild = "services/web"\nport = 8000\n\n'
        f'[services.plain]\nimage = "{images.base_tag()}"\nport = 8000\n')))
    lines: list[str] = []
    built = images.ensure_images(config, docker_engine, log=lines.append, network_mode="none")
    leftovers.image(built.services["web"])
    assert built.base == base_image
    assert built.services["plain"] == base_image
    web = docker_engine.images.get(images.service_image(mesh_name, "web"))
    assert web.id == built.services["web"]
    assert web.labels[images.LABEL_MESH] == mesh_name
    assert web.labels[images.LABEL_SERVICE] == "web"

    lines.clear()
    again = images.ensure_images(config, docker_engine, log=lines.append, network_mode="none")
    leftovers.image(again.services["web"])
    if again.base == built.base:
        assert again.services == built.services
        assert sum("up to date" in line for line in lines) == 2, lines
    else:  # the mesh source changed meanwhile (someone is editing it): the service follows its base
        assert again.services["web"] != built.services["web"]


@pytest.mark.docker
def test_ensure_images_lists_every_problem_before_building(docker_engine, tmp_path):
    (tmp_path / "nodockerfile").mkdir()
    config = load(_write_mesh(tmp_path, _unique(), (
        '[services.a]\nbuild = "missing"\n\n'
        '[services.b]\nbuild = "nodockerfile"\n\n'
        '[services.c]\nimage = "mesh-no-such-image:1"\n')))
    with pytest.raises(images.ImageError) as caught:
        images.ensure_images(config, docker_engine, log=lambda _: None)
    problems = caught.value.problems
    assert len(problems) == 3, problems
    assert problems[0].startswith("services.a.build: ") and "does not exist" in problems[0]
    assert problems[1].startswith("services.b.build: ") and "no Dockerfile" in problems[1]
    assert problems[2].startswith("services.c.image: ") and "never pulls" in problems[2]
