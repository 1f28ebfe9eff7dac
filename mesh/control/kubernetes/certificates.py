"""Each service's certificate on Kubernetes: a Secret issued here, or a cert-manager Certificate.

Either way the service's Secret ``<mesh>-<service>-tls`` is of type
``kubernetes.io/tls`` and holds ``tls.crt`` (URI SAN ``spiffe://<mesh>/<service>``,
as `mesh.control.ca` issues), ``tls.key`` and ``ca.crt`` (the CAs sidecars
trust); the pod mounts it, read-only and in the sidecar's container only, as
the ``cert.pem``, ``key.pem`` and ``ca.pem`` that ``mesh sidecar --tls`` reads.

Without cert-manager the Secret is made here from the mesh CA of the state
folder, the one `mesh up` uses, so the manifest holds private keys. With it
the manifest holds none: a self-signed Issuer makes the mesh CA in the
cluster (its key in Secret ``<mesh>-ca``), an Issuer named after the mesh
signs with it, and each service's Certificate is issued and renewed there.
"""

from __future__ import annotations

import base64
from typing import Any

from mesh.config import MeshConfig
from mesh.control.ca import CA, trust_bundle
from mesh.control.kubernetes.names import labels, metadata, object_name
from mesh.sidecar.identity import spiffe_id

__all__ = ["CA_DAYS", "TLS_FILES", "ca_issuers", "certificate", "secret_name", "tls_secret"]

CA_DAYS = 3650

# The Secret's keys and the files `mesh sidecar --tls` reads.
TLS_FILES = [("tls.crt", "cert.pem"), ("tls.key", "key.pem"), ("ca.crt", "ca.pem")]

_API = "cert-manager.io/v1"


def secret_name(config: MeshConfig, service: str) -> str:
    return f"{object_name(config, service)}-tls"


def tls_secret(config: MeshConfig, service: str, ca: CA, days: int) -> dict[str, Any]:
    """A certificate for ``service`` issued now by ``ca``, valid ``days``, its key, and the trust bundle."""
    cert, key = ca.issue(service, days * 86400.0)
    trust = (trust_bundle(ca.folder) if ca.folder else None) or ca.cert_pem
    data = {"tls.crt": cert, "tls.key": key, "ca.crt": trust}
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": metadata(config, secret_name(config, service), service),
            "data": {k: base64.b64encode(v).decode("ascii") for k, v in data.items()}}


def ca_issuers(config: MeshConfig) -> list[dict[str, Any]]:
    """The mesh CA made and kept by cert-manager, and the Issuer that signs with it."""
    selfsigned = f"{config.name}-selfsigned"
    return [
        {"apiVersion": _API, "kind": "Issuer", "metadata": metadata(config, selfsigned),
         "spec": {"selfSigned": {}}},
        {"apiVersion": _API, "kind": "Certificate", "metadata": metadata(config, config.name),
         "spec": {"isCA": True, "commonName": f"{config.name} mesh CA", "secretName": f"{config.name}-ca",
                  "duration": f"{CA_DAYS * 24}h", "privateKey": {"algorithm": "ECDSA", "size": 256},
                  "secretTemplate": {"labels": labels(config)},
                  "issuerRef": {"name": selfsigned, "kind": "Issuer", "group": "cert-manager.io"}}},
        {"apiVersion": _API, "kind": "Issuer", "metadata": metadata(config, config.name),
         "spec": {"ca": {"secretName": f"{config.name}-ca"}}},
    ]


def certificate(config: MeshConfig, service: str, days: int) -> dict[str, Any]:
    """What cert-manager issues into the service's Secret, valid ``days``, renewed (with a new key)
    once two thirds of that have passed."""
    return {"apiVersion": _API, "kind": "Certificate",
            "metadata": metadata(config, object_name(config, service), service),
            "spec": {"secretName": secret_name(config, service), "commonName": service,
                     "uris": [spiffe_id(config.name, service)], "duration": f"{days * 24}h",
                     "usages": ["digital signature", "server auth", "client auth"],
                     "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
                     "secretTemplate": {"labels": labels(config, service)},
                     "issuerRef": {"name": config.name, "kind": "Issuer", "group": "cert-manager.io"}}}
