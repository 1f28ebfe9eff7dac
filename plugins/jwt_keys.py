"""The keys the ``jwt`` plugin verifies tokens with, and the algorithms each may verify.

Not a plugin (nothing here handles requests): reading an HMAC secret
(``env:NAME``, ``file:PATH`` or the string itself), a PEM public key or
certificate, and a JSON Web Key Set from a file or URL, which `KeySet`
fetches again in the background and on unknown ``kid`` values. A key's type
alone decides which algorithms it verifies, never a token. The options these
come from are described in ``mesh_plugins.jwt``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from mesh import Context

__all__ = [
    "KNOWN_ALGORITHMS", "Key", "KeySet", "check_algorithms", "check_url", "checked_key",
    "parse_jwks", "read_public_key", "read_secret",
]

# Minimum HMAC key length per algorithm (RFC 7518 section 3.2).
_HMAC = {"HS256": 32, "HS384": 48, "HS512": 64}
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC = {"secp256r1": ("ES256",), "secp384r1": ("ES384",),
       "secp521r1": ("ES512", "ES521"), "secp256k1": ("ES256K",)}
KNOWN_ALGORITHMS = frozenset({*_HMAC, *_RSA, *(a for algs in _EC.values() for a in algs), "EdDSA"})

_MAX_JWKS = 1024 * 1024
_FETCH_TIMEOUT = 5.0
_LOOPBACK_NAMES = {"localhost"}

# The clock of the intervals between JWKS fetches, read through this name so that tests can move time.
_monotonic = time.monotonic


@dataclass(frozen=True)
class Key:
    key: Any                      # bytes for HMAC, else a cryptography public key
    algorithms: frozenset[str]    # what this key may verify


def check_algorithms(algorithms: list[str], *, secret: bool, public_key: bool) -> None:
    """Raise ValueError unless ``algorithms`` are known and fit the kind of key given."""
    unknown = [a for a in algorithms if a not in KNOWN_ALGORITHMS]
    if not algorithms or unknown:
        raise ValueError(f"algorithms: unknown or refused {unknown or algorithms} "
                         f"(known: {', '.join(sorted(KNOWN_ALGORITHMS))}; 'none' is never accepted)")
    hmac = {a for a in algorithms if a in _HMAC}
    if secret and hmac != set(algorithms):
        raise ValueError(f"algorithms: a secret only verifies HS256/HS384/HS512, "
                         f"not {', '.join(sorted(set(algorithms) - hmac))}")
    if public_key and hmac:
        # SECURITY: the HS/RS confusion attack signs with the public key as HMAC secret.
        raise ValueError(f"algorithms: {', '.join(sorted(hmac))} needs a secret, "
                         "not a public key")


def _key_algorithms(key: Any) -> frozenset[str]:
    """The algorithms a key can verify: its type decides, never a token."""
    if isinstance(key, bytes):
        return frozenset(alg for alg, size in _HMAC.items() if len(key) >= size)
    if isinstance(key, rsa.RSAPublicKey):
        return frozenset(_RSA) if key.key_size >= 2048 else frozenset()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return frozenset(_EC.get(key.curve.name, ()))
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return frozenset({"EdDSA"})
    return frozenset()


def _describe_key(key: Any) -> str:
    if isinstance(key, bytes):
        return f"a {len(key)}-byte secret"
    if isinstance(key, rsa.RSAPublicKey):
        return f"a {key.key_size}-bit RSA key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC key on {key.curve.name}"
    return f"a {type(key).__name__}"


def checked_key(key: Any, where: str, algorithms: frozenset[str] | None) -> Key:
    """``key`` with the algorithms it will verify: ``algorithms``, or all its type can (None).

    Raises ValueError when it can verify none of them safely, or not all of ``algorithms``.
    """
    usable = _key_algorithms(key)
    if isinstance(key, bytes) and not usable:
        raise ValueError(f"{where} is {len(key)} bytes; HS256 needs at least 32")
    if not usable:
        raise ValueError(f"{where}: {_describe_key(key)} can't verify tokens safely")
    wanted = algorithms or usable
    unfit = wanted - usable
    if unfit:
        raise ValueError(f"{where}: {_describe_key(key)} can't verify "
                         f"{', '.join(sorted(unfit))}")
    return Key(key, frozenset(wanted))


def read_secret(secret: str, ctx: Context) -> bytes:
    """The HMAC secret ``env:NAME``, ``file:PATH`` (relative to mesh.toml) or ``secret`` names."""
    kind, _, rest = secret.partition(":")
    if kind == "env":
        value = os.environ.get(rest, "")
        if not value:
            raise ValueError(f"secret: environment variable {rest} is not set or empty")
        return value.encode()
    if kind == "file":
        path = ctx.path(rest)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"secret: cannot read {path}: {exc.strerror}") from exc
        # One trailing newline is the file's, not the secret's (echo, editors).
        return data[:-2] if data.endswith(b"\r\n") else data.removesuffix(b"\n")
    ctx.logger.warning("secret is written in mesh.toml; prefer 'env:NAME' or 'file:PATH'")
    return secret.encode()


def read_public_key(path: Path) -> Any:
    """The public key a PEM file holds, or a PEM certificate's; ValueError naming ``path`` if none."""
    try:
        data = path.read_bytes()
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificate(data).public_key()
        if b"PRIVATE KEY-----" in data:
            raise ValueError("it holds a private key; give the public key (the sidecar only verifies)")
        return serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"public_key {path}: {exc}") from exc


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> None:
    """Raise ValueError unless ``url`` is https, or http to this machine."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and _is_loopback(parts.hostname):
        return
    raise ValueError(f"jwks URL must be https:// (http:// only for 127.0.0.1), got {url!r}")


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    # SECURITY: a redirect must not downgrade the key fetch to plain http.
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Any:
        check_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _fetch_url(url: str) -> bytes:
    """GET ``url`` (blocking: run it in a thread). Raises on any failure."""
    handlers: list[Any] = [_SafeRedirects()]
    if _is_loopback(urllib.parse.urlsplit(url).hostname or ""):
        handlers.append(urllib.request.ProxyHandler({}))  # never send loopback through a proxy
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                   "User-Agent": "mesh-jwt"})
    with opener.open(request, timeout=_FETCH_TIMEOUT) as response:
        data = response.read(_MAX_JWKS + 1)
    if len(data) > _MAX_JWKS:
        raise ValueError(f"larger than {_MAX_JWKS} bytes")
    return data


def parse_jwks(data: bytes, allowed: frozenset[str]) -> dict[str | None, list[Key]]:
    """Keys by ``kid`` from a JWKS document; raises ValueError if none is usable."""
    document = json.loads(data)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set (no 'keys' list)")
    keys: dict[str | None, list[Key]] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry).key
        except Exception:  # a key this pyjwt can't use (any error): the others still serve
            continue
        algorithms = _key_algorithms(key) & allowed
        if "alg" in entry:  # the set's own pin on this key
            algorithms &= {entry["alg"]} if isinstance(entry["alg"], str) else set()
        kid = entry.get("kid")
        if algorithms and (kid is None or isinstance(kid, str)):
            keys.setdefault(kid, []).append(Key(key, frozenset(algorithms)))
    if not keys:
        raise ValueError("no usable signing key in the set")
    return keys


class KeySet:
    """A JWKS from a file or URL: keys by ``kid``, fetched off the event loop.

    ``refresh`` fetches at most once per ``min_interval`` and shares one fetch
    among all callers; a failed fetch keeps the last good keys. ``on_change``
    runs when a fetch brings a different set (so cached verdicts are dropped).
    """

    def __init__(self, source: str, path: Path | None, allowed: frozenset[str],
                 max_age: float, min_interval: float, log: logging.Logger,
                 on_change: Callable[[], None]) -> None:
        self.source = source
        self.path = path
        self.allowed = allowed
        self.max_age = max_age
        self.min_interval = min_interval
        self.log = log
        self.on_change = on_change
        self.keys: dict[str | None, list[Key]] = {}
        self._raw: bytes | None = None
        self._last_attempt = float("-inf")
        self._fetch: asyncio.Task[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._last_attempt = _monotonic()
        if self.path is not None:
            # A bad file is a configuration error: refuse to start.
            data = await asyncio.to_thread(self.path.read_bytes)
            self._install(data)
        else:
            await self._attempt()
        self._loop_task = asyncio.create_task(self._periodic())

    async def stop(self) -> None:
        for task in (self._loop_task, self._fetch):
            if task is not None:
                task.cancel()
        for task in (self._loop_task, self._fetch):
            if task is not None:
                try:
                    await task
                except asyncio.CancelledError:
                    pass

    def lookup(self, kid: str | None) -> list[Key]:
        if kid is None:
            # No kid: only unambiguous with a single key in the set.
            only = [k for keys in self.keys.values() for k in keys]
            return only if len(only) == 1 else []
        return self.keys.get(kid, [])

    async def refresh(self, *, scheduled: bool = False) -> None:
        """Fetch again, unless a fetch for a token ran less than ``min_interval`` ago."""
        if self._fetch is None or self._fetch.done():
            if not scheduled and _monotonic() - self._last_attempt < self.min_interval:
                return
            self._last_attempt = _monotonic()
            self._fetch = asyncio.create_task(self._attempt())
        # Shielded: a client hanging up must not cancel a fetch others wait on.
        await asyncio.shield(self._fetch)

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.max_age)
            await self.refresh(scheduled=True)

    async def _attempt(self) -> None:
        try:
            if self.path is not None:
                data = await asyncio.to_thread(self.path.read_bytes)
            else:
                data = await asyncio.to_thread(_fetch_url, self.source)
            self._install(data)
        except Exception as exc:  # any failure: keep serving the last good copy
            kept = f"keeping the {len(self.keys)} key id(s) from the last good copy" \
                if self.keys else "no keys yet: every token is refused"
            self.log.warning("jwks %s: fetch failed (%s: %s); %s",
                             self.source, type(exc).__name__, exc, kept)

    def _install(self, data: bytes) -> None:
        keys = parse_jwks(data, self.allowed)
        changed = self._raw is not None and data != self._raw
        self.keys, self._raw = keys, data
        if changed:
            self.log.info("jwks %s: key set changed (%d key ids)", self.source, len(keys))
            self.on_change()
