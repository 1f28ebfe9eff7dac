"""``jwt``: let through only requests that carry a valid JSON Web Token.

The token comes from ``Authorization: Bearer <token>``. It is checked with
pyjwt against one source of keys, and on success its claims are in
``request.state["claims"]`` for the plugins after this one.

Options (exactly one of ``secret``, ``public_key``, ``jwks``):

- ``secret``: an HMAC key. ``"env:NAME"`` reads it from the environment
  variable ``NAME``, ``"file:PATH"`` from a file (relative to mesh.toml; one
  trailing newline is dropped); any other string is the secret itself. It
  must be at least 32 bytes (RFC 7518 section 3.2), or the sidecar won't start.
- ``public_key``: a PEM file holding an RSA (2048 bits or more), EC or
  Ed25519/Ed448 public key, or a certificate.
- ``jwks``: a JSON Web Key Set, as a file or an ``https://`` URL (``http://``
  only for 127.0.0.1, ::1 and localhost). It is loaded at start and fetched
  again in the background every ``jwks_max_age``. A token naming a ``kid``
  the set doesn't have makes it fetch at once, but at most once per
  ``jwks_min_interval`` however many such tokens arrive (concurrent ones
  wait for the same fetch). A failed fetch keeps the last good copy; a
  changed set forgets the cached tokens, so a removed key stops working. A
  URL that fails at start doesn't stop the sidecar: requests get 401 until
  a fetch succeeds (a missing or bad *file* does stop it). A token without
  a ``kid`` is accepted only when the set has a single key.
- ``algorithms`` (list): the ``alg`` values accepted. Default: every
  algorithm the key's type can verify (HS256/384/512 for a secret, as long
  as it is long enough; RS* and PS* for RSA; the curve's ES* for EC; EdDSA).
  The token's own ``alg`` never widens this list: ``none`` is always
  refused, and an HMAC ``alg`` never verifies against a public key.
- ``issuer``, ``audience`` (string or list): accepted ``iss`` / ``aud``;
  when set, the claim is required. A token that has an ``aud`` is refused
  when ``audience`` isn't set (RFC 7519 section 4.1.3).
- ``leeway`` (duration, default ``"0s"``): clock skew allowed on ``exp``,
  ``nbf`` and ``iat``.
- ``required_claims`` (list, default ``["exp"]``): claims a token must have.
  Give ``[]`` to accept tokens that never expire.
- ``forward_claims`` (table, claim -> header): e.g. ``{ sub = "x-user" }``
  passes the ``sub`` claim to the app as ``x-user``. Strings go as they are,
  other values as compact JSON. Every client copy of these headers is
  removed first, on every request (skipped paths, refused tokens and
  tokens without the claim included), so a client can't forge them: in
  any letter case, and with ``_`` for ``-`` too (``X_User``), which
  WSGI/CGI apps read as the same header. A claim string holding control
  characters makes the token invalid.
- ``forward_token`` (bool, default true): false removes ``Authorization``
  before the request goes on.
- ``skip`` (list of paths): paths that need no token, exact (``"/healthz"``)
  or a prefix ending in ``/*`` (``"/public/*"``).
- ``realm`` (default: the service's name): the ``realm`` of the
  ``WWW-Authenticate`` challenge.
- ``cache_size`` (int, default 10000): how many verified tokens to remember,
  each until it expires (0 turns the cache off). A cached token costs a dict
  lookup instead of a signature check.
- ``jwks_max_age`` (duration, default ``"10m"``), ``jwks_min_interval``
  (duration, default ``"30s"``): see ``jwks``.

A refused request gets ``401`` and a challenge (RFC 6750 section 3):

- no token (no ``Authorization`` header, or another scheme than
  ``Bearer``): ``WWW-Authenticate: Bearer realm="<realm>"``, with no error
  code: the client only learns that a token is needed;
- a token that doesn't pass: ``WWW-Authenticate: Bearer realm="<realm>",
  error="invalid_token", error_description="<reason>"``, where reason is
  one of: ``malformed token``, ``algorithm not allowed``, ``unknown key``,
  ``bad signature``, ``token expired``, ``token not yet valid``, ``wrong
  issuer``, ``wrong audience``, ``missing claim 'NAME'``, ``invalid token``.

The log says more (at INFO, with the request id); neither ever contains the
token or key material. Any other failure raises, and the sidecar answers
500: nothing gets through on error.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import os
import re
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cachetools import TLRUCache
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from mesh import CallNext, Context, Duration, Plugin, Request, Response

__all__ = ["JWT"]

# Minimum HMAC key length per algorithm (RFC 7518 section 3.2).
_HMAC = {"HS256": 32, "HS384": 48, "HS512": 64}
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC = {"secp256r1": ("ES256",), "secp384r1": ("ES384",),
       "secp521r1": ("ES512", "ES521"), "secp256k1": ("ES256K",)}
_KNOWN = {*_HMAC, *_RSA, *(a for algs in _EC.values() for a in algs), "EdDSA"}

_MAX_TOKEN = 16 * 1024
_MAX_JWKS = 1024 * 1024
_FETCH_TIMEOUT = 5.0
_NO_EXP_TTL = 300.0  # how long a token without ``exp`` stays cached
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN_CHARS = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers a claim may not be forwarded into: they frame the request or name its sender.
_RESERVED = {"host", "content-length", "transfer-encoding", "connection", "upgrade",
             "te", "authorization", "x-mesh-peer", "x-request-id"}
_LOOPBACK_NAMES = {"localhost"}

# The clocks, read through these names so that tests can move time.
_wall_time = time.time        # seconds since the epoch, as exp and nbf count
_monotonic = time.monotonic   # intervals between JWKS fetches


def _header_key(name: str) -> str:
    """A header name as WSGI/CGI apps see it: ``X_User`` and ``x-user`` are one."""
    return name.lower().replace("_", "-")


class _Rejected(Exception):
    """A token that doesn't pass: ``reason`` goes to the client, ``detail`` to the log.

    ``error`` is the RFC 6750 error code, None when the request carried no token.
    """

    def __init__(self, reason: str, detail: str = "", *,
                 error: str | None = "invalid_token") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason
        self.error = error


@dataclass(frozen=True)
class _Key:
    key: Any                      # bytes for HMAC, else a cryptography public key
    algorithms: frozenset[str]    # what this key may verify


@dataclass(frozen=True)
class _Verified:
    claims: dict[str, Any]
    headers: tuple[tuple[str, str], ...]   # forwarded claims
    expires: float                          # wall clock, exp + leeway


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


def _load_public_key(data: bytes) -> Any:
    if b"-----BEGIN CERTIFICATE-----" in data:
        return x509.load_pem_x509_certificate(data).public_key()
    if b"PRIVATE KEY-----" in data:
        raise ValueError("it holds a private key; give the public key (the sidecar only verifies)")
    return serialization.load_pem_public_key(data)


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(url: str) -> None:
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
        _check_url(newurl)
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


def _parse_jwks(data: bytes, allowed: frozenset[str]) -> dict[str | None, list[_Key]]:
    """Keys by ``kid`` from a JWKS document; raises ValueError if none is usable."""
    document = json.loads(data)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set (no 'keys' list)")
    keys: dict[str | None, list[_Key]] = {}
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
            keys.setdefault(kid, []).append(_Key(key, frozenset(algorithms)))
    if not keys:
        raise ValueError("no usable signing key in the set")
    return keys


def _header_value(value: Any) -> str | None:
    """A claim as a header value, or None if it can't be one safely."""
    if isinstance(value, str):
        return None if _CONTROL.search(value) else value
    return json.dumps(value, separators=(",", ":"))  # escapes control characters


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim '{exc.claim}'"
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "invalid token"


# Most specific first: InvalidSignatureError is a DecodeError.
_REASONS: list[tuple[type[Exception], str]] = [
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidKeyError, "algorithm not allowed"),
    (jwt.DecodeError, "malformed token"),
]


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class _KeySet:
    """A JWKS from a file or URL: keys by ``kid``, fetched off the event loop.

    ``refresh`` fetches at most once per ``min_interval`` and shares one fetch
    among all callers; a failed fetch keeps the last good keys. ``on_change``
    runs when a fetch brings a different set (so cached verdicts are dropped).
    """

    def __init__(self, source: str, path: Path | None, allowed: frozenset[str],
                 max_age: float, min_interval: float, log: logging.Logger,
                 on_change: Any) -> None:
        self.source = source
        self.path = path
        self.allowed = allowed
        self.max_age = max_age
        self.min_interval = min_interval
        self.log = log
        self.on_change = on_change
        self.keys: dict[str | None, list[_Key]] = {}
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

    def lookup(self, kid: str | None) -> list[_Key]:
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
        keys = _parse_jwks(data, self.allowed)
        changed = self._raw is not None and data != self._raw
        self.keys, self._raw = keys, data
        if changed:
            self.log.info("jwks %s: key set changed (%d key ids)", self.source, len(keys))
            self.on_change()


class JWT(Plugin):
    """Verifies ``Authorization: Bearer`` JWTs; see the module docstring for options."""

    def __init__(
        self,
        secret: str | None = None,
        public_key: Path | None = None,
        jwks: str | None = None,
        algorithms: list[str] | None = None,
        issuer: str | list[str] | None = None,
        audience: str | list[str] | None = None,
        leeway: Duration = Duration(0),
        required_claims: list[str] | None = None,
        forward_claims: dict[str, str] | None = None,
        forward_token: bool = True,
        skip: list[str] | None = None,
        realm: str | None = None,
        cache_size: int = 10_000,
        jwks_max_age: Duration = Duration(600),
        jwks_min_interval: Duration = Duration(30),
    ) -> None:
        given = [name for name, value in
                 (("secret", secret), ("public_key", public_key), ("jwks", jwks)) if value]
        if len(given) != 1:
            raise ValueError("give exactly one of 'secret', 'public_key' or 'jwks'"
                             + (f" (found {', '.join(given)})" if given else ""))
        if algorithms is not None:
            unknown = [a for a in algorithms if a not in _KNOWN]
            if not algorithms or unknown:
                raise ValueError(f"algorithms: unknown or refused {unknown or algorithms} "
                                 f"(known: {', '.join(sorted(_KNOWN))}; 'none' is never accepted)")
            hmac = {a for a in algorithms if a in _HMAC}
            if secret and hmac != set(algorithms):
                raise ValueError(f"algorithms: a secret only verifies HS256/HS384/HS512, "
                                 f"not {', '.join(sorted(set(algorithms) - hmac))}")
            if public_key and hmac:
                # SECURITY: the HS/RS confusion attack signs with the public key as HMAC secret.
                raise ValueError(f"algorithms: {', '.join(sorted(hmac))} needs a secret, "
                                 "not a public key")
        if secret and secret.startswith(("env:", "file:")) and not secret.split(":", 1)[1]:
            raise ValueError(f"secret: {secret!r} names no variable or file")
        if jwks and "://" in jwks:
            _check_url(jwks)
        headers = dict(forward_claims or {})
        for claim, header in headers.items():
            if not _TOKEN_CHARS.match(header) or _header_key(header) in _RESERVED:
                raise ValueError(f"forward_claims.{claim}: {header!r} can't carry a claim")
        if realm is not None and (not realm or not realm.isascii() or _CONTROL.search(realm)):
            raise ValueError(f"realm: {realm!r} must be a non-empty line of ASCII text")
        for path in skip or []:
            if not path.startswith("/"):
                raise ValueError(f"skip: {path!r} must start with '/'")
        if cache_size < 0:
            raise ValueError("cache_size must be 0 or more")

        self.secret = secret
        self.public_key = public_key
        self.jwks = jwks
        # None: whatever the key's type can verify (decided in start).
        self.algorithms = frozenset(algorithms) if algorithms else None
        self.issuer = issuer
        self.audience = audience
        self.leeway = float(leeway)
        self.required_claims = ["exp"] if required_claims is None else list(required_claims)
        self.forward_claims = headers
        self._forwarded = frozenset(_header_key(h) for h in headers.values())
        self.realm = realm
        self.forward_token = forward_token
        self._skip_exact = frozenset(p for p in skip or [] if not p.endswith("/*"))
        self._skip_prefixes = tuple(p[:-1] for p in skip or [] if p.endswith("/*"))
        self.cache_size = cache_size
        self.jwks_max_age = float(jwks_max_age)
        self.jwks_min_interval = float(jwks_min_interval)

        self._log = logging.getLogger("mesh.plugin.jwt")
        self._keys: list[_Key] | None = None      # secret or public_key
        self._keyset: _KeySet | None = None       # jwks
        self._cache: TLRUCache[str, _Verified] | None = (
            TLRUCache(cache_size, lambda _token, verified, _now: verified.expires,
                      timer=lambda: _wall_time()) if cache_size else None)

    async def start(self, ctx: Context) -> None:
        """Read the key (or load the JWKS and start refreshing it)."""
        self._log = ctx.logger
        if self.realm is None:
            self.realm = ctx.service
        if self.secret:
            key = self._read_secret(ctx)
            self._keys = [self._checked_key(key, "secret")]
        elif self.public_key:
            path = ctx.path(self.public_key)
            try:
                key = _load_public_key(path.read_bytes())
            except (OSError, ValueError, TypeError) as exc:
                raise ValueError(f"public_key {path}: {exc}") from exc
            self._keys = [self._checked_key(key, f"public_key {path}")]
        else:
            assert self.jwks is not None
            path = None if "://" in self.jwks else ctx.path(self.jwks)
            self._keyset = _KeySet(self.jwks, path, self.algorithms or frozenset(_KNOWN),
                                   self.jwks_max_age, self.jwks_min_interval,
                                   self._log, self._forget)
            await self._keyset.start()

    async def stop(self) -> None:
        if self._keyset is not None:
            await self._keyset.stop()

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        # SECURITY: the forwarded-claim headers are ours alone; drop a client's
        # copies first, whatever happens next, in every spelling an app may read.
        if self._forwarded:
            spoofed = [name for name in request.headers if _header_key(name) in self._forwarded]
            for name in spoofed:
                request.headers.popall(name, None)
        if request.path in self._skip_exact or request.path.startswith(self._skip_prefixes):
            return await call_next(request)
        try:
            verified = await self._verify(request)
        except _Rejected as rejected:
            self._log.info("request %s from %s refused: %s",
                           request.id, request.client, rejected.detail)
            return _unauthorized(self.realm or "", rejected)
        request.state["claims"] = dict(verified.claims)  # a copy: the cache keeps its own
        request.headers.extend(verified.headers)
        if not self.forward_token:
            request.headers.popall("Authorization", None)
        return await call_next(request)

    async def _verify(self, request: Request) -> _Verified:
        if self._keys is None and self._keyset is None:
            raise RuntimeError("jwt plugin used before start()")
        token = _bearer_token(request)
        if self._cache is not None:
            try:
                return self._cache[token]  # [] not .get(): 5x faster on TLRUCache
            except KeyError:
                pass
        header = _peek_header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in (self.algorithms or _KNOWN):
            raise _Rejected("algorithm not allowed", f"alg {alg!r} is not allowed")
        keys = await self._keys_for(header)
        candidates = [k for k in keys if alg in k.algorithms]
        if not candidates:
            raise _Rejected("algorithm not allowed", f"alg {alg!r} doesn't fit the key")
        claims = self._decode(token, alg, candidates)
        return self._remember(token, claims)

    async def _keys_for(self, header: dict[str, Any]) -> list[_Key]:
        if self._keys is not None:
            return self._keys
        assert self._keyset is not None
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _Rejected("malformed token", "kid is not a string")
        keys = self._keyset.lookup(kid)
        if not keys:
            await self._keyset.refresh()  # maybe a rotated-in key (rate-limited)
            keys = self._keyset.lookup(kid)
        if not keys:
            raise _Rejected("unknown key", f"no key for kid {kid!r}" if kid is not None
                            else "token has no kid and the key set has several keys")
        return keys

    def _decode(self, token: str, alg: str, keys: list[_Key]) -> dict[str, Any]:
        last: jwt.PyJWTError | None = None
        for key in keys:  # usually one; several only for a kid shared by rotated keys
            try:
                return jwt.decode(
                    token, key.key, algorithms=[alg], issuer=self.issuer,
                    audience=self.audience, leeway=self.leeway,
                    options={"require": self.required_claims,
                             "enforce_minimum_key_length": True})
            except jwt.InvalidSignatureError as exc:
                last = exc
            except jwt.PyJWTError as exc:
                raise _Rejected(_reason(exc), f"{_reason(exc)} ({exc})") from None
        assert last is not None
        raise _Rejected("bad signature", "bad signature") from None

    def _remember(self, token: str, claims: dict[str, Any]) -> _Verified:
        headers = []
        for claim, header in self.forward_claims.items():
            if claim in claims:
                value = _header_value(claims[claim])
                if value is None:
                    raise _Rejected("invalid token",
                                    f"claim {claim!r} can't be sent as header {header}")
                headers.append((header, value))
        exp = claims.get("exp")
        expires = (float(exp) + self.leeway if isinstance(exp, (int, float))
                   else _wall_time() + _NO_EXP_TTL)
        verified = _Verified(claims, tuple(headers), expires)
        if self._cache is not None:
            self._cache[token] = verified
        return verified

    def _forget(self) -> None:
        """The key set changed: tokens verified with a removed key must be checked again."""
        if self._cache is not None:
            self._cache.clear()

    def _read_secret(self, ctx: Context) -> bytes:
        assert self.secret is not None
        kind, _, rest = self.secret.partition(":")
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
        self._log.warning("secret is written in mesh.toml; prefer 'env:NAME' or 'file:PATH'")
        return self.secret.encode()

    def _checked_key(self, key: Any, where: str) -> _Key:
        usable = _key_algorithms(key)
        if isinstance(key, bytes) and not usable:
            raise ValueError(f"{where} is {len(key)} bytes; HS256 needs at least 32")
        if not usable:
            raise ValueError(f"{where}: {_describe_key(key)} can't verify tokens safely")
        wanted = self.algorithms or usable
        unfit = wanted - usable
        if unfit:
            raise ValueError(f"{where}: {_describe_key(key)} can't verify "
                             f"{', '.join(sorted(unfit))}")
        return _Key(key, frozenset(wanted))


def _peek_header(token: str) -> dict[str, Any]:
    """The token's header, unverified: only to choose the key and algorithm.

    Cheaper than ``jwt.get_unverified_header``, which checks the whole token;
    ``jwt.decode`` checks it afterwards anyway, and refuses a header whose
    ``alg`` differs from the one chosen here.
    """
    head = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except ValueError:  # binascii.Error, UnicodeDecodeError and JSONDecodeError are ValueErrors
        header = None
    if not isinstance(header, dict) or token.count(".") != 2:
        raise _Rejected("malformed token", "token header is not a JSON object")
    return header


def _bearer_token(request: Request) -> str:
    values = request.headers.getall("Authorization", [])
    if not values:
        raise _Rejected("missing bearer token", "no Authorization header", error=None)
    if len(values) > 1:
        raise _Rejected("malformed token", "more than one Authorization header")
    scheme, _, token = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        raise _Rejected("missing bearer token", f"Authorization scheme {scheme[:20]!r}",
                        error=None)
    token = token.strip()
    if not token or len(token) > _MAX_TOKEN:
        raise _Rejected("malformed token", f"token of {len(token)} characters")
    return token


def _unauthorized(realm: str, rejected: _Rejected) -> Response:
    """The 401 and its challenge: an error code only when a token was sent (RFC 6750 3.1)."""
    challenge = f'Bearer realm="{_quote(realm)}"'
    if rejected.error is not None:
        challenge += (f', error="{rejected.error}"'
                      f', error_description="{_quote(rejected.reason)}"')
    return Response(401, f"401 Unauthorized: {rejected.reason}\n",
                    {"WWW-Authenticate": challenge})
