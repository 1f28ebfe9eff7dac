"""A sidecar's workload identity: its certificate, the peers it names, mutual TLS contexts.

Every service instance gets a certificate whose URI SAN is
``spiffe://<mesh>/<service>``, signed by the mesh CA (`mesh.control.ca`,
which `mesh up` keeps in its state folder). Sidecars talk to each other
only over mutual TLS (1.3 preferred, 1.2 minimum): the receiving side
learns the caller's service from the verified certificate (`Identity.peer`),
the calling side checks that it reached the service it meant to.

Rotation needs no restart: `Identity.reload` builds new contexts from the
files and swaps them in behind the two that listeners and connection pools
hold for life (`Identity.server`, `Identity.client`), so every new handshake,
accepted or made, uses the certificate and the trust bundle of the moment,
while connections already open carry on. Fresh contexts, not a reload into
the old ones: OpenSSL can add CAs to a context's store but never remove
them, and a CA taken out of the bundle must stop being trusted. The bundle
(``ca.pem``) may hold several CAs, which is how a new CA is trusted
everywhere before anything is issued from it (`mesh.control.ca.rotate_ca`).
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.http.client import Pool

__all__ = ["HANDSHAKE_FAILURES", "CertInfo", "Identity", "describe", "fresh_pool", "service_of", "spiffe_id"]


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


@dataclass
class CertInfo:
    identity: str
    not_after: dt.datetime


def describe(cert_file: Path) -> CertInfo:
    from cryptography import x509  # here: a sidecar that never describes a certificate never loads it (8 MB)

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


# TLS handshakes that failed in this process, by side ("server": a caller's; "client": ours to a peer)
# and OpenSSL's reason, lower case ("certificate_verify_failed", "tlsv1_alert_unknown_ca", ...); a peer
# whose verified certificate names another service counts as ("client", "wrong_peer").
HANDSHAKE_FAILURES: Counter[tuple[str, str]] = Counter()


class _Counted(ssl.SSLObject):
    """An SSL object that counts the handshakes it fails (`HANDSHAKE_FAILURES`)."""

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            reason = (exc.reason or type(exc).__name__).lower()
            HANDSHAKE_FAILURES["server" if self.server_side else "client", reason[:64]] += 1
            raise


def _context(protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.sslobject_class = _Counted
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # A peer's certificate is fixed for its connection: a sidecar reads it once per connection.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
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
        self._expires: float | None = None

    @property
    def expires(self) -> float:
        """When the certificate in use expires (Unix time), read once per `reload` when first asked."""
        if self._expires is None:
            self._expires = describe(self.folder / "cert.pem").not_after.timestamp()
        return self._expires
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

