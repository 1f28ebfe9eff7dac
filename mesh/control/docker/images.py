"""Docker images for the docker runtime: the base image ``mesh/base`` and one image per service.

``mesh/base`` is Debian bookworm + Python 3 + mesh in a virtualenv at
/opt/mesh, made from Debian packages and PyPI alone, so it builds where no
image registry is reachable. It comes in two layers, each cached:

1. ``mesh/base-os:<key>``: ``debootstrap --variant=minbase`` (python3,
   python3-venv, ca-certificates, iptables, netbase), then a virtualenv at
   /opt/mesh filled with mesh's *dependencies* by the root filesystem's own
   Python under ``chroot`` (with the host's pip configuration, so it reaches
   the same index), then ``tar`` + ``docker import``. Slow (a minute or two)
   and needs root; ``<key>`` hashes the recipe and mesh's dependency list, so
   it is redone only when those change.
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

import configparser
import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import ssl
import stat
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh import __version__
from mesh.errors import MeshError

if TYPE_CHECKING:
    import docker

    from mesh.config import MeshConfig

__all__ = [
    "BASE_IMAGE", "BASE_OS_IMAGE", "BuiltImages", "DockerUnavailable", "ImageError",
    "base_tag", "build_base", "build_service", "docker_client", "ensure_images",
    "service_image", "source_root",
]

Log = Callable[[str], None]

BASE_IMAGE = "mesh/base"
BASE_OS_IMAGE = "mesh/base-os"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates", "iptables", "netbase")
VENV = "/opt/mesh"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
RECIPE = 1  # bump when the base-os recipe changes in a way the key would not see
IMAGE_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_LOG_NAME = "mesh-base-build.log"

LABEL_VERSION = "mesh.version"
LABEL_SOURCE = "mesh.source"        # hash of the mesh source in mesh/base
LABEL_OS_KEY = "mesh.base-os"       # key of the mesh/base-os image
LABEL_CONTEXT = "mesh.context"      # hash of a service's build folder (+ base image id)
LABEL_MESH = "mesh.mesh"
LABEL_SERVICE = "mesh.service"

_SKIP_NAMES = {"__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".egg-info")


class ImageError(MeshError):
    """An image could not be built or found; ``problems`` lists each reason, one a line."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class DockerUnavailable(MeshError):
    """No Docker engine answers (or the docker package is missing); the message says what to do."""


@dataclass
class BuiltImages:
    """What `ensure_images` made sure of: image ids of the base and of each docker service."""

    base: str
    services: dict[str, str] = field(default_factory=dict)


# --- the engine ----------------------------------------------------------------------------------

# The checkout mesh runs from: pyproject.toml, mesh/, plugins/, scripts/ (this file is mesh/control/docker/images.py).
CHECKOUT = Path(__file__).resolve().parents[3]


def _start_hint() -> str:
    script = CHECKOUT / "scripts" / "dockerd.sh"
    if script.is_file():
        return f"start it with: sudo {script}"
    return "start it (sudo systemctl start docker, or sudo dockerd &)"


def docker_client(timeout: float = 120) -> docker.DockerClient:
    """A client of the local engine (``DOCKER_HOST`` and friends honoured) that answered a ping.

    Raises `DockerUnavailable` saying how to start the engine when none answers.
    """
    try:
        import docker
    except ImportError:  # pragma: no cover - a dependency of mesh
        raise DockerUnavailable("the docker runtime needs the Python package 'docker': "
                                "pip install docker") from None
    where = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        client = docker.from_env(timeout=int(timeout))
        client.ping()
    except docker.errors.DockerException as exc:
        reason = str(exc)
        if "ermission denied" in reason:
            raise DockerUnavailable(
                f"the Docker engine at {where} refused this user ({reason}); "
                f"run as root or join the 'docker' group") from None
        raise DockerUnavailable(f"no Docker engine answers at {where} ({reason}); "
                                f"{_start_hint()}") from None
    return client


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


def _os_key(deps: list[str]) -> str:
    recipe = {"recipe": RECIPE, "suite": SUITE, "packages": sorted(PACKAGES),
              "venv": VENV, "dependencies": sorted(deps)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def context_hash(folder: Path, base_id: str = "") -> str:
    """Hash of a build folder's files (plus the base image id, so a new base rebuilds services)."""
    digest = hashlib.sha256(f"mesh-context:{base_id}\0".encode())
    _hash_files(digest, folder, _walk(folder))
    return digest.hexdigest()[:16]


# --- small helpers -------------------------------------------------------------------------------

@contextlib.contextmanager
def _step(log: Log, what: str) -> Iterator[None]:
    log(f"{what} ...")
    started = time.monotonic()
    yield
    log(f"{what}: done in {time.monotonic() - started:.1f}s")


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


def _short(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


def _image(client: docker.DockerClient, ref: str) -> Any | None:
    import docker

    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None


def _remove_replaced(client: docker.DockerClient, old_id: str | None, new_id: str, log: Log) -> None:
    """Drop an image a rebuild replaced, if nothing else uses it (never forced)."""
    import docker

    if not old_id or old_id == new_id:
        return
    with contextlib.suppress(docker.errors.APIError):
        client.images.remove(old_id, noprune=False)
        log(f"removed the replaced image {_short(old_id)}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("  | " + line for line in text)


def _run(cmd: list[str], *, what: str, logfile: Path, env: dict[str, str] | None = None,
         timeout: float = 1200) -> None:
    """Run ``cmd`` with its output appended to ``logfile``; raise `ImageError` with its tail if it fails.

    The command runs in its own process group, killed whole if we are interrupted.
    """
    with open(logfile, "ab") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except BaseException:
            _kill_group(proc)
            raise
    if code != 0:
        raise ImageError(f"{what} failed (exit {code}); the end of {logfile}:\n{_tail(logfile)}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- mounts: never remove a tree while something is mounted inside it ----------------------------

def _unescape(field: str) -> str:
    # /proc/self/mountinfo writes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1:i + 4]) == 3 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, deepest first."""
    prefix = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(set(found), key=len, reverse=True)


def _unmount_all(path: Path, log: Log) -> list[str]:
    """Unmount everything at or below ``path``; return what is still mounted."""
    for _ in range(3):
        points = mounts_under(path)
        if not points:
            return []
        for point in points:
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                log(f"umount {point} failed; detaching it lazily")
                subprocess.run(["umount", "-l", point], capture_output=True)
    return mounts_under(path)


def _remove_tree(path: Path, log: Log) -> bool:
    """Remove ``path`` once nothing is mounted below it; never reach into a mount."""
    if not path.exists():
        return True
    left = _unmount_all(path, log)
    if left:
        log(f"warning: left {path} in place: still mounted there: {', '.join(left)}")
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not path.exists()


# --- pip configuration of the host, for pip inside the chroot ------------------------------------

def _pip_config_files() -> list[tuple[Path, str]]:
    """(host file, path in the root filesystem) of every pip configuration file pip would read here."""
    pairs: list[tuple[Path, str]] = []
    for base in (os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":"):
        if base and (Path(base) / "pip").is_dir():
            pairs.append((Path(base) / "pip", "/etc/xdg/pip"))  # the folder: constraint files live there
    pairs.append((Path("/etc/pip.conf"), "/etc/pip.conf"))
    home = Path.home()
    pairs.append((home / ".pip" / "pip.conf", "/root/.pip/pip.conf"))
    xdg_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    pairs.append((xdg_home / "pip" / "pip.conf", "/root/.config/pip/pip.conf"))
    venv = os.environ.get("VIRTUAL_ENV")
    if venv:
        pairs.append((Path(venv) / "pip.conf", f"{VENV}/pip.conf"))
    config_file = os.environ.get("PIP_CONFIG_FILE")
    if config_file and config_file != os.devnull:
        pairs.append((Path(config_file), "/tmp/mesh-pip/pip-config-file.conf"))
    return [(host, inside) for host, inside in pairs if host.exists()]


def _config_values(files: list[tuple[Path, str]], key: str) -> list[str]:
    values = []
    for host, _ in files:
        for conf in ([host] if host.is_file() else sorted(host.glob("*.conf"))):
            parser = configparser.RawConfigParser()
            with contextlib.suppress(configparser.Error, OSError, UnicodeDecodeError):
                parser.read(conf)
                for section in ("global", "install"):
                    if parser.has_option(section, key):
                        values.append(parser.get(section, key).strip())
    return values


def _host_ca_bundle(files: list[tuple[Path, str]]) -> Path | None:
    """The CA bundle pip uses on the host: its configured ``cert``, else the system's.

    The root filesystem's own bundle lacks any CA added on the host (a proxy's), so
    pip in the chroot is given the host's for the build.
    """
    candidates = [os.environ.get("PIP_CERT"), *reversed(_config_values(files, "cert")),
                  os.environ.get("REQUESTS_CA_BUNDLE"), os.environ.get("SSL_CERT_FILE"),
                  ssl.get_default_verify_paths().cafile, "/etc/ssl/certs/ca-certificates.crt"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


# --- mesh/base-os: debootstrap + venv with mesh's dependencies, imported ------------------------

def _check_root_tools() -> None:
    problems = []
    if os.geteuid() != 0:
        problems.append("building mesh/base-os needs root (debootstrap, chroot, mount): "
                        "run `sudo mesh build`")
    for tool, package in (("debootstrap", "debootstrap"), ("chroot", "coreutils"), ("tar", "tar"),
                          ("mount", "mount"), ("umount", "mount")):
        if shutil.which(tool) is None:
            problems.append(f"building mesh/base-os needs `{tool}`: apt-get install {package}")
    if problems:
        raise ImageError(problems)


def _chroot_env(extra: dict[str, str]) -> dict[str, str]:
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/root", "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1", "PIP_PROGRESS_BAR": "off"}
    for key, value in os.environ.items():
        if key.startswith("PIP_") or key.lower() in ("http_proxy", "https_proxy", "no_proxy",
                                                     "all_proxy"):
            env.setdefault(key, value)
    env.pop("PIP_CONFIG_FILE", None)
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    env.update(extra)
    return env


def _copy_in(rootfs: Path, host: Path, inside: str, created: list[Path]) -> None:
    """Copy a host file or folder to ``inside`` the root filesystem, noting what to remove later.

    Never overwrites: what the root filesystem already has stays as it is.
    """
    target = rootfs / inside.lstrip("/")
    if target.exists() or target.is_symlink():
        return
    top = target
    while not top.parent.exists():
        top = top.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    if host.is_dir():
        shutil.copytree(host, target)
    else:
        shutil.copyfile(host, target)
    created.append(top)


def _copy_pip_files(rootfs: Path, created: list[Path]) -> dict[str, str]:
    """Give pip in the chroot the host's configuration; return the environment it needs."""
    files = _pip_config_files()
    env: dict[str, str] = {}
    for host, inside in files:
        _copy_in(rootfs, host, inside, created)
        if inside.startswith("/tmp/mesh-pip/pip-config-file"):
            env["PIP_CONFIG_FILE"] = inside
    # Files the configuration names by absolute path (constraints, requirements) that the
    # root filesystem lacks: copy them to the same path. Folders (find-links) are left out.
    named: list[str] = []
    for key in ("constraint", "requirement", "client-cert"):
        named += _config_values(files, key)
        named.append(os.environ.get("PIP_" + key.upper().replace("-", "_"), ""))
    for value in named:
        for item in value.split():
            path = Path(item)
            if path.is_absolute() and path.is_file() and not (rootfs / item.lstrip("/")).exists():
                _copy_in(rootfs, path, item, created)
    bundle = _host_ca_bundle(files)
    if bundle is not None:
        _copy_in(rootfs, bundle, "/tmp/mesh-pip/ca.pem", created)
        env["PIP_CERT"] = "/tmp/mesh-pip/ca.pem"
    return env


def _clean_rootfs(rootfs: Path) -> None:
    """Leave out what an image does not need: apt caches and lists, man pages, build leftovers."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "usr/share/man/*", "usr/share/info/*", "var/log/*.log", "var/log/apt/*",
                    "tmp/*", "var/tmp/*", "root/.cache"):
        for path in rootfs.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.name != "lock":
                path.unlink(missing_ok=True)
    (rootfs / "etc/dpkg/dpkg.cfg.d/99mesh-unsafe-io").unlink(missing_ok=True)
    for name in ("etc/resolv.conf", "etc/hostname"):  # the engine provides both at run time
        path = rootfs / name
        if path.is_symlink():
            path.unlink()
        path.write_text("")
    (rootfs / "app").mkdir(exist_ok=True)


def _build_base_os(client: docker.DockerClient, key: str, deps: list[str], log: Log) -> str:
    _check_root_tools()
    mirror = os.environ.get("MESH_DEBIAN_MIRROR") or DEFAULT_MIRROR
    logfile = Path(tempfile.gettempdir()) / BUILD_LOG_NAME
    logfile.write_text(f"mesh/base-os:{key} build, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    log(f"building {BASE_OS_IMAGE}:{key} (Debian {SUITE} + Python venv with mesh's dependencies); "
        f"full log: {logfile}")
    work = Path(tempfile.mkdtemp(prefix="mesh-base-", dir=os.environ.get("MESH_BUILD_TMPDIR")))
    rootfs = work / "rootfs"
    try:
        # dpkg without fsync: a throwaway tree, imported whole at the end
        (rootfs / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True)
        (rootfs / "etc/dpkg/dpkg.cfg.d/99mesh-unsafe-io").write_text("force-unsafe-io\n")
        with _step(log, f"debootstrap {SUITE} ({', '.join(PACKAGES)}) from {mirror}"):
            _run(["debootstrap", "--variant=minbase", "--components=main",
                  "--include=" + ",".join(PACKAGES), SUITE, str(rootfs), mirror],
                 what="debootstrap", logfile=logfile, env={**os.environ, "LANG": "C.UTF-8"})

        created: list[Path] = []
        with _step(log, f"pip install mesh's dependencies into {VENV} (chroot)"):
            resolv = rootfs / "etc/resolv.conf"
            if resolv.is_symlink():
                resolv.unlink()
            with contextlib.suppress(OSError):
                resolv.write_bytes(Path("/etc/resolv.conf").read_bytes())
            _run(["mount", "-t", "proc", "proc", str(rootfs / "proc")], what="mount /proc",
                 logfile=logfile)
            null = rootfs / "dev/null"
            if not (null.exists() and stat.S_ISCHR(null.stat().st_mode)):
                _run(["mount", "--bind", "/dev", str(rootfs / "dev")], what="mount /dev",
                     logfile=logfile)
            try:
                _run(["chroot", str(rootfs), "/usr/bin/python3", "-m", "venv", VENV],
                     what="python3 -m venv", logfile=logfile, env=_chroot_env({}))
                env = _chroot_env(_copy_pip_files(rootfs, created))
                _run(["chroot", str(rootfs), f"{VENV}/bin/python", "-m", "pip", "install",
                      "setuptools>=68", "wheel", *deps],
                     what="pip install (in the chroot)", logfile=logfile, env=env)
                _run(["chroot", str(rootfs), f"{VENV}/bin/python", "-m", "pip", "check"],
                     what="pip check", logfile=logfile, env=env)
            finally:
                left = _unmount_all(rootfs, log)
                for path in reversed(created):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
            if left:
                raise ImageError(f"could not unmount {', '.join(left)}; not packing {rootfs}")
            _clean_rootfs(rootfs)

        tarball = work / "rootfs.tar"
        with _step(log, "tar the root filesystem"):
            if mounts_under(rootfs):  # never pack the host's /proc or /dev
                raise ImageError(f"something is mounted under {rootfs}; not packing it")
            _run(["tar", "--numeric-owner", "-C", str(rootfs),
                  "--exclude=./proc/*", "--exclude=./sys/*", "--exclude=./dev/*",
                  "-cf", str(tarball), "."], what="tar", logfile=logfile)
        with _step(log, f"docker import as {BASE_OS_IMAGE}:{key} "
                        f"({tarball.stat().st_size / 1e6:.0f} MB)"):
            changes = [
                f"ENV PATH={IMAGE_PATH}",
                f"ENV VIRTUAL_ENV={VENV}",
                "ENV LANG=C.UTF-8",
                "ENV PYTHONUNBUFFERED=1",
                "WORKDIR /app",
                'CMD ["python3"]',
                f"LABEL {LABEL_OS_KEY}={key}",
                f"LABEL org.opencontainers.image.title={BASE_OS_IMAGE}",
                f"LABEL org.opencontainers.image.base.name=debian:{SUITE}",
            ]
            client.api.import_image(src=str(tarball), repository=BASE_OS_IMAGE, tag=key,
                                    changes=changes)
            image = _image(client, f"{BASE_OS_IMAGE}:{key}")
            if image is None:
                raise ImageError(f"docker import did not produce {BASE_OS_IMAGE}:{key}")
        return image.id
    finally:
        started = time.monotonic()
        if _remove_tree(work, log):
            log(f"removed the temporary root filesystem {work} in {time.monotonic() - started:.1f}s")


def _drop_other_os_tags(client: docker.DockerClient, key: str, log: Log) -> None:
    """Untag base-os images of older recipes (their layers go when no image uses them)."""
    import docker

    for image in client.images.list(name=BASE_OS_IMAGE):
        for tag in image.tags:
            if tag != f"{BASE_OS_IMAGE}:{key}":
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(tag, noprune=False)
                    log(f"removed the outdated {tag}")


# --- mesh/base: this mesh source on top -----------------------------------------------------------

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
        existing = _image(client, tag)
        if existing is None or force:
            raise
        log(f"no mesh source tree here; using the existing {tag} ({_short(existing.id)})")
        return existing.id
    with _build_lock(log):
        started = time.monotonic()
        src_hash = source_hash(root)
        current = _image(client, tag)
        if current is not None and not force:
            if current.labels.get(LABEL_SOURCE) == src_hash:
                latest = _image(client, f"{BASE_IMAGE}:latest")
                if latest is None or latest.id != current.id:
                    current.tag(BASE_IMAGE, "latest")
                log(f"{tag} is up to date ({_short(current.id)})")
                return current.id
            log(f"{tag} was built from other mesh source: rebuilding its mesh layer")

        deps = _dependencies(root)
        key = _os_key(deps)
        os_image = _image(client, f"{BASE_OS_IMAGE}:{key}")
        if os_image is None or force:
            os_id = _build_base_os(client, key, deps, log)
            _drop_other_os_tags(client, key, log)
        else:
            os_id = os_image.id
            log(f"reusing {BASE_OS_IMAGE}:{key} ({_short(os_image.id)})")

        with _step(log, f"docker build {tag} (this mesh source on {BASE_OS_IMAGE}:{key})"):
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
        log(f"{tag} ready ({_short(image_id)}, base-os {_short(os_id)}) "
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
    base = _image(client, f"{BASE_IMAGE}:latest")
    digest = context_hash(folder, base.id if base is not None else "")
    current = _image(client, ref)
    if current is not None and not force and current.labels.get(LABEL_CONTEXT) == digest:
        log(f"{ref} is up to date ({_short(current.id)})")
        return current.id
    all_labels = {**(labels or {}), LABEL_CONTEXT: digest, LABEL_VERSION: __version__}
    short = ref.rsplit(":", 1)[0]
    with _step(log, f"docker build {ref} from {folder}"):
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
        elif service.image and _image(client, service.image) is None:
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
            image = _image(client, service.image)
            if image is None:  # removed meanwhile
                raise ImageError(f"services.{name}.image: {service.image!r} is not in the local "
                                 f"Docker engine")
            built.services[name] = image.id
    return built
