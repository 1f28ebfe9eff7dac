"""`mesh.keys`: the typed keys of ``request.state``."""

from __future__ import annotations

import mesh
from mesh import CLAIMS, UPSTREAM, StateKey, keys
from mesh.testing import make_request


def test_a_key_is_the_string_it_names():
    request = make_request(state={"upstream": "orders", "claims": {"sub": "alice"}})
    assert request.state[UPSTREAM] == "orders" and request.state[CLAIMS] == {"sub": "alice"}
    request.state[UPSTREAM] = "billing"
    assert request.state["upstream"] == "billing" and len(request.state) == 2
    assert type(UPSTREAM) is str and type(StateKey("mine")) is str  # plain strings at run time
    assert StateKey[int]  # typed for the checker: MINE: StateKey[int] = StateKey("mine")


def test_every_key_is_exported_and_distinct_and_mesh_private_ones_say_so():
    found = {name: getattr(keys, name) for name in keys.__all__ if isinstance(getattr(keys, name), str)}
    assert set(found) <= set(mesh.__all__)
    assert len(set(found.values())) == len(found)
    # The entries plugins have always read and written keep their names; the rest are mesh's own.
    assert {k for k in found.values() if not k.startswith("mesh.")} == {"upstream", "claims", "deadline"}
