"""The `mesh` command.

Exit codes: 0 done; 1 it failed (a service did not start, `mesh check`
found problems); 2 bad usage or a mesh.toml with problems (each printed
on its own line; nothing starts).

`mesh sidecar` is parsed on its own (`sidecar_parser`) and loads neither
the control plane nor the other commands' parsers: it starts for every
instance, and for a keyed service's new key while a client waits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from typing import Any

from mesh import __version__
from mesh import config as config_mod
from mesh.config import MeshConfig
from mesh.errors import ConfigError
from mesh.runner import run, setup_logging

__all__ = ["build_parser", "main", "sidecar_parser"]

_SIDECAR_SUMMARY = "run one sidecar (what a container or a pod runs)"
_SIDECAR_DESCRIPTION = (
    "Run the sidecar of one instance of a service, in front of an app that listens on its own: the mesh "
    "listener (mutual TLS from other sidecars), the outbound listener (the app's HTTP_PROXY), the admin "
    "listener and, when the service is exposed, the public listener. `mesh up` runs one beside each app; "
    "a container or a pod runs it the same way. Stops on SIGTERM or Ctrl-C after draining.")


def _path_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default=None, metavar="PATH",
                        help="a mesh.toml or a folder holding one (default: ./mesh.toml)")


def _command(commands: Any, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand: ``summary`` is its line in `mesh --help`, ``description`` opens `mesh NAME --help`."""
    parser: argparse.ArgumentParser = commands.add_parser(name, help=summary, description=description)
    return parser


def build_parser(sidecar_options: bool = True) -> argparse.ArgumentParser:
    """The parser of every command. ``sidecar_options=False`` leaves out the
    options of `mesh sidecar`, whose module takes longer to import than
    `mesh ps` takes to run."""
    from mesh.control.runtimes import RUNTIMES

    parser = argparse.ArgumentParser(
        prog="mesh", description="A programmable service-mesh sidecar and the controller that runs a mesh.",
        epilog="`mesh COMMAND --help` says what a command does and lists its options. Exit codes: 0 done; "
               "1 it failed (a service did not start, `mesh check` found problems); 2 bad usage or a "
               "mesh.toml with problems (nothing starts).")
    parser.add_argument("--version", action="version", version=f"mesh {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    up = _command(commands, "up", "start every service with its sidecar; stop them on Ctrl-C",
                  "Start every service of the mesh with its sidecar and print where each one "
                  "listens. In the foreground, Ctrl-C or SIGTERM stops them all cleanly (sidecars "
                  "drain first, then the apps stop). With -d the controller runs in the background: "
                  "`mesh ps` shows it and `mesh down` stops it. A mesh.toml with problems starts "
                  "nothing.")
    _path_argument(up)
    up.add_argument("--runtime", choices=RUNTIMES, default="process",
                    help="where services run: process (the default: local processes on loopback) "
                         "or docker (a sidecar and an app container per instance)")
    up.add_argument("-d", "--detach", action="store_true",
                    help="run in the background; return once every service is ready")
    up.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                    help="how long each instance may take to become ready (default: 30)")
    up.add_argument("--watch", action="store_true",
                    help="reload (as `mesh reload` does) whenever mesh.toml or the plugin code changes")
    up.set_defaults(handler=_up)

    down = _command(commands, "down", "stop what `mesh up -d` started",
                    "Stop the mesh that `mesh up -d` started and wait until it is gone: its "
                    "controller drains the sidecars, then stops the apps. If the controller crashed, "
                    "stop the processes (or Docker containers and networks) it left behind. Says so "
                    "when nothing runs.")
    _path_argument(down)
    down.add_argument("--volumes", action="store_true",
                      help="also remove the keys' volumes of keyed services (instances.volume): the process "
                           "runtime's folders in the state folder, the Docker volumes labelled with this mesh; "
                           "without it they are kept for the next `mesh up`")
    down.set_defaults(handler=_down)

    ps = _command(commands, "ps", "list services, instances, their state and addresses",
                  "List the mesh's services and instances: state (starting, running, sleeping, "
                  "stopped, exited), the addresses of each sidecar's listeners and the pids of its "
                  "processes. A mesh that is not running says so, and shows the instances of its "
                  "last run as stopped, without addresses or pids.")
    _path_argument(ps)
    ps.add_argument("--json", action="store_true", help="print the state as JSON, for scripts")
    ps.set_defaults(handler=_ps)

    dashboard = _command(commands, "dashboard", "open the web dashboard of a running mesh",
                         "Print the URL of the running mesh's web dashboard (served by its controller on "
                         "127.0.0.1, with this run's token in it) and open it in a browser: services and "
                         "instances with their state and CPU, the route graph with allowed and denied "
                         "calls, requests per second, success rate and latency per service and route, "
                         "recent denials and errors, the live tap. Fails when the mesh is not running.")
    _path_argument(dashboard)
    dashboard.add_argument("--no-open", action="store_true", help="only print the URL")
    dashboard.set_defaults(handler=_dashboard)

    check = _command(commands, "check", "validate mesh.toml and load every plugin",
                     "Validate mesh.toml and load every plugin and lifecycle hook, as `mesh up` would, "
                     "without starting anything. On success it prints what it loaded (each service "
                     "with its chains, scaling, keyed instances and hooks; each route with its limits) "
                     "and exits 0; otherwise it prints every problem, then how many, to stderr and "
                     "exits 1.")
    _path_argument(check)
    check.set_defaults(handler=_check)

    reload = _command(commands, "reload", "apply an edited mesh.toml and plugin code to the running mesh",
                      "Check mesh.toml and the plugin code as `mesh check` does (edited plugin files are "
                      "imported afresh), then apply them to the running mesh at once: every sidecar swaps "
                      "its chains, routes and settings together (requests in flight finish on the old ones), "
                      "services added are started, removed ones drained and stopped, and only services "
                      "whose process settings changed are restarted, one instance at a time. If anything "
                      "fails, every sidecar stays on (or goes back to) the version it served, and this "
                      "exits 1 with the reason. SIGHUP to the controller does the same.")
    _path_argument(reload)
    reload.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long to wait for the reload to finish (default: 300)")
    reload.set_defaults(handler=_reload)

    certs = _command(commands, "certs", "show each identity of the mesh and when it expires",
                     "Show the mesh CA and each instance's certificate: its identity "
                     "(spiffe://<mesh>/<service>) and when it expires. Certificates are made by "
                     "`mesh up` and renewed while it runs. --rotate-ca replaces the mesh CA.")
    _path_argument(certs)
    certs.add_argument("--json", action="store_true", help="print them as JSON, for scripts")
    certs.add_argument("--rotate-ca", action="store_true",
                       help="replace the mesh CA: every sidecar trusts the new one before it issues, "
                            "then trusts only it; waits until a running mesh is done")
    certs.set_defaults(handler=_certs)

    build = _command(commands, "build", "docker runtime: build the base image and services",
                     "Docker runtime: make the base image mesh/base (Debian packages and PyPI only, "
                     "no image registry) if it is missing or out of date, then build each service's "
                     "`build` folder as mesh-<mesh>-<service>, rebuilding only what changed. "
                     "`mesh up --runtime docker` does this first by itself.")
    _path_argument(build)
    build.add_argument("--force", action="store_true", help="rebuild every service image")
    build.add_argument("--rebuild-base", action="store_true",
                       help="make mesh/base again from debootstrap")
    build.set_defaults(handler=_build)

    logs = _command(commands, "logs", "show the sidecars' access logs, merged in time order",
                    "Show the access logs of the mesh's sidecars (one line per request each "
                    "handled), every instance's merged in time order, rotated files included: "
                    "time, instance, direction (inbound from another sidecar, public from "
                    "outside, outbound from the app), peer, method and path, status, duration, "
                    "request id. Reads the files in the mesh's state folder (.mesh/<name>/logs), "
                    "so it works while the mesh runs and after it stopped. Without --follow it "
                    "prints what exists and exits.")
    _path_argument(logs)
    logs.add_argument("service", nargs="?", default=None, metavar="SERVICE",
                      help="only this service's instances (alone, it is SERVICE when it is no "
                           "mesh.toml nor a folder holding one)")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="keep printing requests as they are logged (new instances and rotated "
                           "files too) until Ctrl-C")
    logs.add_argument("--json", action="store_true",
                      help="print each request's JSON object as the sidecar wrote it, one a line")
    logs.set_defaults(handler=_logs)

    tap = _command(commands, "tap", "show a service's requests live, as they pass its sidecars",
                   "Show the requests a service's sidecars answer as they pass, every running instance's "
                   "(instances that start later too), until Ctrl-C: time, instance, direction, route, method "
                   "and path, status, duration, and which plugins ran and what they answered. Credentials "
                   "in headers are shown as <redacted> unless --secrets. Filters are applied in the "
                   "sidecars: untapped traffic costs nothing extra.")
    _path_argument(tap)
    tap.add_argument("service", nargs="?", default=None, metavar="SERVICE",
                     help="the service to tap (alone, it is SERVICE when it is no mesh.toml nor a folder "
                          "holding one); every service when left out")
    tap.add_argument("--json", action="store_true", help="one JSON object per request, one a line")
    tap.add_argument("--count", type=int, default=None, metavar="N", help="exit after N requests")
    tap.add_argument("--save", default=None, metavar="FILE",
                     help="also append each request to FILE as a JSON line (what mesh.testing.replay reads)")
    tap.add_argument("--path", dest="path_glob", default=None, metavar="GLOB",
                     help="only paths matching GLOB ('/api/*')")
    tap.add_argument("--peer", default=None, metavar="NAME", help="only requests from or to service NAME")
    tap.add_argument("--status", default=None, metavar="CODE", help="only this status (404) or class (5xx)")
    tap.add_argument("--direction", default=None, choices=("inbound", "outbound", "public"),
                     help="only requests from other sidecars (inbound), from outside (public) or from "
                          "the app (outbound)")
    tap.add_argument("--bodies", type=int, default=0, metavar="BYTES",
                     help="include the first BYTES of each body (at most 65536)")
    tap.add_argument("--secrets", action="store_true",
                     help="show Authorization, Cookie and the like as they were")
    tap.set_defaults(handler=_tap)

    render = _command(commands, "render", "write manifests that run the mesh on an orchestrator (k8s)",
                      "Write what runs the mesh elsewhere. k8s: Kubernetes manifests (1.29 or later) for "
                      "every service: a Deployment (a Job for a job service) whose pods run the app beside "
                      "the sidecar as a native sidecar container, a headless Service, a NetworkPolicy "
                      "letting in only the sidecar's listeners, the service's certificate as a Secret (or "
                      "a cert-manager Certificate), an autoscaler for a pool; and the mesh's ConfigMap "
                      "(mesh.toml, the files its sidecars read, their registry). Keyed services are left "
                      "out, and said so on stderr. Without -o, one YAML stream on stdout for "
                      "`kubectl apply -f -`. See docs/kubernetes.md.")
    render.add_argument("target", choices=("k8s",), help="what to render for: k8s (Kubernetes)")
    _path_argument(render)
    render.add_argument("-o", "--output", default=None, metavar="DIR",
                        help="write <mesh>.yaml and a <mesh>-<service>.yaml per service into DIR "
                             "(files holding keys readable by their owner only) instead of stdout")
    render.add_argument("--cert-manager", action="store_true",
                        help="have cert-manager make the mesh CA and each service's certificate in the "
                             "cluster (Issuers and Certificates), so no key is in the manifests")
    render.add_argument("--image-prefix", default="", metavar="PREFIX",
                        help="put PREFIX before the images mesh builds (mesh/base, mesh-<mesh>-<service>), "
                             "e.g. a registry: registry.example/team/")
    render.add_argument("--cert-days", type=int, default=90, metavar="DAYS",
                        help="how long the services' certificates are valid (default: %(default)s)")
    render.set_defaults(handler=_render)

    sidecar = _command(commands, "sidecar", _SIDECAR_SUMMARY, _SIDECAR_DESCRIPTION)
    if sidecar_options:
        from mesh.sidecar.sidecar import add_arguments

        add_arguments(sidecar)
    sidecar.set_defaults(handler=_sidecar)
    return parser


def sidecar_parser() -> argparse.ArgumentParser:
    """The parser of `mesh sidecar` alone: what `main` uses for it, without the other commands."""
    from mesh.sidecar.sidecar import add_arguments

    parser = argparse.ArgumentParser(prog="mesh sidecar", description=_SIDECAR_DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(handler=_sidecar)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sidecar"]:
        args = sidecar_parser().parse_args(argv[1:])
    else:
        args = build_parser(sidecar_options=False).parse_args(argv)
    setup_logging()
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `mesh ps | head`: the reader left; say nothing more, even at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _load(path: str | None) -> MeshConfig | None:
    """The checked config, or None after printing its problems to stderr."""
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return None


def _located(path: str | None) -> MeshConfig | None:
    """The config, for commands that only need to find a mesh's state (ps, down, dashboard).

    A mesh.toml edited into one with problems must not hide the mesh that runs from it: when the
    file still names a mesh (``[mesh] name``) whose state folder exists, its problems are a warning.
    """
    try:
        return config_mod.load(path)
    except ConfigError as exc:
        problems = exc.problems
    try:
        file = config_mod.resolve(path)
        name = tomllib.loads(file.read_text(encoding="utf-8"))["mesh"]["name"]
        found = MeshConfig(path=file, name=str(name), plugin_path=[], services={}, routes=[])
    except (OSError, ValueError, KeyError, TypeError):
        found = None
    if found is None or not found.state_dir.is_dir():
        for problem in problems:
            print(problem, file=sys.stderr)
        return None
    print(f"warning: {found.path} has {len(problems)} problem{'s' if len(problems) != 1 else ''} "
          f"(`mesh check` lists them); this is the mesh '{found.name}' as it runs", file=sys.stderr)
    return found


def _up(args: argparse.Namespace) -> int:
    from mesh.control.controller import Controller
    from mesh.control.runtimes.base import RuntimeUnavailable
    from mesh.control.state import detach

    config = _load(args.path)
    if config is None:
        return 2
    try:
        controller = Controller(config, args.runtime, timeout=args.timeout, watch=args.watch)
    except RuntimeUnavailable as exc:
        print(exc, file=sys.stderr)
        return 2
    problems = controller.runtime.problems()
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 2
    if args.detach:
        return detach(config, args.runtime, args.timeout, args.watch)
    return run(controller.run())


def _down(args: argparse.Namespace) -> int:
    from mesh.control.state import down

    config = _located(args.path)
    return 2 if config is None else down(config, volumes=args.volumes)


def _ps(args: argparse.Namespace) -> int:
    from mesh.control.state import format_table, status

    config = _located(args.path)
    if config is None:
        return 2
    state = status(config)
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    controller = state["controller"]
    if not state["instances"]:
        print(f"mesh '{config.name}' is not running")
        return 0
    runtime = state.get("runtime", "?")
    left = sum(1 for inst in state["instances"] if inst.get("state") == "running")
    if controller["running"]:
        print(f"mesh '{config.name}': {state['phase']} ({runtime} runtime, controller pid {controller['pid']})")
    elif left:
        print(f"mesh '{config.name}': its controller is gone, {left} instance{'s' if left != 1 else ''} "
              f"still running ({runtime} runtime); `mesh down` stops them")
    else:
        print(f"mesh '{config.name}' is not running (its last run, on the {runtime} runtime: {state['phase']})")
    print(format_table(state["instances"], with_state=True))
    if state.get("error"):
        print(state["error"])
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    import webbrowser

    from mesh.control.state import status

    config = _located(args.path)
    if config is None:
        return 2
    controller = status(config)["controller"]
    url = controller.get("dashboard")
    if not controller["running"]:
        print(f"mesh '{config.name}' is not running: `mesh up` starts it, and its dashboard", file=sys.stderr)
        return 1
    if not url:
        print(f"mesh '{config.name}' runs without a dashboard (its controller could not serve one; "
              f"its output says why)", file=sys.stderr)
        return 1
    print(url)
    if not args.no_open and not webbrowser.open(url):
        print("no browser to open it with here: open the URL above", file=sys.stderr)
    return 0


def _mesh_and_service(command: str, path: str | None, service: str | None) -> tuple[MeshConfig, str | None] | None:
    """The config and the service of ``mesh COMMAND [PATH] [SERVICE]``; None after saying what is wrong.

    ``SERVICE`` alone is taken for one of ./mesh.toml's when it is no mesh.toml nor a folder holding one.
    """
    if service is None and path is not None and not _is_mesh_path(path):
        path, service = None, path
    config = _load(path)
    if config is None:
        return None
    if service is not None and service not in config.services:
        print(f"mesh {command}: no service {service!r} in {config.path} (services: "
              f"{', '.join(config.services)})", file=sys.stderr)
        return None
    return config, service


def _logs(args: argparse.Namespace) -> int:
    from mesh.control.logs import show

    found = _mesh_and_service("logs", args.path, args.service)
    if found is None:
        return 2
    config, service = found
    return show(config.state_dir, service, follow=args.follow, as_json=args.json)


def _reload(args: argparse.Namespace) -> int:
    from mesh.control.state import reload

    config = _load(args.path)
    if config is None:
        return 2
    return reload(config, args.timeout)


def _tap(args: argparse.Namespace) -> int:
    from mesh.control.tap import show

    found = _mesh_and_service("tap", args.path, args.service)
    if found is None:
        return 2
    config, service = found
    if args.count is not None and args.count < 1:
        print("mesh tap: --count must be at least 1", file=sys.stderr)
        return 2
    query = {"path": args.path_glob, "peer": args.peer, "status": args.status, "direction": args.direction,
             "bodies": str(args.bodies) if args.bodies else "", "secrets": "1" if args.secrets else ""}
    return show(config, service, query, as_json=args.json, count=args.count, save=args.save)


def _is_mesh_path(path: str) -> bool:
    """Whether ``path`` names a file, or a folder holding a mesh.toml."""
    return os.path.isfile(path) or os.path.isfile(os.path.join(path, "mesh.toml"))


def _check(args: argparse.Namespace) -> int:
    try:
        config = config_mod.load(args.path)
    except ConfigError as exc:
        # Problems and their count on one stream, so `2>` keeps them together; stdout is for the summary.
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        count = len(exc.problems)
        print(f"{count} problem{'s' if count != 1 else ''}", file=sys.stderr)
        return 1
    from mesh.control.describe import describe

    print(describe(config))
    return 0


def _certs(args: argparse.Namespace) -> int:
    config = _load(args.path)
    if config is None:
        return 2
    from mesh.sidecar.identity import describe as describe_cert

    if args.rotate_ca:
        return _rotate_ca(config)
    rows = []
    ca_file = config.state_dir / "ca" / "ca.pem"
    if ca_file.exists():
        from cryptography import x509

        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
        rows.append({"instance": "(mesh CA)", "identity": ca.subject.rfc4514_string(),
                     "expires": ca.not_valid_after_utc.isoformat(timespec="seconds")})
    for cert_file in sorted((config.state_dir / "certs").glob("*/cert.pem")):
        info = describe_cert(cert_file)
        rows.append({"instance": cert_file.parent.name, "identity": info.identity,
                     "expires": info.not_after.isoformat(timespec="seconds")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"mesh {config.name!r} has no certificates yet: `mesh up` makes them")
        return 0
    widths = [max(len(r[k]) for r in rows + [{"instance": "instance", "identity": "identity",
                                               "expires": "expires (UTC)"}])
              for k in ("instance", "identity", "expires")]
    print(f"{'instance':<{widths[0]}}  {'identity':<{widths[1]}}  expires (UTC)")
    for r in rows:
        print(f"{r['instance']:<{widths[0]}}  {r['identity']:<{widths[1]}}  {r['expires']}")
    return 0


def _rotate_ca(config: MeshConfig, timeout: float = 300.0) -> int:
    import signal
    import time

    from mesh.control.ca import rotate_ca
    from mesh.control.state import StateDir

    files = StateDir(config.state_dir)
    if files.running():
        pid = files.controller_pid()
        if pid is None:
            print("the mesh is up but its controller pid is unknown", file=sys.stderr)
            return 1

        def rotation() -> dict[str, Any]:
            return dict((files.read_state() or {}).get("ca_rotation") or {})

        before = rotation().get("done", 0)
        os.kill(pid, signal.SIGUSR1)
        print(f"asked the controller (pid {pid}) to rotate the mesh CA; waiting for every sidecar")
        deadline = time.monotonic() + timeout
        while (now := rotation()).get("done", 0) <= before:
            if time.monotonic() > deadline or not files.running():
                print(f"the rotation did not finish within {timeout:g}s; the controller's log "
                      f"({files.log} when detached) says how far it got", file=sys.stderr)
                return 1
            time.sleep(0.1)
        if now.get("error"):
            print(now["error"], file=sys.stderr)
            return 1
        print(f"mesh {config.name!r}: new CA in {config.state_dir / 'ca'}; every certificate is "
              f"issued by it, and the old CA is trusted no more")
        return 0
    # Nothing runs: the next `mesh up` issues everything from the new CA.
    run(rotate_ca(config.state_dir / "ca", config.name, {}, 0, None))
    print(f"mesh {config.name!r}: new CA in {config.state_dir / 'ca'}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from mesh.control.docker import images

    config = _load(args.path)
    if config is None:
        return 2
    try:
        client = images.docker_client()
        if args.rebuild_base:
            images.build_base(client, log=print, force=True)
        images.ensure_images(config, client, log=print, force=args.force)
    except (images.DockerUnavailable, images.ImageError) as exc:
        for line in str(exc).splitlines():
            print(line, file=sys.stderr)
        return 1
    return 0


def _render(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mesh.control import kubernetes

    config = _load(args.path)
    if config is None:
        return 2
    try:
        manifests = kubernetes.render(config, cert_manager=args.cert_manager, image_prefix=args.image_prefix,
                                      cert_days=args.cert_days)
    except kubernetes.RenderError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    for note in manifests.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.output is None:
        sys.stdout.write(kubernetes.dump(manifests.documents))
        return 0
    for path in kubernetes.write(manifests, Path(args.output)):
        print(f"wrote {path}")
    return 0


def _sidecar(args: argparse.Namespace) -> int:
    from mesh.sidecar.sidecar import main as sidecar_main

    return int(sidecar_main(args))
