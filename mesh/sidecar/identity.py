"""Workload identity: a mesh CA, short-lived certificates, mutual TLS contexts.

Every service instance gets a certificate whose URI SAN is
``spiffe://<mesh>/<service>``, signed by the mesh CA that `mesh up` keeps in
its state folder (private key mode 0600, reused across runs). Sidecars
talk to each other only over mutual TLS (1.3 preferred, 1.2 minimum): the
receiving side learns the caller's service from the verified certificate,
the calling side checks that it reached the service it meant to.

Rotation needs no restart: `Identity.reload` builds new contexts from the
files and swaps them in behind the two that listeners and connection pools
hold for life (`Identity.server`, `Identity.client`), so every new handshake,
accepted or made, uses the certificate and the trust bundle of the moment,
while connections already open carry on. Fresh contexts, not a reload into
the old ones: OpenSSL can add CAs to a context's store but never remove
them, and a CA taken out of the bundle must stop being trusted. The bundle
may hold several CAs, which is how a new CA is trusted everywhere before
anything is issued from it (`rotate_ca`).
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mesh.http.client import Pool

__all__ = ["CA", "Identity", "fresh_pool", "rotate_ca", "service_of", "spiffe_id", "trust_bundle"]

_CA_LIFETIME = dt.timedelta(days=3650)
_BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock skew between hosts


def spiffe_id(mesh: str, service: str) -> str:
    return f"spiffe://{mesh}/{service}"


def service_of(peercert: dict[str, Any] | None, mesh: str) -> str | None:
    """The service named by a verified peer certificate (as `ssl` returns it), if it is ours."""
    if not peercert:
        return None
    prefix = f"spiffe://{mesh}/"
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "URI" and value.startswith(prefix):
            service = value[len(prefix):]
            if service and "/" not in service:
                return service
    return None


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


@dataclass
class CertInfo:
    identity: str
    not_after: dt.datetime


def describe(cert_file: Path) -> CertInfo:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.UniformResourceIdentifier)
    return CertInfo(uris[0] if uris else "?", cert.not_valid_after_utc)


class _Current(ssl.SSLContext):
    """An SSL context that hands every new connection to the context it holds now (`use`).

    asyncio and uvloop open each TLS connection with ``wrap_bio`` on the
    context a listener or a pool was given once; here that call goes to the
    context of the moment, so a reload needs nothing from them. The pool
    keys connections on this object, which stays the same across reloads.
    """

    _held: ssl.SSLContext

    def use(self, context: ssl.SSLContext) -> None:
        self._held = context

    @property
    def held(self) -> ssl.SSLContext:
        """The context new connections use now."""
        return self._held

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return self._held.wrap_bio(incoming, outgoing, server_side=server_side,
                                   server_hostname=server_hostname, session=session)

    def wrap_socket(self, sock: Any, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        return self._held.wrap_socket(sock, server_side=server_side,
                                      do_handshake_on_connect=do_handshake_on_connect,
                                      suppress_ragged_eofs=suppress_ragged_eofs,
                                      server_hostname=server_hostname, session=session)


def _context(protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if protocol == ssl.PROTOCOL_TLS_CLIENT:
        # Peers are named by URI SAN, not DNS: the chain is verified by OpenSSL,
        # the SPIFFE id by `Identity.peer` after the handshake.
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class Identity:
    """One sidecar's certificate and trust bundle, as TLS contexts that can be reloaded.

    ``folder`` holds ``cert.pem``, ``key.pem`` and ``ca.pem`` (one or more CAs).
    ``server`` and ``client`` are what listeners and pools keep; each new
    connection through them uses the files as of the last `reload`.
    """

    def __init__(self, folder: str | Path, mesh: str) -> None:
        self.folder = Path(folder)
        self.mesh = mesh
        self.server = _Current(ssl.PROTOCOL_TLS_SERVER)
        self.client = _Current(ssl.PROTOCOL_TLS_CLIENT)
        for current in (self.server, self.client):
            # Never used for a handshake (`_Current` hands them on), but kept like the real ones.
            current.minimum_version = ssl.TLSVersion.TLSv1_2
            current.verify_mode = ssl.CERT_REQUIRED
        self.client.check_hostname = False
        self.reload()

    def reload(self) -> None:
        """Read the folder's files again into fresh contexts; new handshakes use them, open connections carry on.

        Both contexts are built before either is used, so a missing or bad file
        (OSError, of which ssl.SSLError is one) changes nothing.
        """
        cert, key, ca = (str(self.folder / n) for n in ("cert.pem", "key.pem", "ca.pem"))
        server, client = _context(ssl.PROTOCOL_TLS_SERVER), _context(ssl.PROTOCOL_TLS_CLIENT)
        for ctx in (server, client):
            ctx.load_cert_chain(cert, key)
            ctx.load_verify_locations(ca)
        self.server.use(server)
        self.client.use(client)

    def peer(self, transport: Any) -> str | None:
        """The calling service, from the verified certificate on ``transport``."""
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return None
        return service_of(ssl_object.getpeercert(), self.mesh)


async def fresh_pool(pool: Pool) -> Pool:
    """``pool`` without the connections it keeps alive: what to send on after `Identity.reload`.

    A kept-alive connection was verified against the trust of before (a CA
    since removed, say), so none may carry another request. (Connections in
    use close when their request ends.)
    """
    pool.close_idle()
    return pool


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
