"""Docker images for the docker runtime: the base image ``mesh/base`` and one image per service.

``mesh/base`` is Debian bookworm + Python 3 + mesh in a virtualenv at
/opt/mesh, made from Debian packages and PyPI alone, so it builds where no
image registry is reachable. It comes in two layers, each cached:

1. ``mesh/base-os:<key>``: Debian with a virtualenv at /opt/mesh holding
   mesh's *dependencies*, made by `mesh.control.docker.rootfs` (debootstrap,
   pip under ``chroot``, ``docker import``). Slow (a minute or two) and needs
   root; redone only when the recipe or mesh's dependency list change.
2. ``mesh/base:<version>`` (and ``:latest``): a ``docker build`` on top that
   pip-installs this mesh source tree, without network. A few seconds; redone
   whenever the source changes (label ``mesh.source``), so a sidecar container
   always runs the code of the checkout that built it.

Services with ``build = "folder"`` become ``mesh-<mesh>-<service>:latest``,
rebuilt when the folder's content or the base image changes (label
``mesh.context``); services with ``image = "..."`` must already be in the
local engine (mesh never pulls).

    client = docker_client()              # or DockerUnavailable saying how to start the engine
    built = ensure_images(config, client, log=print)
    built.base, built.services["web"]     # image ids

Everything here blocks; from asyncio, call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh import __version__
from mesh.control.docker.engine import (
    CHECKOUT,
    DockerUnavailable,
    ImageError,
    Log,
    docker_client,
    find_image,
    short_id,
    step,
)
from mesh.control.docker.rootfs import (
    BASE_OS_IMAGE,
    LABEL_OS_KEY,
    RECIPE,
    build_base_os,
    drop_other_os_tags,
    os_key,
)

if TYPE_CHECKING:
    import docker

    from mesh.config import MeshConfig

# The engine's client and errors are here too: what `mesh build` and the docker runtime use.
__all__ = [
    "BASE_IMAGE", "BASE_OS_IMAGE", "BuiltImages", "DockerUnavailable", "ImageError",
    "base_tag", "build_base", "build_service", "docker_client", "ensure_images",
    "service_image", "source_root",
]

BASE_IMAGE = "mesh/base"

LABEL_VERSION = "mesh.version"
LABEL_SOURCE = "mesh.source"        # hash of the mesh source in mesh/base
LABEL_CONTEXT = "mesh.context"      # hash of a service's build folder (+ base image id)
LABEL_MESH = "mesh.mesh"
LABEL_SERVICE = "mesh.service"

_SKIP_NAMES = {"__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")


@dataclass
class BuiltImages:
    """What `ensure_images` made sure of: image ids of the base and of each docker service."""

    base: str
    services: dict[str, str] = field(default_factory=dict)


# --- names and hashes ----------------------------------------------------------------------------

def base_tag() -> str:
    """``mesh/base:<version of mesh>``."""
    return f"{BASE_IMAGE}:{__version__}"


def service_image(mesh_name: str, service: str) -> str:
    """The image a ``build`` service becomes: ``mesh-<mesh>-<service>:latest``."""
    return f"mesh-{mesh_name}-{service}:latest"


def source_root() -> Path:
    """The mesh source tree this package was installed from (pyproject.toml, mesh/, plugins/)."""
    root = CHECKOUT
    if (root / "pyproject.toml").is_file() and (root / "mesh" / "__init__.py").is_file():
        return root
    raise ImageError(f"mesh/base is built from the mesh source tree, but {root} holds no "
                     f"pyproject.toml next to mesh/: install mesh from a checkout (pip install -e .)")


def _walk(folder: Path) -> Iterator[Path]:
    """Files under ``folder`` in a stable order, without caches and build debris."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in _SKIP_NAMES and not d.endswith(_SKIP_SUFFIXES))
        for name in sorted(filenames):
            if not name.endswith(_SKIP_SUFFIXES):
                yield Path(dirpath) / name


def _hash_files(digest: Any, root: Path, paths: Iterator[Path]) -> None:
    for path in paths:
        rel = path.relative_to(root).as_posix()
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            data = b"link:" + os.readlink(path).encode()
        elif stat.S_ISREG(info.st_mode):
            data = path.read_bytes()
        else:
            continue
        executable = b"x" if info.st_mode & 0o111 else b"-"
        digest.update(f"{rel}\0{len(data)}\0".encode() + executable + b"\0" + data)


def _source_files(root: Path) -> list[tuple[Path, str]]:
    """(host path, path in the build context) of what pip needs to install mesh."""
    files = [(root / "pyproject.toml", "pyproject.toml")]
    for extra in ("README.md", "LICENSE", "setup.cfg", "setup.py", "MANIFEST.in"):
        if (root / extra).is_file():
            files.append((root / extra, extra))
    for package in ("mesh", "plugins"):
        if (root / package).is_dir():
            files += [(p, p.relative_to(root).as_posix()) for p in _walk(root / package)]
    return files


def source_hash(root: Path | None = None) -> str:
    """Hash of the mesh source that goes into mesh/base (the README aside: it changes nothing)."""
    root = root or source_root()
    digest = hashlib.sha256(f"mesh-source:{RECIPE}\0".encode())
    _hash_files(digest, root, iter(p for p, rel in _source_files(root) if rel != "README.md"))
    return digest.hexdigest()[:16]


def _dependencies(root: Path) -> list[str]:
    with open(root / "pyproject.toml", "rb") as f:
        project = tomllib.load(f).get("project", {})
    return [str(d) for d in project.get("dependencies", [])]


def context_hash(folder: Path, base_id: str = "") -> str:
    """Hash of a build folder's files (plus the base image id, so a new base rebuilds services)."""
    digest = hashlib.sha256(f"mesh-context:{base_id}\0".encode())
    _hash_files(digest, folder, _walk(folder))
    return digest.hexdigest()[:16]


# --- mesh/base: this mesh source on top of mesh/base-os -------------------------------------------

@contextlib.contextmanager
def _build_lock(log: Log) -> Iterator[None]:
    """One base build at a time on this machine (parallel test runs, two `mesh build`s)."""
    path = Path(tempfile.gettempdir()) / "mesh-images.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another mesh image build to finish (lock {path})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_replaced(client: docker.DockerClient, old_id: str | None, new_id: str, log: Log) -> None:
    """Drop an image a rebuild replaced, if nothing else uses it (never forced)."""
    import docker

    if not old_id or old_id == new_id:
        return
    with contextlib.suppress(docker.errors.APIError):
        client.images.remove(old_id, noprune=False)
        log(f"removed the replaced image {short_id(old_id)}")


_MESH_LAYER = """\
FROM {base_os}
COPY src /tmp/mesh-src
RUN python -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir \\
        --disable-pip-version-check --quiet /tmp/mesh-src \\
 && python -m pip check \\
 && rm -rf /tmp/mesh-src \\
 && mesh --version
"""


def _stream_build(client: docker.DockerClient, *, what: str, log: Log, prefix: str,
                  **kwargs: Any) -> str:
    """Run a build through the low-level API, logging its output; return the image id."""
    import docker

    lines: list[str] = []
    image_id = None
    try:
        for chunk in client.api.build(decode=True, rm=True, forcerm=True, pull=False, **kwargs):
            if "stream" in chunk:
                for line in chunk["stream"].splitlines():
                    if line.strip():
                        lines.append(line)
                        log(prefix + line)
            if "aux" in chunk and isinstance(chunk["aux"], dict) and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
            if "error" in chunk:
                error = str(chunk["error"]).strip()
                tail = "\n".join("  | " + line for line in lines[-15:])
                hint = ""
                if any(word in error for word in ("pull access denied", "manifest", "registry",
                                                  "repository does not exist")):
                    hint = ("\n  (mesh never pulls: the Dockerfile's FROM must be an image in the "
                            "local engine, such as mesh/base)")
                raise ImageError(f"{what} failed: {error}{hint}\n{tail}")
    except docker.errors.APIError as exc:
        raise ImageError(f"{what} failed: {exc.explanation or exc}") from None
    if image_id is None:
        raise ImageError(f"{what} did not report an image id")
    return image_id


def build_base(client: docker.DockerClient, *, log: Log = print, force: bool = False,
               source: Path | None = None) -> str:
    """Make sure ``mesh/base:<version>`` (and ``:latest``) holds this mesh source; return its id.

    Cached: when it exists with the same source hash, nothing is done (unless
    ``force``, which redoes everything, debootstrap included). When only the
    mesh source changed, only the top layer is rebuilt (seconds).
    """
    tag = base_tag()
    try:
        root = source or source_root()
    except ImageError:
        existing = find_image(client, tag)
        if existing is None or force:
            raise
        log(f"no mesh source tree here; using the existing {tag} ({short_id(existing.id)})")
        return existing.id
    with _build_lock(log):
        started = time.monotonic()
        src_hash = source_hash(root)
        current = find_image(client, tag)
        if current is not None and not force:
            if current.labels.get(LABEL_SOURCE) == src_hash:
                latest = find_image(client, f"{BASE_IMAGE}:latest")
                if latest is None or latest.id != current.id:
                    current.tag(BASE_IMAGE, "latest")
                log(f"{tag} is up to date ({short_id(current.id)})")
                return current.id
            log(f"{tag} was built from other mesh source: rebuilding its mesh layer")

        deps = _dependencies(root)
        key = os_key(deps)
        os_image = find_image(client, f"{BASE_OS_IMAGE}:{key}")
        if os_image is None or force:
            os_id = build_base_os(client, key, deps, log)
            drop_other_os_tags(client, key, log)
        else:
            os_id = os_image.id
            log(f"reusing {BASE_OS_IMAGE}:{key} ({short_id(os_image.id)})")

        with step(log, f"docker build {tag} (this mesh source on {BASE_OS_IMAGE}:{key})"):
            with tempfile.TemporaryDirectory(prefix="mesh-base-ctx-") as tmp:
                context = Path(tmp)
                (context / "Dockerfile").write_text(
                    _MESH_LAYER.format(base_os=f"{BASE_OS_IMAGE}:{key}"))
                for host, rel in _source_files(root):
                    target = context / "src" / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(host, target)
                readme = context / "src" / "README.md"
                if not readme.exists():  # pyproject.toml names it; a checkout may lack it
                    readme.write_text("mesh\n")
                src_hash = source_hash(context / "src")  # what is built, even if files just changed
                labels = {LABEL_VERSION: __version__, LABEL_SOURCE: src_hash, LABEL_OS_KEY: key,
                          "org.opencontainers.image.title": BASE_IMAGE,
                          "org.opencontainers.image.version": __version__}
                image_id = _stream_build(client, what=f"building {tag}", log=lambda _: None,
                                         prefix="", path=str(context), tag=tag, labels=labels,
                                         network_mode="none")
        client.api.tag(image_id, BASE_IMAGE, "latest", force=True)
        # A replaced mesh/base is left alone (untagged): its own layer is about a megabyte, and
        # running meshes or test sessions may still start containers from it by id.
        # `docker image prune` reclaims it, and with it any base-os no image uses any more.
        log(f"{tag} ready ({short_id(image_id)}, base-os {short_id(os_id)}) "
            f"in {time.monotonic() - started:.1f}s")
        return image_id


# --- services -------------------------------------------------------------------------------------

def _dockerfile_problem(folder: Path, where: str) -> str | None:
    if not folder.is_dir():
        return f"{where}: build folder {folder} does not exist"
    if not (folder / "Dockerfile").is_file():
        return f"{where}: build folder {folder} has no Dockerfile"
    return None


def build_service(client: docker.DockerClient, name: str, folder: str | Path, *,
                  log: Log = print, labels: dict[str, str] | None = None,
                  network_mode: str | None = None, force: bool = False) -> str:
    """Build ``folder`` (which holds a Dockerfile, maybe ``FROM mesh/base``) as image ``name``.

    ``name`` is a reference such as ``mesh-shop-web`` or ``mesh-shop-web:latest``
    (see `service_image`). Never pulls. Skips the build when an image ``name``
    already carries the folder's content hash (label ``mesh.context``, which
    also covers the current ``mesh/base``), unless ``force``. ``network_mode``
    is for RUN steps (``"none"`` to forbid network; default: the engine's).
    Returns the image id.
    """
    folder = Path(folder).resolve()
    problem = _dockerfile_problem(folder, name)
    if problem:
        raise ImageError(problem)
    ref = name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"
    base = find_image(client, f"{BASE_IMAGE}:latest")
    digest = context_hash(folder, base.id if base is not None else "")
    current = find_image(client, ref)
    if current is not None and not force and current.labels.get(LABEL_CONTEXT) == digest:
        log(f"{ref} is up to date ({short_id(current.id)})")
        return current.id
    all_labels = {**(labels or {}), LABEL_CONTEXT: digest, LABEL_VERSION: __version__}
    short = ref.rsplit(":", 1)[0]
    with step(log, f"docker build {ref} from {folder}"):
        image_id = _stream_build(client, what=f"building {ref} from {folder}", log=log,
                                 prefix=f"  {short} | ", path=str(folder), tag=ref,
                                 labels=all_labels, network_mode=network_mode)
    _remove_replaced(client, current.id if current is not None else None, image_id, log)
    return image_id


def ensure_images(config: MeshConfig, client: docker.DockerClient, log: Log = print, *,
                  force: bool = False, network_mode: str | None = None) -> BuiltImages:
    """What `mesh build` does, and `mesh up --runtime docker` before starting anything.

    Builds ``mesh/base`` if missing or out of date, then each service with
    ``build`` whose folder (or the base) changed (all of them with ``force``),
    and checks that each ``image = "..."`` is in the local engine. Problems
    found before building (missing folders, Dockerfiles, images) are raised
    together as one `ImageError`, one line each.
    """
    problems = []
    for name, service in config.services.items():
        if service.build:
            problem = _dockerfile_problem((config.root / service.build).resolve(),
                                          f"services.{name}.build")
            if problem:
                problems.append(problem)
        elif service.image and find_image(client, service.image) is None:
            problems.append(
                f"services.{name}.image: {service.image!r} is not in the local Docker engine, and "
                f"mesh never pulls: load it (docker load) or build it, or use 'build' instead")
    if problems:
        raise ImageError(problems)

    built = BuiltImages(base=build_base(client, log=log))
    for name, service in config.services.items():
        if service.build:
            built.services[name] = build_service(
                client, service_image(config.name, name), config.root / service.build, log=log,
                labels={LABEL_MESH: config.name, LABEL_SERVICE: name},
                network_mode=network_mode, force=force)
        elif service.image:
            image = find_image(client, service.image)
            if image is None:  # removed meanwhile
                raise ImageError(f"services.{name}.image: {service.image!r} is not in the local "
                                 f"Docker engine")
            built.services[name] = image.id
    return built
