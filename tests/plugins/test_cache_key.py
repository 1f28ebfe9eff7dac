"""Property-based tests of the `cache` plugin's key: who shares an entry with whom.

Two requests share a stored entry exactly when every keyed part is equal:
method, host (any case), normalized path, query, the ``Vary``'d headers and,
per the ``key`` option, identity headers, claims and peer. Requests that
differ only in a header nobody keys on share it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh import Response
from mesh.testing import make_request, run_plugin
from mesh_plugins.cache import Cache

# No deadline and no timing health check: the outcome must not depend on how
# fast the machine is. No example database: nothing is written to the tree.
PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

IDENTITY_KEY = ["header:Authorization", "header:Cookie", "claim:sub", "peer"]


@dataclass(frozen=True)
class Spec:
    """One request, part by part."""

    method: str
    host: str
    path: str
    query: str
    authorization: str | None
    cookie: str | None
    sub: object           # the `sub` claim; NO_CLAIMS when no plugin put claims on it
    peer: str | None
    language: str | None  # Accept-Language, which the app's responses Vary on
    tenant: str | None    # X-Tenant: keyed by nobody

    def request(self):
        headers = [("Host", self.host)]
        for name, value in (("Authorization", self.authorization), ("Cookie", self.cookie),
                            ("Accept-Language", self.language), ("X-Tenant", self.tenant)):
            if value is not None:
                headers.append((name, value))
        state = {} if self.sub is NO_CLAIMS else {"claims": {"sub": self.sub}}
        return make_request(self.method, self.path, query=self.query, headers=headers,
                            peer=self.peer, state=state)

    @property
    def anonymous(self) -> bool:
        return self.authorization is None and self.cookie is None and self.sub is NO_CLAIMS

    def url(self) -> tuple:
        return (self.method, self.host.lower(), self.path, self.query, self.language)

    def identity(self) -> tuple:
        # 1 and "1" are different claims: compare with their types.
        sub = self.sub if self.sub is NO_CLAIMS else (type(self.sub).__name__, self.sub)
        return (self.authorization, self.cookie, sub, self.peer)


NO_CLAIMS = object()

specs = st.builds(
    Spec,
    method=st.sampled_from(["GET", "HEAD"]),
    host=st.sampled_from(["web", "WEB", "other"]),
    path=st.sampled_from(["/", "/a", "/A", "/a/", "/a/b", "/a.css", "/a;x.css"]),
    query=st.sampled_from(["", "x=1", "x=2", "X=1", "x=1&y=2"]),
    authorization=st.sampled_from([None, "Bearer a", "Bearer b"]),
    cookie=st.sampled_from([None, "s=a", "s=b", "s=a; t=1"]),
    sub=st.sampled_from([NO_CLAIMS, "a", "b", "1", 1]),
    peer=st.sampled_from([None, "web", "api"]),
    language=st.sampled_from([None, "en", "fr"]),
    tenant=st.sampled_from([None, "t1", "t2"]),
)

FIELDS = [name for name in Spec.__dataclass_fields__]


@st.composite
def pairs(draw):
    """A request and a second one that keeps each part of the first or draws it anew."""
    first, other = draw(specs), draw(specs)
    kept = draw(st.lists(st.sampled_from(FIELDS), unique=True))
    second = replace(other, **{name: getattr(first, name) for name in kept})
    if draw(st.booleans()):
        second = first  # equal requests, often
    return first, second


def second_is_a_hit(plugin: Cache, cache_control: str, first: Spec, second: Spec) -> bool:
    """Store the first request's answer, then ask with the second: was it served from it?"""
    calls = []

    async def app(request):
        calls.append(request)
        return Response(200, f"v{len(calls)}".encode(),
                        [("Cache-Control", cache_control), ("Vary", "Accept-Language")])

    async def scenario():
        response = await run_plugin(plugin, first.request(), upstream=app)
        await response.read()
        response = await run_plugin(plugin, second.request(), upstream=app)
        body = await response.read()
        hit = response.headers["X-Cache"] == "HIT"
        assert hit is (len(calls) == 1)
        if second.method == "GET":  # a hit is the first request's answer, a miss the app's
            assert (body == b"v1") is hit
        return hit

    return asyncio.run(scenario())


@PROPERTY
@given(pairs())
def test_with_identity_in_the_key_requests_share_an_entry_exactly_when_every_keyed_part_is_equal(pair):
    first, second = pair
    plugin = Cache(key=IDENTITY_KEY)
    same = first.url() == second.url() and first.identity() == second.identity()
    assert second_is_a_hit(plugin, "max-age=60", first, second) is same


@PROPERTY
@given(pairs())
def test_without_a_key_only_anonymous_requests_share_a_private_answer(pair):
    first, second = pair
    same = first.url() == second.url() and first.anonymous and second.anonymous
    assert second_is_a_hit(Cache(), "max-age=60", first, second) is same


@PROPERTY
@given(pairs())
def test_a_public_answer_is_shared_by_everyone_asking_for_the_same_url(pair):
    first, second = pair
    assert second_is_a_hit(Cache(), "public, max-age=60", first, second) is (first.url() == second.url())
