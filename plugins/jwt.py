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

Metrics (on the sidecar's ``/metrics``): ``mesh_jwt_accepted_total``, the
requests let through with a valid token, and ``mesh_jwt_refusals_total`` by
``reason``: ``missing`` (no bearer token), ``malformed``, ``bad_signature``,
``expired``, ``not_yet_valid``, ``wrong_issuer``, ``wrong_audience``,
``unknown_key`` or ``other`` (an algorithm not allowed, a missing claim, a
claim that can't be forwarded). Skipped paths count in neither.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cachetools import TLRUCache

from mesh import CallNext, Context, Duration, Plugin, Request, Response
from mesh_plugins.jwt_keys import (
    KNOWN_ALGORITHMS,
    Key,
    KeySet,
    check_algorithms,
    check_url,
    checked_key,
    read_public_key,
    read_secret,
)

__all__ = ["JWT"]

_MAX_TOKEN = 16 * 1024
_NO_EXP_TTL = 300.0  # how long a token without ``exp`` stays cached
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN_CHARS = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers a claim may not be forwarded into: they frame the request or name its sender.
_RESERVED = {"host", "content-length", "transfer-encoding", "connection", "upgrade",
             "te", "authorization", "x-mesh-peer", "x-request-id"}

# Seconds since the epoch, as exp and nbf count: read through this name so that tests can move time.
_wall_time = time.time


def _header_key(name: str) -> str:
    """A header name as WSGI/CGI apps see it: ``X_User`` and ``x-user`` are one."""
    return name.lower().replace("_", "-")


def _spellings(keys: frozenset[str]) -> tuple[str, ...] | None:
    """Every lowercased name whose `_header_key` is one of ``keys`` (``x-user``, ``x_user``),
    or None when there are too many to try one by one."""
    found: list[str] = []
    for key in keys:
        words = key.split("-")
        if len(words) > 5:
            return None
        for joins in itertools.product("-_", repeat=len(words) - 1):
            found.append(words[0] + "".join(join + word for join, word in zip(joins, words[1:], strict=True)))
    return tuple(found)


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
class _Verified:
    claims: dict[str, Any]
    headers: tuple[tuple[str, str], ...]   # forwarded claims
    expires: float                          # wall clock, exp + leeway


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


# The ``reason`` label of a refusal, from the reason the client is told; anything else is "other".
_LABELS = {
    "missing bearer token": "missing",
    "malformed token": "malformed",
    "bad signature": "bad_signature",
    "token expired": "expired",
    "token not yet valid": "not_yet_valid",
    "wrong issuer": "wrong_issuer",
    "wrong audience": "wrong_audience",
    "unknown key": "unknown_key",
}


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


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
            check_algorithms(algorithms, secret=bool(secret), public_key=bool(public_key))
        if secret and secret.startswith(("env:", "file:")) and not secret.split(":", 1)[1]:
            raise ValueError(f"secret: {secret!r} names no variable or file")
        if jwks and "://" in jwks:
            check_url(jwks)
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
        self._spellings = _spellings(self._forwarded)
        self.realm = realm
        self.forward_token = forward_token
        self._skip_exact = frozenset(p for p in skip or [] if not p.endswith("/*"))
        self._skip_prefixes = tuple(p[:-1] for p in skip or [] if p.endswith("/*"))
        self.cache_size = cache_size
        self.jwks_max_age = float(jwks_max_age)
        self.jwks_min_interval = float(jwks_min_interval)

        self._log = logging.getLogger("mesh.plugin.jwt")
        self._define_metrics(Context())  # until start() gives the sidecar's
        self._keys: list[Key] | None = None      # secret or public_key
        self._keyset: KeySet | None = None       # jwks
        self._cache: TLRUCache[str, _Verified] | None = (
            TLRUCache(cache_size, lambda _token, verified, _now: verified.expires,
                      timer=lambda: _wall_time()) if cache_size else None)

    async def start(self, ctx: Context) -> None:
        """Read the key (or load the JWKS and start refreshing it)."""
        self._log = ctx.logger
        self._define_metrics(ctx)
        if self.realm is None:
            self.realm = ctx.service
        if self.secret:
            self._keys = [checked_key(read_secret(self.secret, ctx), "secret", self.algorithms)]
        elif self.public_key:
            path = ctx.path(self.public_key)
            self._keys = [checked_key(read_public_key(path), f"public_key {path}", self.algorithms)]
        else:
            assert self.jwks is not None
            jwks_path = None if "://" in self.jwks else ctx.path(self.jwks)
            self._keyset = KeySet(self.jwks, jwks_path, self.algorithms or KNOWN_ALGORITHMS,
                                  self.jwks_max_age, self.jwks_min_interval,
                                  self._log, self._forget)
            await self._keyset.start()

    def _define_metrics(self, ctx: Context) -> None:
        self._accepted = ctx.metrics.counter("accepted", "requests let through with a valid token")
        self._refusals = ctx.metrics.counter("refusals", "requests refused with a 401", ["reason"])
        self._accepted.inc(0)  # every series from the start: a rate of 0, not a missing one
        for reason in {*_LABELS.values(), "other"}:
            self._refusals.inc(0, reason=reason)

    async def stop(self) -> None:
        if self._keyset is not None:
            await self._keyset.stop()

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        # SECURITY: the forwarded-claim headers are ours alone; drop a client's
        # copies first, whatever happens next, in every spelling an app may read.
        # A few lookups (the headers ignore case) say whether there is any to look for.
        if self._forwarded and (self._spellings is None
                                or any(name in request.headers for name in self._spellings)):
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
            self._refusals.inc(reason=_LABELS.get(rejected.reason, "other"))
            return _unauthorized(self.realm or "", rejected)
        self._accepted.inc()
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
        if not isinstance(alg, str) or alg not in (self.algorithms or KNOWN_ALGORITHMS):
            raise _Rejected("algorithm not allowed", f"alg {alg!r} is not allowed")
        keys = await self._keys_for(header)
        candidates = [k for k in keys if alg in k.algorithms]
        if not candidates:
            raise _Rejected("algorithm not allowed", f"alg {alg!r} doesn't fit the key")
        claims = self._decode(token, alg, candidates)
        return self._remember(token, claims)

    async def _keys_for(self, header: dict[str, Any]) -> list[Key]:
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

    def _decode(self, token: str, alg: str, keys: list[Key]) -> dict[str, Any]:
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
