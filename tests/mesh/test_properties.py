"""Property-based tests: the path normaliser, route policy and the config loader hold for any input."""

from __future__ import annotations

import string
from pathlib import Path
from urllib.parse import unquote

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from mesh.config import RouteConfig, parse
from mesh.errors import ConfigError
from mesh.http.paths import BadPath, normalize
from mesh.sidecar.routes import Policy

UNRESERVED = string.ascii_letters + string.digits + "-._~"
# What may appear raw in a path, and a few escapes that matter: dots, slashes, NUL, %, unreserved.
SEGMENT_CHARS = st.sampled_from(list(UNRESERVED + "!$&'()*+,;=:@") + [
    "%2e", "%2E", "%2f", "%5c", "%00", "%25", "%41", "%7e", "%7E", "%3a", "%3A", "%20", "%", "%zz", "..", "."])
segments = st.lists(st.lists(SEGMENT_CHARS, max_size=6).map("".join), max_size=8)
raw_paths = segments.map(lambda parts: "/" + "/".join(parts))

settings.register_profile("mesh", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mesh")


def encode_some(path: str, data: st.DataObject) -> str:
    """The same path with some unreserved characters written as %XX (either case)."""
    out = []
    i = 0
    while i < len(path):
        char = path[i]
        i += 1
        if char == "%":  # an escape (or a malformed one) stays as written
            out.append(path[i - 1:i + 2])
            i += 2
        elif char in UNRESERVED and data.draw(st.booleans()):
            escape = f"%{ord(char):02x}"
            out.append(escape.upper() if data.draw(st.booleans()) else escape)
        else:
            out.append(char)
    return "".join(out)


@given(raw_paths)
@example("/a/%2e%2e/b")
@example("/%2541")
def test_normalize_is_idempotent_and_leaves_nothing_to_reinterpret(path):
    try:
        result = normalize(path)
    except BadPath:
        return
    assert normalize(result) == result
    assert result.startswith("/")
    segments = result.split("/")[1:]
    assert "." not in segments and ".." not in segments, result
    assert "//" not in result
    lowered = result.lower()
    assert "%2f" not in lowered and "%5c" not in lowered and "%00" not in lowered and "\\" not in result
    # Every escape left is well formed, uppercase, and not of an unreserved character.
    i = result.find("%")
    while i != -1:
        hexdigits = result[i + 1:i + 3]
        assert len(hexdigits) == 2 and all(c in "0123456789ABCDEF" for c in hexdigits), result
        assert chr(int(hexdigits, 16)) not in UNRESERVED
        i = result.find("%", i + 1)
    # What an app reads after decoding once has no dot-segment and no new slash either.
    decoded = unquote(result)
    assert decoded.count("/") == result.count("/")
    assert "." not in decoded.split("/")[1:] and ".." not in decoded.split("/")[1:]


@given(raw_paths, st.data())
def test_every_spelling_of_a_path_normalizes_to_the_same_path(path, data):
    try:
        expected = normalize(path)
    except BadPath:
        return
    assert normalize(encode_some(path, data)) == expected


paths_or_globs = st.lists(st.text(UNRESERVED, min_size=1, max_size=5), min_size=1, max_size=4).map(
    lambda parts: "/" + "/".join(parts))


@given(paths_or_globs, raw_paths, st.sampled_from(["GET", "POST", "DELETE"]), st.data())
def test_route_policy_decides_on_the_normalized_path(prefix, path, method, data):
    """A prefix route allows a path iff the normalized path is under it, however the client spelled it."""
    try:
        normalized = normalize(path)
    except BadPath:
        return
    assume("[" not in prefix and "?" not in prefix)
    policy = Policy([RouteConfig(source="web", to="api", paths=[prefix, prefix + "/*"], methods=["GET"])])
    decision = policy.check("web", "api", method, normalized)
    expected = method == "GET" and (normalized == prefix or normalized.startswith(prefix + "/"))
    assert decision.allowed == expected
    # A spelling with escapes normalizes to the same path, so gets the same decision.
    again = policy.check("web", "api", method, normalize(encode_some(path, data)))
    assert again.allowed == decision.allowed
    # Nobody else is allowed, and a service may always call itself.
    assert not policy.check("other", "api", method, normalized).allowed
    assert policy.check("api", "api", method, normalized).allowed


toml_scalars = st.one_of(st.text(max_size=12), st.integers(-5, 70000), st.floats(allow_nan=False, width=32),
                         st.booleans())
toml_values = st.recursive(toml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
SERVICE_KEYS = ["command", "build", "image", "port", "expose", "health", "env", "plugins", "outbound",
                "scale", "instances", "replicas", "timeout", "stream_idle_timeout", "request_buffer",
                "request_min_rate", "underscores_in_headers", "health_check", "lifecycle", "cpus", "memory"]
services = st.dictionaries(
    st.sampled_from(["web", "api", "Bad_Name", ""]),
    st.dictionaries(st.sampled_from(SERVICE_KEYS), toml_values, max_size=5).map(
        lambda table: {"command": "app", **table}), max_size=3)
routes = st.lists(st.dictionaries(st.sampled_from(["from", "to", "paths", "methods", "timeout", "retries",
                                                   "mode", "max_pending", "stream_idle_timeout", "nope"]),
                                  toml_values, max_size=5), max_size=3)
meshes = st.fixed_dictionaries({"services": services, "routes": routes},
                               optional={"mesh": st.dictionaries(st.sampled_from(["name", "mode", "defaults",
                                                                                  "plugin_path", "nope"]),
                                                                 toml_values, max_size=3)})


@settings(max_examples=150)
@given(meshes)
def test_the_config_loader_accepts_or_names_every_problem(data):
    """Any TOML-shaped input gives a config or a ConfigError whose problems each name a key path."""
    try:
        config = parse(data, Path("/nonexistent/mesh.toml"))
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert isinstance(problem, str) and problem.strip(), exc.problems
            assert problem.split(":", 1)[0].split(".")[0].split("[")[0] in {
                "mesh", "services", "routes", "/nonexistent/mesh"} or problem.startswith(("mesh", "services",
                                                                                         "routes")), problem
    else:
        assert set(config.services) == set(data["services"])
