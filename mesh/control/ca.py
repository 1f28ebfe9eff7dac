"""The mesh CA: it issues every certificate of a mesh, and is replaced without a failed handshake.

`mesh up` keeps the CA in its state folder (``.mesh/<name>/ca``: ``ca.pem``,
``ca.key`` mode 0600, reused across runs); the controller's
`mesh.control.instances.InstanceSet` issues every instance's certificate
from it (`CA.write_instance`), and `rotate_ca` replaces it. What a sidecar
does with its certificate is `mesh.sidecar.identity`'s.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.sidecar.identity import spiffe_id

__all__ = ["CA", "rotate_ca", "trust_bundle"]

_CA_LIFETIME = dt.timedelta(days=3650)
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew between hosts


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class CA:
    """The mesh's certificate authority: signs every instance's certificate."""

    def __init__(self, mesh: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
                 folder: Path | None = None) -> None:
        self.mesh = mesh
        self.key = key
        self.cert = cert
        self.folder = folder  # where it is kept, with the trust bundle after a rotation

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, mesh: str) -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mesh"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"{mesh} mesh CA")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + _CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(mesh, key, cert)

    @classmethod
    def load_or_create(cls, folder: Path, mesh: str) -> CA:
        """The CA kept in ``folder`` (``ca.pem``, ``ca.key`` mode 0600), made on first use."""
        folder.mkdir(parents=True, exist_ok=True)
        key_file, cert_file = folder / "ca.key", folder / "ca.pem"
        if key_file.exists() and cert_file.exists():
            key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return cls(mesh, key, x509.load_pem_x509_certificate(cert_file.read_bytes()), folder)
        ca = cls.create(mesh)
        ca.folder = folder
        _write_private(key_file, ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        _write_public(cert_file, ca.cert_pem)
        return ca

    def issue(self, service: str, lifetime: float,
              not_before: dt.datetime | None = None) -> tuple[bytes, bytes]:
        """A certificate (PEM) for ``service`` valid for ``lifetime`` seconds, and its key (PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or _now()
        uri = spiffe_id(self.mesh, service)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start - dt.timedelta(seconds=min(60.0, lifetime / 10)))
            .not_valid_after(start + dt.timedelta(seconds=lifetime))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                           critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def write_instance(self, folder: Path, service: str, lifetime: float,
                       trust: bytes | None = None) -> None:
        """Issue into ``folder`` (``cert.pem``, ``key.pem`` 0600, ``ca.pem`` trust bundle)."""
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = self.issue(service, lifetime)
        trust = trust or (trust_bundle(self.folder) if self.folder else None) or self.cert_pem
        _write_private(folder / "key.pem", key)
        _write_public(folder / "cert.pem", cert)
        _write_public(folder / "ca.pem", trust)


def trust_bundle(folder: Path) -> bytes | None:
    """The CAs every sidecar trusts while a rotation is under way (`rotate_ca`), else None."""
    bundle = folder / "trust.pem"
    return bundle.read_bytes() if bundle.exists() else None


async def rotate_ca(folder: Path, mesh: str, instances: dict[str, tuple[str, Path]],
                    lifetime: float, reload: Any) -> CA:
    """Replace the mesh CA without a failed handshake, and stop trusting the old one.

    ``instances`` maps each label to its service and certificate folder;
    ``reload(label)`` makes that sidecar load its folder again (nothing for
    one that does not run: it reads the files when it starts). Three steps,
    each done everywhere before the next begins:

    1. *trust*: every sidecar gets a bundle of the old and the new CA (its
       certificate unchanged) and reloads;
    2. *issue*: the new CA becomes current and issues every certificate again;
    3. *forget*: the bundle becomes the new CA alone, and every sidecar reloads.

    When it returns, no new connection, accepted or made, trusts the old CA
    (`Identity.reload` builds fresh contexts); its certificates are all gone.
    """
    old = CA.load_or_create(folder, mesh)
    new = CA.create(mesh)
    new.folder = folder
    # What sidecars may present now (the bundle of a rotation cut short, or the old CA), and the new CA.
    both = (trust_bundle(folder) or old.cert_pem) + new.cert_pem
    for label, (_service, cert_folder) in instances.items():
        _write_public(cert_folder / "ca.pem", both)
        await reload(label)
    _write_public(folder / "trust.pem", both)
    _write_public(folder / "previous.pem", old.cert_pem)
    _write_private(folder / "ca.key", new.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _write_public(folder / "ca.pem", new.cert_pem)
    for label, (service, cert_folder) in instances.items():
        new.write_instance(cert_folder, service, lifetime, trust=both)
        await reload(label)
    # Every certificate now comes from the new CA: the old one goes out of every bundle.
    (folder / "trust.pem").unlink(missing_ok=True)
    for label, (_service, cert_folder) in instances.items():
        _write_public(cert_folder / "ca.pem", new.cert_pem)
        await reload(label)
    return new
