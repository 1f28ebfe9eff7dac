"""Kubernetes manifests for a mesh (`mesh render k8s`): plain dicts, dumped as one YAML stream or as files.

    manifests = render(config, cert_manager=False, image_prefix="registry.example/")
    sys.stdout.write(dump(manifests.documents))    # or: write(manifests, Path("k8s"))
    manifests.notes                                # what was left out or assumed, one line each

For the mesh (``<mesh>.yaml``): a ConfigMap named after it with mesh.toml,
the files its sidecars read and their registry (`.files`); with cert-manager,
the mesh CA's Issuers (`.certificates`). For each service
(``<mesh>-<service>.yaml``): its certificate, a Secret or a cert-manager
Certificate (`.certificates`); a headless Service, a public one when
exposed, and a NetworkPolicy letting in only the sidecar's listeners
(`.network`); a Deployment whose pods run the app beside the sidecar as a
native sidecar container, or a Job for a ``job`` service, and a
HorizontalPodAutoscaler for a pool (`.pods`). Keyed services are left out,
with a note: a Deployment cannot boot one instance per key.

Targets Kubernetes 1.29 and later (native sidecars); docs/kubernetes.md says
what each object is for and what is not rendered.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh.config import MeshConfig, ServiceConfig
from mesh.control.ca import CA
from mesh.control.docker.resources import service_problems
from mesh.control.kubernetes.certificates import ca_issuers, certificate, tls_secret
from mesh.control.kubernetes.files import checksum, config_map, mounted_files
from mesh.control.kubernetes.names import is_job, object_name
from mesh.control.kubernetes.network import PUBLIC_SUFFIX, network_policy, services
from mesh.control.kubernetes.pods import PodOptions, app_image, autoscaled, autoscaler, workload
from mesh.errors import MeshError

__all__ = ["CERT_DAYS", "KUBERNETES_MIN", "Manifests", "RenderError", "dump", "render", "write"]

CERT_DAYS = 90
KUBERNETES_MIN = "1.29"  # native sidecar containers are on by default from here

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class RenderError(MeshError):
    """What of mesh.toml cannot become manifests; ``problems`` lists each, one a line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Manifests:
    """What `render` made: ``files`` maps a file name to its documents, in the order to apply
    them; ``notes`` says what was left out or assumed, one line each."""

    files: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def documents(self) -> list[dict[str, Any]]:
        return [doc for docs in self.files.values() for doc in docs]


def render(config: MeshConfig, *, cert_manager: bool = False, image_prefix: str = "",
           cert_days: int = CERT_DAYS, ca: CA | None = None) -> Manifests:
    """Every object that runs ``config`` on Kubernetes; raise `RenderError` listing every problem.

    ``image_prefix`` goes before the images mesh builds (``mesh/base``, ``mesh-<mesh>-<service>``),
    a registry say (``registry.example/team/``). Certificates are valid ``cert_days``; without
    ``cert_manager`` they are issued now by ``ca`` (default: the mesh CA of the state folder, made
    on first use, as `mesh up` does).
    """
    if image_prefix and not image_prefix.endswith("/"):
        image_prefix += "/"
    rendered = {name: service for name, service in config.services.items() if service.instances is None}
    files, notes, problems = mounted_files(config)
    problems += _problems(config, rendered, cert_days)
    if problems:
        raise RenderError(problems)
    config_doc, items = config_map(config, rendered, files)
    options = PodOptions(image_prefix, items, checksum(config_doc))
    for name in (name for name in config.services if name not in rendered):
        notes.append(f"services.{name}: not rendered: a keyed service (instances = {{...}}) boots one "
                     f"instance per key on its first request, which a Deployment cannot do")
    for name, service in rendered.items():
        if not (service.build or service.image):
            notes.append(f"services.{name}: no 'build' or 'image'; its pods run "
                         f"{app_image(config, name, service, options)} with that image's own command "
                         f"('command' is for the process runtime)")
    manifests = Manifests(notes=notes)
    manifests.files[f"{config.name}.yaml"] = [config_doc, *(ca_issuers(config) if cert_manager else [])]
    if not cert_manager and rendered:
        ca = ca or CA.load_or_create(config.state_dir / "ca", config.name)
    for name, service in rendered.items():
        docs = [certificate(config, name, cert_days) if cert_manager or ca is None
                else tls_secret(config, name, ca, cert_days)]
        if not is_job(service):
            docs += services(config, name, service)
        docs += [network_policy(config, name, service), workload(config, name, service, options)]
        if autoscaled(service):
            docs.append(autoscaler(config, name, service))
        manifests.files[f"{object_name(config, name)}.yaml"] = docs
    return manifests


def _problems(config: MeshConfig, rendered: dict[str, ServiceConfig], cert_days: int) -> list[str]:
    found = []
    if cert_days < 1:
        found.append(f"--cert-days: expected at least 1, found {cert_days}")
    for name, service in rendered.items():
        where = f"services.{name}"
        suffixes = ("", PUBLIC_SUFFIX) if service.expose is not None else ("",)
        for service_name in (object_name(config, name) + suffix for suffix in suffixes):
            if not _DNS_LABEL.match(service_name):
                found.append(f"{where}: its Kubernetes Service would be named {service_name!r}, longer than "
                             f"a DNS label's 63 characters; shorten mesh.name or the service's name")
        if service.expose is not None and name + PUBLIC_SUFFIX in rendered:
            found.append(f"{where}.expose: its public Service would have the name of service "
                         f"{name}{PUBLIC_SUFFIX}'s; rename one of them")
        found += service_problems(where, service, "pod")
    return found


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (mesh.toml, plugins) as literal blocks, as a person would write them;
    a value used twice written twice, never as an anchor and an alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def dump(documents: list[dict[str, Any]]) -> str:
    """A multi-document YAML stream, each document opened by ``---``."""
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, explicit_start=True,
                         default_flow_style=False, allow_unicode=True, width=120)


def write(manifests: Manifests, folder: Path) -> list[Path]:
    """Each of ``manifests.files`` into ``folder`` (made if missing), a file holding a Secret
    readable by its owner only; the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, docs in manifests.files.items():
        path = folder / file_name
        secret = any(doc["kind"] == "Secret" for doc in docs)
        mode = 0o600 if secret else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), mode)  # also when the file was there before
            file.write(dump(docs))
        written.append(path)
    return written
