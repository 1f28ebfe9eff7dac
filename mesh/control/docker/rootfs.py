"""``mesh/base-os``: the lower layer of the base image, a Debian root filesystem made on this machine.

``debootstrap --variant=minbase`` (python3, python3-venv, ca-certificates,
iptables, netbase), then a virtualenv at /opt/mesh filled with mesh's
*dependencies* by the root filesystem's own Python under ``chroot`` (with the
host's pip configuration, so it reaches the same index), then ``tar`` +
``docker import`` as ``mesh/base-os:<key>``. Slow (a minute or two) and needs
root; ``<key>`` (`os_key`) hashes the recipe and mesh's dependency list, so
`mesh.control.docker.images` redoes it only when those change.

A temporary root filesystem has the host's /proc and /dev mounted in it while
pip runs: nothing is removed or packed while anything is mounted below it.
"""

from __future__ import annotations

import configparser
import contextlib
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
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.control.docker.engine import ImageError, Log, find_image, step

if TYPE_CHECKING:
    import docker

__all__ = [
    "BASE_OS_IMAGE", "LABEL_OS_KEY", "PACKAGES", "RECIPE", "SUITE", "VENV",
    "build_base_os", "drop_other_os_tags", "mounts_under", "os_key", "remove_tree",
]

BASE_OS_IMAGE = "mesh/base-os"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "ca-certificates", "iptables", "netbase")
VENV = "/opt/mesh"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
RECIPE = 1  # bump when the base-os recipe changes in a way the key would not see
IMAGE_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_LOG_NAME = "mesh-base-build.log"
LABEL_OS_KEY = "mesh.base-os"       # key of the mesh/base-os image


def os_key(deps: list[str]) -> str:
    """The tag of the base-os image for mesh's dependencies ``deps``: a hash of them and the recipe."""
    recipe = {"recipe": RECIPE, "suite": SUITE, "packages": sorted(PACKAGES),
              "venv": VENV, "dependencies": sorted(deps)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


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


def remove_tree(path: Path, log: Log) -> bool:
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


def build_base_os(client: docker.DockerClient, key: str, deps: list[str], log: Log) -> str:
    """Make ``mesh/base-os:<key>`` with ``deps`` in its virtualenv; return its image id."""
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
        with step(log, f"debootstrap {SUITE} ({', '.join(PACKAGES)}) from {mirror}"):
            _run(["debootstrap", "--variant=minbase", "--components=main",
                  "--include=" + ",".join(PACKAGES), SUITE, str(rootfs), mirror],
                 what="debootstrap", logfile=logfile, env={**os.environ, "LANG": "C.UTF-8"})

        created: list[Path] = []
        with step(log, f"pip install mesh's dependencies into {VENV} (chroot)"):
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
        with step(log, "tar the root filesystem"):
            if mounts_under(rootfs):  # never pack the host's /proc or /dev
                raise ImageError(f"something is mounted under {rootfs}; not packing it")
            _run(["tar", "--numeric-owner", "-C", str(rootfs),
                  "--exclude=./proc/*", "--exclude=./sys/*", "--exclude=./dev/*",
                  "-cf", str(tarball), "."], what="tar", logfile=logfile)
        with step(log, f"docker import as {BASE_OS_IMAGE}:{key} "
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
            image = find_image(client, f"{BASE_OS_IMAGE}:{key}")
            if image is None:
                raise ImageError(f"docker import did not produce {BASE_OS_IMAGE}:{key}")
        return image.id
    finally:
        started = time.monotonic()
        if remove_tree(work, log):
            log(f"removed the temporary root filesystem {work} in {time.monotonic() - started:.1f}s")


def drop_other_os_tags(client: docker.DockerClient, key: str, log: Log) -> None:
    """Untag base-os images of older recipes (their layers go when no image uses them)."""
    import docker

    for image in client.images.list(name=BASE_OS_IMAGE):
        for tag in image.tags:
            if tag != f"{BASE_OS_IMAGE}:{key}":
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(tag, noprune=False)
                    log(f"removed the outdated {tag}")
