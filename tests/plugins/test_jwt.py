"""The ``jwt`` plugin: who gets through, who gets a 401 and why, keys, JWKS, cache.

Tokens are minted inside each test, never at import: a slow run must not see
them expire. They live for a day unless expiry is what a test is about, and
tests about time move the plugin's clocks (`Clock`) instead of sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import hmac
import json
import logging
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import ClientSession, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import mesh_plugins.jwt as jwt_plugin
import mesh_plugins.jwt_keys as jwt_keys
from mesh import Context, PluginError, Request, Response
from mesh.loader import load_class
from mesh.testing import make_request, run_chain, run_mesh, run_plugin, started
from mesh_plugins.jwt import JWT

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
ISSUER = "https://id.example"
AUDIENCE = "shop"
DAY = 24 * 3600

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def pem(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def now() -> int:
    return int(time.time())


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims the test plugins accept, valid for a day from now; ``None`` removes one."""
    issued = now()
    base = {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": issued, "exp": issued + DAY}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(payload: dict[str, Any] | None = None, key: Any = SECRET, alg: str = "HS256",
         **headers: Any) -> str:
    return jwt.encode(claims() if payload is None else payload, key, algorithm=alg,
                      headers=headers or None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None = None) -> str:
    """A token built by hand, as an attacker would: pyjwt refuses to make these."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b""
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


class Upstream:
    """An app that records the requests that reach it."""

    def __init__(self) -> None:
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        return Response(200, b"ok")


async def call(plugin: JWT, token: str | None = None, path: str = "/",
               headers: dict[str, str] | None = None) -> tuple[Response, Upstream]:
    headers = dict(headers or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    upstream = Upstream()
    response = await run_plugin(plugin, make_request("GET", path, headers=headers), upstream)
    return response, upstream


def assert_refused(response: Response, upstream: Upstream, reason: str,
                   realm: str = "test") -> None:
    """A 401 for a token that was sent and doesn't pass."""
    assert response.status == 401
    assert upstream.seen == []
    assert response.headers.getall("WWW-Authenticate") == [
        f'Bearer realm="{realm}", error="invalid_token", error_description="{reason}"']
    assert SECRET.encode() not in response.body and b"BEGIN" not in response.body


def assert_challenged(response: Response, upstream: Upstream, realm: str = "test") -> None:
    """A 401 for a request without a token: the challenge alone, no error (RFC 6750 3.1)."""
    assert response.status == 401
    assert upstream.seen == []
    assert response.headers.getall("WWW-Authenticate") == [f'Bearer realm="{realm}"']


class Clock:
    """The jwt plugin's clocks and pyjwt's, moved by hand instead of by waiting."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.wall = time.time()
        self.monotonic = 1000.0
        clock = self

        class MovedDatetime(datetime.datetime):
            @classmethod
            def now(cls, tz: Any = None) -> datetime.datetime:
                return datetime.datetime.fromtimestamp(clock.wall, tz)

        monkeypatch.setattr(jwt_plugin, "_wall_time", lambda: self.wall)
        monkeypatch.setattr(jwt_keys, "_monotonic", lambda: self.monotonic)
        monkeypatch.setattr(jwt.api_jwt, "datetime", MovedDatetime)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.monotonic += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    return Clock(monkeypatch)


@pytest.fixture(autouse=True)
def patient_fetches(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here is about a slow key server: a loaded machine may take a while to answer."""
    monkeypatch.setattr(jwt_keys, "_FETCH_TIMEOUT", 60.0)


def secret_plugin(**options: Any) -> JWT:
    return JWT(**{"secret": SECRET, "issuer": ISSUER, "audience": AUDIENCE, **options})


def test_the_module_imports_pyjwt_not_itself():
    assert jwt_plugin.jwt.__name__ == "jwt"
    assert jwt_plugin.jwt.decode is jwt.decode


@pytest.mark.parametrize("use, message", [
    ("jwt_keys", "unknown plugin 'jwt_keys'"),
    ("mesh_plugins.jwt_keys:KeySet", "is not a plugin"),
])
def test_the_key_module_is_not_a_plugin(use, message):
    with pytest.raises(PluginError, match=message):
        load_class(use)


# --- options -------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({}, "exactly one of 'secret', 'public_key' or 'jwks'"),
    ({"secret": SECRET, "jwks": "keys.json"}, r"found secret, jwks"),
    ({"secret": SECRET, "algorithms": ["none"]}, "refused"),
    ({"secret": SECRET, "algorithms": []}, "refused"),
    ({"secret": SECRET, "algorithms": ["RS256"]}, "only verifies HS256"),
    ({"public_key": Path("k.pem"), "algorithms": ["RS256", "HS256"]}, "needs a secret"),
    ({"jwks": "http://id.example/jwks.json"}, "must be https"),
    ({"jwks": "ftp://127.0.0.1/jwks.json"}, "must be https"),
    ({"secret": "env:"}, "names no variable"),
    ({"secret": SECRET, "forward_claims": {"sub": "Host"}}, "can't carry a claim"),
    ({"secret": SECRET, "forward_claims": {"sub": "x user"}}, "can't carry a claim"),
    ({"secret": SECRET, "forward_claims": {"sub": "X_Mesh_Peer"}}, "can't carry a claim"),
    ({"secret": SECRET, "realm": "a\r\nX-Admin: 1"}, "realm"),
    ({"secret": SECRET, "realm": ""}, "realm"),
    ({"secret": SECRET, "skip": ["healthz"]}, "must start with '/'"),
])
def test_bad_options_are_refused_with_a_reason(options, message):
    with pytest.raises(ValueError, match=message):
        JWT(**options)


async def test_a_short_secret_does_not_start():
    with pytest.raises(Exception, match="10 bytes; HS256 needs at least 32"):
        async with started(JWT(secret="0123456789")):
            pass


async def test_secret_from_the_environment(monkeypatch):
    monkeypatch.setenv("MESH_TEST_JWT_SECRET", SECRET)
    plugin = JWT(secret="env:MESH_TEST_JWT_SECRET")
    async with started(plugin):
        response, _ = await call(plugin, sign(claims(aud=None)))
    assert response.status == 200


async def test_secret_from_a_missing_variable_does_not_start(monkeypatch):
    monkeypatch.delenv("MESH_TEST_JWT_SECRET", raising=False)
    with pytest.raises(Exception, match="MESH_TEST_JWT_SECRET is not set"):
        async with started(JWT(secret="env:MESH_TEST_JWT_SECRET")):
            pass


async def test_secret_from_a_file_relative_to_mesh_toml_drops_one_newline(tmp_path):
    (tmp_path / "secret.txt").write_text(SECRET + "\n")
    plugin = JWT(secret="file:secret.txt")
    async with started(plugin, ctx=Context(root=tmp_path)):
        response, _ = await call(plugin, sign(claims(aud=None)))
    assert response.status == 200


async def test_a_private_key_is_not_taken_for_a_public_key(tmp_path):
    path = tmp_path / "private.pem"
    path.write_bytes(RSA_KEY.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    with pytest.raises(Exception, match="private key"):
        async with started(JWT(public_key=path)):
            pass


async def test_a_weak_rsa_key_does_not_start(tmp_path):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    (tmp_path / "weak.pem").write_bytes(pem(weak.public_key()))
    with pytest.raises(Exception, match="1024-bit RSA key"):
        async with started(JWT(public_key=tmp_path / "weak.pem")):
            pass


# --- who gets through ------------------------------------------------------------

async def test_a_valid_token_passes_with_its_claims_in_state():
    plugin = secret_plugin()
    async with started(plugin):
        response, upstream = await call(plugin, sign())
    assert response.status == 200
    (request,) = upstream.seen
    assert request.state["claims"]["sub"] == "alice"
    assert request.headers["Authorization"].startswith("Bearer ")


def tampered() -> str:
    good = sign()
    head, _, signature = good.split(".")
    return ".".join([head, b64(json.dumps(claims(sub="admin")).encode()), signature])


# Each token is made when its test runs (a factory, not a token), so time
# spent before the test doesn't change what the test is about.
ATTACKS = {
    "empty bearer": (lambda: "", "malformed token"),
    "not a jwt": (lambda: "not-a-token", "malformed token"),
    "two segments": (lambda: "abc.def", "malformed token"),
    "garbage base64": (lambda: "!!!.@@@.###", "malformed token"),
    "header not json": (lambda: f"{b64(b'{oops')}.{b64(b'{}')}.", "malformed token"),
    "alg none": (lambda: forge({"alg": "none", "typ": "JWT"}, claims()), "algorithm not allowed"),
    "alg None": (lambda: forge({"alg": "None"}, claims()), "algorithm not allowed"),
    "alg NONE": (lambda: forge({"alg": "NONE"}, claims()), "algorithm not allowed"),
    "no alg": (lambda: forge({"typ": "JWT"}, claims(), SECRET.encode()), "algorithm not allowed"),
    "alg not allowed": (lambda: sign(alg="HS512", key=SECRET * 2), "algorithm not allowed"),
    "other secret": (lambda: sign(key="another-secret-that-is-32-bytes-long!!"), "bad signature"),
    "tampered payload": (tampered, "bad signature"),
    "expired": (lambda: sign(claims(exp=now() - DAY)), "token expired"),
    "not yet valid": (lambda: sign(claims(nbf=now() + DAY)), "token not yet valid"),
    "wrong issuer": (lambda: sign(claims(iss="https://evil.example")), "wrong issuer"),
    "no issuer": (lambda: sign(claims(iss=None)), "missing claim 'iss'"),
    "wrong audience": (lambda: sign(claims(aud="other")), "wrong audience"),
    "missing required claim": (lambda: sign(claims(sub=None)), "missing claim 'sub'"),
    "never expires": (lambda: sign(claims(exp=None)), "missing claim 'exp'"),
}


@pytest.mark.parametrize("make, reason", list(ATTACKS.values()), ids=list(ATTACKS))
async def test_attack_and_broken_tokens_get_401_with_the_reason(make, reason):
    plugin = secret_plugin(algorithms=["HS256"], required_claims=["exp", "sub"])
    token = make()
    async with started(plugin):
        response, upstream = await call(plugin, token)
    assert_refused(response, upstream, reason)


async def test_no_token_gets_the_challenge_without_an_error_code():
    plugin = secret_plugin()
    async with started(plugin):
        response, upstream = await call(plugin)
    assert_challenged(response, upstream)
    assert b"error" not in response.headers["WWW-Authenticate"].encode()


@pytest.mark.parametrize("value", ["Basic YWxpY2U6c2VjcmV0", "Token abc", "Digest username=x"])
async def test_another_scheme_counts_as_no_token(value):
    # RFC 6750 3.1: an unsupported authentication method gets no error code either.
    plugin = secret_plugin()
    async with started(plugin):
        response, upstream = await call(plugin, headers={"Authorization": value})
    assert_challenged(response, upstream)


async def test_an_empty_bearer_token_is_an_invalid_token():
    plugin = secret_plugin()
    async with started(plugin):
        response, upstream = await call(plugin, headers={"Authorization": "Bearer"})
    assert_refused(response, upstream, "malformed token")


async def test_the_realm_is_the_service_unless_given():
    default, named = secret_plugin(), secret_plugin(realm='shop "api"')
    async with started(default, named, ctx=Context(service="orders")):
        missing, up1 = await call(default)
        expired, up2 = await call(default, sign(claims(exp=now() - DAY)))
        named_missing, up3 = await call(named)
        named_bad, up4 = await call(named, "not-a-token")
    assert_challenged(missing, up1, realm="orders")
    assert_refused(expired, up2, "token expired", realm="orders")
    assert_challenged(named_missing, up3, realm='shop \\"api\\"')
    assert_refused(named_bad, up4, "malformed token", realm='shop \\"api\\"')


async def test_two_authorization_headers_are_refused():
    plugin = secret_plugin()
    async with started(plugin):
        upstream = Upstream()
        request = make_request(headers=[("Authorization", f"Bearer {sign()}"),
                                        ("Authorization", "Bearer x")])
        response = await run_plugin(plugin, request, upstream)
    assert_refused(response, upstream, "malformed token")


async def test_leeway_forgives_a_little_clock_skew():
    # Expired a minute ago; a leeway of an hour forgives it however slow the run.
    token = sign(claims(exp=now() - 60))
    strict, lenient = secret_plugin(), secret_plugin(leeway=3600)
    async with started(strict, lenient):
        assert (await call(strict, token))[0].status == 401
        assert (await call(lenient, token))[0].status == 200


async def test_a_token_with_an_audience_is_refused_where_none_is_configured():
    plugin = JWT(secret=SECRET)
    async with started(plugin):
        response, upstream = await call(plugin, sign())
    assert_refused(response, upstream, "wrong audience")


# --- public keys and the key-confusion attack -------------------------------------

@pytest.fixture
def rsa_pem(tmp_path: Path) -> Path:
    path = tmp_path / "public.pem"
    path.write_bytes(pem(RSA_KEY.public_key()))
    return path


@pytest.mark.parametrize("algorithms", [None, ["RS256"]])
async def test_rs256_passes_and_hs256_signed_with_the_public_key_is_refused(rsa_pem, algorithms):
    plugin = JWT(public_key=rsa_pem, audience=AUDIENCE, algorithms=algorithms)
    confused = forge({"alg": "HS256", "typ": "JWT"}, claims(), rsa_pem.read_bytes())
    async with started(plugin):
        good, _ = await call(plugin, sign(key=RSA_KEY, alg="RS256"))
        response, upstream = await call(plugin, confused)
    assert good.status == 200
    assert_refused(response, upstream, "algorithm not allowed")


async def test_a_token_signed_by_another_rsa_key_is_refused(rsa_pem):
    plugin = JWT(public_key=rsa_pem, audience=AUDIENCE)
    async with started(plugin):
        response, upstream = await call(plugin, sign(key=RSA_KEY_2, alg="RS256"))
    assert_refused(response, upstream, "bad signature")


async def test_an_ec_key_accepts_its_curve_only(tmp_path):
    (tmp_path / "ec.pem").write_bytes(pem(EC_KEY.public_key()))
    plugin = JWT(public_key=tmp_path / "ec.pem", audience=AUDIENCE)
    async with started(plugin):
        good, _ = await call(plugin, sign(key=EC_KEY, alg="ES256"))
        response, upstream = await call(plugin, sign(key=RSA_KEY, alg="RS256"))
    assert good.status == 200
    assert_refused(response, upstream, "algorithm not allowed")


async def test_a_certificate_can_hold_the_public_key(tmp_path):
    (tmp_path / "cert.pem").write_bytes(self_signed(EC_KEY).public_bytes(serialization.Encoding.PEM))
    plugin = JWT(public_key=tmp_path / "cert.pem", audience=AUDIENCE)
    async with started(plugin):
        response, _ = await call(plugin, sign(key=EC_KEY, alg="ES256"))
    assert response.status == 200


# --- forwarded claims, skip, forward_token -------------------------------------------

async def test_chosen_claims_go_to_the_app_as_headers_and_spoofed_ones_are_dropped():
    plugin = secret_plugin(forward_claims={"sub": "x-user", "roles": "x-roles",
                                           "email": "x-email"})
    token = sign(claims(roles=["admin", "ops"]))
    async with started(plugin):
        response, upstream = await call(plugin, token, headers={
            "X-User": "root", "x-email": "root@evil.example"})
    assert response.status == 200
    (request,) = upstream.seen
    assert request.headers.getall("x-user") == ["alice"]
    assert request.headers["x-roles"] == '["admin","ops"]'
    assert "x-email" not in request.headers  # no such claim: the client's copy is gone too


FORGED = [("X-User", "root"), ("x-user", "root"), ("X-USER", "root"), ("X_User", "root"),
          ("x_USER", "root"), ("X-Roles", '["admin"]'), ("x_roles", '["admin"]')]


def user_headers(request: Request) -> list[tuple[str, str]]:
    """Every header an app could read as x-user or x-roles (WSGI maps ``_`` to ``-``)."""
    return [(name, value) for name, value in request.headers.items()
            if name.lower().replace("_", "-") in ("x-user", "x-roles")]


def forwarding_plugin(**options: Any) -> JWT:
    return secret_plugin(forward_claims={"sub": "x-user", "roles": "X-Roles"}, **options)


async def test_a_client_cannot_forge_forwarded_claims_alongside_a_valid_token():
    plugin = forwarding_plugin()
    async with started(plugin):
        with_roles, up1 = await call(plugin, sign(claims(roles=["viewer"])), headers=FORGED)
        without_roles, up2 = await call(plugin, sign(), headers=FORGED)
    assert with_roles.status == 200 and without_roles.status == 200
    assert user_headers(up1.seen[0]) == [("x-user", "alice"), ("X-Roles", '["viewer"]')]
    assert user_headers(up2.seen[0]) == [("x-user", "alice")]  # no roles claim: no roles at all


async def test_a_client_cannot_forge_forwarded_claims_on_a_skipped_path():
    plugin = forwarding_plugin(skip=["/public/*"])
    async with started(plugin):
        anonymous, up1 = await call(plugin, path="/public/a", headers=FORGED)
        with_token, up2 = await call(plugin, sign(), path="/public/b", headers=FORGED)
    assert anonymous.status == 200 and with_token.status == 200
    # Skipped paths don't look at the token, so they forward no claims either.
    assert user_headers(up1.seen[0]) == [] and user_headers(up2.seen[0]) == []


@pytest.mark.parametrize("token", [None, "not-a-token", "expired"])
async def test_forged_claim_headers_are_dropped_before_a_refusal_too(token):
    # Dropped before the token is looked at: nothing later can find them.
    plugin = forwarding_plugin()
    if token == "expired":
        token = sign(claims(exp=now() - DAY))
    request = make_request(headers=[*FORGED, *([("Authorization", f"Bearer {token}")]
                                               if token else [])])
    async with started(plugin):
        response = await run_plugin(plugin, request, Upstream())
    assert response.status == 401
    assert user_headers(request) == []


async def test_other_headers_with_underscores_are_left_alone():
    plugin = forwarding_plugin()
    async with started(plugin):
        response, upstream = await call(plugin, sign(), headers={"X_Trace": "1", "x-user-agent": "z"})
    assert response.status == 200
    assert upstream.seen[0].headers["X_Trace"] == "1"
    assert upstream.seen[0].headers["x-user-agent"] == "z"


# Names near the forwarded ones, in any case, with "_" for "-" anywhere, and
# letters whose lowercase is ASCII ("\u212a", the Kelvin sign, is "k") or isn't ("\u017f", long s).
SPELLED = st.builds(
    lambda base, flips: "".join(
        {0: c, 1: c.upper(), 2: "_" if c == "-" else c, 3: {"k": "\u212a", "s": "\u017f"}.get(c, c)}[f]
        for c, f in zip(base, flips, strict=False)),
    st.sampled_from(["x-user", "x-roles", "x-key", "x-users", "x-use", "user", "x-a-b-c-d-e-f"]),
    st.lists(st.integers(0, 3), min_size=20, max_size=20))


@pytest.mark.parametrize("forward", [
    {"sub": "x-user", "roles": "X-Roles", "kid": "x-key"},
    {"sub": "x-user", "email": "X-A-B-C-D-E-F"},  # too many spellings to try: every name is looked at
])
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(SPELLED, max_size=6))
def test_every_spelling_of_a_forwarded_header_is_dropped_and_only_those(forward, names):
    plugin = secret_plugin(forward_claims=forward, skip=["/public/*"])
    forwarded = {name.lower().replace("_", "-") for name in forward.values()}
    request = make_request(path="/public/x", headers=[(name, "forged") for name in names])
    response = asyncio.run(run_plugin(plugin, request, Upstream()))
    assert response.status == 200
    assert [k for k, _ in request.headers.items()] == [n for n in names if n.lower().replace("_", "-") not in forwarded]


async def test_a_claim_that_would_break_its_header_makes_the_token_invalid():
    plugin = secret_plugin(forward_claims={"sub": "x-user"})
    async with started(plugin):
        response, upstream = await call(plugin, sign(claims(sub="alice\r\nx-admin: 1")))
    assert_refused(response, upstream, "invalid token")


async def test_skipped_paths_need_no_token_but_still_lose_spoofed_claim_headers():
    plugin = secret_plugin(skip=["/healthz", "/public/*"], forward_claims={"sub": "x-user"})
    async with started(plugin):
        health, upstream = await call(plugin, path="/healthz", headers={"x-user": "admin"})
        public, _ = await call(plugin, path="/public/logo.png")
        below, _ = await call(plugin, path="/healthz/deep")
        prefix_only, _ = await call(plugin, path="/public")
    assert health.status == 200 and public.status == 200
    assert "x-user" not in upstream.seen[0].headers
    assert "claims" not in upstream.seen[0].state
    assert below.status == 401 and prefix_only.status == 401


async def test_forward_token_false_keeps_the_token_from_the_app():
    plugin = secret_plugin(forward_token=False)
    async with started(plugin):
        response, upstream = await call(plugin, sign())
    assert response.status == 200
    assert "Authorization" not in upstream.seen[0].headers


# --- failure and logging ---------------------------------------------------------------

async def test_a_failing_plugin_fails_closed():
    # Used without start(): it has no key, so it raises, and the sidecar answers 500.
    upstream = Upstream()
    request = make_request(headers={"Authorization": f"Bearer {sign()}"})
    response = await run_chain([secret_plugin()], request, upstream)
    assert response.status == 500
    assert upstream.seen == []


async def test_the_reason_is_logged_without_the_token(caplog):
    caplog.set_level(logging.INFO, logger="mesh.plugin")
    plugin = secret_plugin()
    token = sign(claims(exp=now() - 60))
    async with started(plugin):
        await call(plugin, token)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "token expired" in logged
    assert token not in logged and token.split(".")[2] not in logged
    assert SECRET not in logged


# --- the cache of verified tokens ----------------------------------------------------------

@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Every signature check the plugin makes, by token."""
    calls: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(jwt_plugin.jwt, "decode", counting)
    return calls


async def test_a_verified_token_is_not_checked_again(decodes):
    plugin = secret_plugin()
    token = sign()
    async with started(plugin):
        results = [await call(plugin, token) for _ in range(5)]
    assert [r.status for r, _ in results] == [200] * 5
    assert decodes == [token]
    # Each request gets its own claims: a plugin that edits them can't poison the cache.
    results[0][1].seen[0].state["claims"]["sub"] = "mallory"
    assert results[1][1].seen[0].state["claims"]["sub"] == "alice"


async def test_a_cached_token_expires_with_the_token(decodes, clock):
    plugin = secret_plugin()
    exp = int(clock.wall) + 60
    token = sign(claims(iat=exp - 120, exp=exp))
    async with started(plugin):
        assert (await call(plugin, token))[0].status == 200
        clock.advance(exp - clock.wall - 1)  # a second before it expires: still cached
        assert (await call(plugin, token))[0].status == 200
        assert len(decodes) == 1
        clock.advance(2)                     # a second after
        response, upstream = await call(plugin, token)
    assert_refused(response, upstream, "token expired")
    assert len(decodes) == 2


async def test_the_cache_is_bounded(decodes):
    plugin = secret_plugin(cache_size=2)
    tokens = [sign(claims(sub=f"user{i}")) for i in range(3)]
    async with started(plugin):
        for token in tokens + tokens[:1]:
            assert (await call(plugin, token))[0].status == 200
    assert decodes == tokens + tokens[:1]  # the oldest was evicted, so checked again


async def test_refused_tokens_are_not_cached(decodes):
    plugin = secret_plugin()
    token = sign(key="another-secret-that-is-32-bytes-long!!")
    async with started(plugin):
        for _ in range(2):
            assert (await call(plugin, token))[0].status == 401
    assert len(decodes) == 2


# --- JWKS --------------------------------------------------------------------------------

def jwk(private_key: Any, kid: str, **extra: Any) -> dict[str, Any]:
    public = private_key.public_key()
    algorithm = (jwt.algorithms.RSAAlgorithm if isinstance(public, rsa.RSAPublicKey)
                 else jwt.algorithms.ECAlgorithm)
    return {**algorithm.to_jwk(public, as_dict=True), "kid": kid, "use": "sig", **extra}


def self_signed(key: Any, host: str = "127.0.0.1") -> x509.Certificate:
    import ipaddress

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


class JWKSServer:
    """A real HTTP(S) server on 127.0.0.1 serving a JWKS we can change, counting fetches."""

    def __init__(self, keys: list[dict[str, Any]], tls: ssl.SSLContext | None = None) -> None:
        self.keys = keys
        self.status = 200
        self.fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.fetches += 1
                body = json.dumps({"keys": server.keys}).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if tls else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}/.well-known/jwks.json"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def jwks_server():
    server = JWKSServer([jwk(RSA_KEY, "k1")])
    yield server
    server.close()


def jwks_plugin(source: str, **options: Any) -> JWT:
    return JWT(jwks=source, audience=AUDIENCE, **options)


def rs256(kid: str | None, key: Any = RSA_KEY, **overrides: Any) -> str:
    return sign(claims(**overrides), key=key, alg="RS256", **({"kid": kid} if kid else {}))


async def test_jwks_file_verifies_by_kid(tmp_path):
    (tmp_path / "jwks.json").write_text(json.dumps(
        {"keys": [jwk(RSA_KEY, "k1"), jwk(EC_KEY, "k2")]}))
    plugin = jwks_plugin("jwks.json")
    async with started(plugin, ctx=Context(root=tmp_path)):
        rsa_ok, _ = await call(plugin, rs256("k1"))
        ec_ok, _ = await call(plugin, sign(key=EC_KEY, alg="ES256", kid="k2"))
        wrong_key, up1 = await call(plugin, rs256("k2"))
        unknown, up2 = await call(plugin, rs256("k9"))
        no_kid, up3 = await call(plugin, rs256(None))
    assert rsa_ok.status == 200 and ec_ok.status == 200
    assert_refused(wrong_key, up1, "algorithm not allowed")  # k2 is an EC key
    assert_refused(unknown, up2, "unknown key")
    assert_refused(no_kid, up3, "unknown key")  # two keys: a kid is needed


async def test_a_token_without_kid_is_fine_when_the_set_has_one_key(tmp_path):
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk(RSA_KEY, "k1")]}))
    plugin = jwks_plugin(str(tmp_path / "jwks.json"))
    async with started(plugin):
        response, _ = await call(plugin, rs256(None))
    assert response.status == 200


async def test_a_jwk_pinned_to_an_algorithm_refuses_the_others(tmp_path):
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk(RSA_KEY, "k1", alg="PS256")]}))
    plugin = jwks_plugin(str(tmp_path / "jwks.json"))
    async with started(plugin):
        pinned, _ = await call(plugin, sign(claims(), key=RSA_KEY, alg="PS256", kid="k1"))
        other, upstream = await call(plugin, rs256("k1"))
    assert pinned.status == 200
    assert_refused(other, upstream, "algorithm not allowed")


async def test_a_missing_jwks_file_does_not_start(tmp_path):
    with pytest.raises(Exception, match="failed to start"):
        async with started(jwks_plugin("nope.json"), ctx=Context(root=tmp_path)):
            pass


async def test_jwks_url_is_fetched_once_at_start(jwks_server):
    plugin = jwks_plugin(jwks_server.url)
    async with started(plugin):
        responses = [await call(plugin, rs256("k1", sub=f"u{i}")) for i in range(3)]
    assert [r.status for r, _ in responses] == [200] * 3
    assert jwks_server.fetches == 1


async def test_a_rotated_in_key_is_fetched_on_its_first_token(jwks_server):
    plugin = jwks_plugin(jwks_server.url, jwks_min_interval=0)
    async with started(plugin):
        jwks_server.keys = [jwk(RSA_KEY, "k1"), jwk(RSA_KEY_2, "k2")]
        response, _ = await call(plugin, rs256("k2", key=RSA_KEY_2))
    assert response.status == 200
    assert jwks_server.fetches == 2


async def test_unknown_kids_refresh_at_most_once_per_interval(jwks_server, clock):
    plugin = jwks_plugin(jwks_server.url, jwks_min_interval=30)
    async with started(plugin):
        # Within the interval after the start's fetch: no fetch at all.
        clock.advance(29)
        assert (await call(plugin, rs256("unknown-0")))[0].status == 401
        assert jwks_server.fetches == 1
        clock.advance(1)
        # A flood of unknown kids, at once and one after another: one fetch.
        flood = await asyncio.gather(*(call(plugin, rs256(f"unknown-{i}")) for i in range(20)))
        for i in range(5):
            flood.append(await call(plugin, rs256(f"later-{i}")))
        assert [r.status for r, _ in flood] == [401] * 25
        assert jwks_server.fetches == 2
        clock.advance(30)
        assert (await call(plugin, rs256("unknown-x")))[0].status == 401
    assert jwks_server.fetches == 3


async def test_the_last_good_copy_serves_when_the_url_fails(jwks_server, caplog):
    plugin = jwks_plugin(jwks_server.url, jwks_min_interval=0)
    async with started(plugin):
        jwks_server.status = 500
        unknown, _ = await call(plugin, rs256("k2", key=RSA_KEY_2))
        known, _ = await call(plugin, rs256("k1"))
        jwks_server.close()  # and now nothing listens at all
        unknown_again, _ = await call(plugin, rs256("k3", key=RSA_KEY_2))
        known_again, _ = await call(plugin, rs256("k1", sub="bob"))
    assert unknown.status == 401 and unknown_again.status == 401
    assert known.status == 200 and known_again.status == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("HTTP Error 500" in w and "last good copy" in w for w in warnings)


async def test_a_url_down_at_start_refuses_everyone_until_it_answers(jwks_server, clock):
    jwks_server.status = 503
    plugin = jwks_plugin(jwks_server.url, jwks_min_interval=30)
    async with started(plugin):
        refused, upstream = await call(plugin, rs256("k1"))
        jwks_server.status = 200
        too_soon, _ = await call(plugin, rs256("k1"))
        clock.advance(30)
        accepted, _ = await call(plugin, rs256("k1"))
    assert_refused(refused, upstream, "unknown key")
    assert too_soon.status == 401
    assert accepted.status == 200
    assert jwks_server.fetches == 2


async def test_a_key_removed_from_the_set_stops_working_even_for_cached_tokens(jwks_server):
    jwks_server.keys = [jwk(RSA_KEY, "k1"), jwk(RSA_KEY_2, "k2")]
    plugin = jwks_plugin(jwks_server.url, jwks_max_age=0.2, jwks_min_interval=3600)
    token = rs256("k2", key=RSA_KEY_2)
    async with started(plugin):
        assert (await call(plugin, token))[0].status == 200
        jwks_server.keys = [jwk(RSA_KEY, "k1")]  # k2 leaked and was revoked
        # The periodic refresh picks it up: cached and all, the token stops working.
        deadline = time.monotonic() + 60
        while True:
            response, upstream = await call(plugin, token)
            if response.status != 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
    assert jwks_server.fetches >= 2
    assert_refused(response, upstream, "unknown key")


@pytest.fixture
def tls_jwks(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = tmp_path / "cert.pem"
    cert.write_bytes(self_signed(key).public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, tmp_path / "key.pem")
    server = JWKSServer([jwk(RSA_KEY, "k1")], tls=context)
    yield server, cert
    server.close()


async def test_jwks_over_https_verifies_the_server(tls_jwks, monkeypatch):
    server, cert = tls_jwks
    untrusted = jwks_plugin(server.url)
    async with started(untrusted):
        refused, _ = await call(untrusted, rs256("k1"))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # now its certificate is trusted
    trusted = jwks_plugin(server.url)
    async with started(trusted):
        accepted, _ = await call(trusted, rs256("k1"))
    assert refused.status == 401
    assert accepted.status == 200


async def test_one_unusable_key_does_not_spoil_the_set(tmp_path):
    weird = [{"kty": "oct", "alg": "none", "k": "AA", "kid": "n"},
             {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
             {**jwk(RSA_KEY_2, "enc"), "use": "enc"},
             "not a key"]
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [*weird, jwk(RSA_KEY, "k1")]}))
    plugin = jwks_plugin(str(tmp_path / "jwks.json"))
    async with started(plugin):
        good, _ = await call(plugin, rs256("k1"))
        encryption_key, upstream = await call(plugin, rs256("enc", key=RSA_KEY_2))
        odd_kid, upstream2 = await call(plugin, forge({"alg": "RS256", "kid": ["k1"]}, claims()))
    assert good.status == 200
    assert_refused(encryption_key, upstream, "unknown key")
    assert_refused(odd_kid, upstream2, "malformed token")


async def test_the_example_keys_work_together():
    import importlib.util

    keys = Path(__file__).resolve().parents[2] / "examples" / "gateway" / "keys"
    spec = importlib.util.spec_from_file_location("example_mint", keys / "mint.py")
    mint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mint)
    token = mint.mint("alice")
    for plugin in (JWT(public_key=keys / "public.pem", issuer=ISSUER, audience=AUDIENCE),
                   JWT(jwks=str(keys / "jwks.json"), issuer=ISSUER, audience=AUDIENCE)):
        async with started(plugin):
            response, upstream = await call(plugin, token)
        assert response.status == 200
        assert upstream.seen[0].state["claims"]["sub"] == "alice"


# --- metrics -----------------------------------------------------------------------------

METERED = f"""
[mesh]
name = "jwtm"
[services.web]
command = "x"
port = 1
plugins = [ {{ use = "jwt", jwks = "jwks.json", issuer = "{ISSUER}", audience = "{AUDIENCE}", skip = ["/healthz"] }} ]
"""


async def test_refusals_are_counted_by_reason_and_acceptances_on_the_sidecars_metrics(
        aiohttp_server, tmp_path):
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk(RSA_KEY, "k1")]}))
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    port = (await aiohttp_server(app)).port
    hour = 3600
    valid = rs256("k1")
    sent = {
        None: [valid, valid, rs256("k1", sub="bob")],  # accepted (the second from the cache)
        "expired": [rs256("k1", exp=now() - hour), rs256("k1", iat=now() - 3 * hour, exp=now() - hour)],
        "not_yet_valid": [rs256("k1", nbf=now() + hour)],
        "wrong_issuer": [rs256("k1", iss="https://evil.example")],
        "wrong_audience": [rs256("k1", aud="elsewhere")],
        "bad_signature": [rs256("k1", key=RSA_KEY_2)],
        "unknown_key": [rs256("k9")],
        "missing": ["", "Basic dXNlcjpwYXNz"],  # no header; another scheme
        "malformed": ["Bearer not-a-jwt"],
        "other": [rs256("k1", exp=None), sign(kid="k1")],  # no exp; HS256 against an RSA key
    }
    async with run_mesh(METERED, {"web": port}, tmp_path, tls=False) as mesh, ClientSession() as session:
        async with session.get(mesh.url("web") + "/healthz") as response:  # skipped: counted nowhere
            assert response.status == 200
        for reason, tokens in sent.items():
            for token in tokens:
                header = token if not token or " " in token else f"Bearer {token}"
                async with session.get(mesh.url("web") + "/", headers={"Authorization": header} if header else {}) \
                        as response:
                    assert response.status == (200 if reason is None else 401), reason
        async with session.get(mesh.url("web", "admin") + "/metrics") as response:
            text = await response.text()
    samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name.startswith("mesh_jwt_")]
    found = {(sample.name, sample.labels.get("reason")): sample.value for sample in samples}
    assert {reason: found.get(("mesh_jwt_refusals_total", reason)) for reason in sent if reason} == \
        {reason: len(tokens) for reason, tokens in sent.items() if reason}
    assert found[("mesh_jwt_accepted_total", None)] == 3
    assert len(found) == len(sent)  # no other series: every label value is one of the fixed set
    assert all(sample.labels["service"] == "web" and sample.labels["plugin"] == "jwt" for sample in samples)
    assert valid.split(".")[1] not in text and "evil" not in text

