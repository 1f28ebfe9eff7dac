"""`mesh.sidecar.balancer`: power of two choices, round-robin, outlier ejection; and P2C through real sidecars."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import aiohttp
import pytest

from mesh.config import Outlier
from mesh.sidecar.balancer import Balancer
from mesh.sidecar.registry import Registry

from ..harness import App, cluster, routed_toml, serve


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def balancer(count: int = 3, policy: str = "p2c", clock: Clock | None = None, **outlier: Any) -> Balancer:
    registry = Registry({"api": [f"10.0.0.{i}:80" for i in range(1, count + 1)]})
    return Balancer(registry, policy, Outlier(**outlier), clock=clock or Clock(), rng=random.Random(7))


def fail(b: Balancer, backend: Any, times: int) -> None:
    for _ in range(times):
        b.failed(backend)


# picking


def test_p2c_never_picks_the_busiest_of_three_and_splits_the_rest():
    b = balancer()
    busy, *others = b.backends("api")
    busy.outstanding = 10
    picks = Counter(b.pick("api").address for _ in range(3000))
    assert busy.address not in picks  # every pair it is in, the other one has fewer in flight
    assert all(900 < picks[o.address] < 2100 for o in others), picks


def test_p2c_follows_load_as_it_changes():
    b = balancer(2)
    first, second = b.backends("api")
    first.outstanding, second.outstanding = 3, 1
    assert {b.pick("api") for _ in range(50)} == {second}
    second.outstanding = 5
    assert {b.pick("api") for _ in range(50)} == {first}


def test_round_robin_takes_each_in_turn():
    b = balancer(3, "round-robin")
    order = [b.pick("api").address for _ in range(6)]
    assert order[:3] != order[:1] * 3 and order[:3] == order[3:]
    assert sorted(order[:3]) == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]


def test_unknown_lb_policy_is_refused():
    with pytest.raises(ValueError, match="round-robin"):
        Balancer(Registry(), "random")


def test_avoid_leaves_out_instances_already_tried_unless_nothing_else_is_left():
    b = balancer(3)
    one, two, three = b.backends("api")
    assert {b.pick("api", avoid=[one, two]) for _ in range(30)} == {three}
    assert b.pick("api", avoid=[one, two, three]) is not None


def test_no_instance_is_none():
    b = balancer(0)
    assert b.pick("api") is None
    assert b.pick("nope") is None


def test_registry_changes_are_picked_up_and_keep_what_is_known():
    registry = Registry({"api": ["10.0.0.1:80", "10.0.0.2:80"]})
    b = Balancer(registry)
    first, second = b.backends("api")
    first.outstanding = 4
    fail(b, second, 2)
    registry.update({"api": [{"address": "10.0.0.2:80"}, "10.0.0.3:80"]})
    kept, added = b.backends("api")
    assert kept is second and kept.failures == 2
    assert added.address == "10.0.0.3:80" and added.outstanding == 0
    assert {b.pick("api").address for _ in range(40)} == {"10.0.0.2:80", "10.0.0.3:80"}


def test_registry_refuses_bad_entries_and_keeps_the_old_ones():
    registry = Registry({"api": ["10.0.0.1:80"]})
    for bad in ({"api": ["nohost"]}, {"api": "10.0.0.1:80"}, {"api": [3]}, ["api"]):
        with pytest.raises((ValueError, TypeError)):
            registry.update(bad)  # type: ignore[arg-type]
    assert registry.as_dict() == {"api": ["10.0.0.1:80"]}


# outlier detection


def test_consecutive_failures_eject_for_a_growing_interval_then_probation():
    clock = Clock()
    b = balancer(3, clock=clock, consecutive_failures=3, base_ejection=2, max_ejection=5)
    bad = b.backends("api")[0]
    fail(b, bad, 2)
    b.succeeded(bad)  # a success in between starts the count over
    fail(b, bad, 2)
    assert not bad.ejected_until
    fail(b, bad, 1)
    assert bad.ejected_until == clock.now + 2
    assert bad not in {b.pick("api") for _ in range(60)}

    clock.now += 2.01
    assert bad in {b.pick("api") for _ in range(60)}  # back after its interval...
    b.failed(bad)  # ...on probation: one more failure ejects it again, for twice as long
    assert bad.ejected_until == pytest.approx(clock.now + 4)
    clock.now += 4.01
    b.pick("api")
    b.failed(bad)
    assert bad.ejected_until == pytest.approx(clock.now + 5)  # capped at max_ejection
    snapshot = {s["address"]: s for s in b.snapshot()["api"]}
    assert snapshot[bad.address]["ejected"] and snapshot[bad.address]["ejections"] == 3


def test_the_ejection_count_is_forgotten_after_staying_healthy():
    clock = Clock()
    b = balancer(2, clock=clock, consecutive_failures=1, base_ejection=1, max_ejection=3)
    bad = b.backends("api")[0]
    b.failed(bad)
    clock.now += 1.01
    b.pick("api")
    b.succeeded(bad)
    clock.now += 3.5  # a long healthy spell
    b.failed(bad)
    assert bad.ejections == 1 and bad.ejected_until == pytest.approx(clock.now + 1)


def test_never_more_than_max_ejection_percent_but_one_may_always_go():
    b = balancer(3, consecutive_failures=1, max_ejection_percent=50)
    one, two, three = b.backends("api")
    b.failed(one)
    b.failed(two)
    assert one.ejected_until and not two.ejected_until  # 50% of 3 rounds down to 1
    b = balancer(3, consecutive_failures=1, max_ejection_percent=10)
    b.failed(b.backends("api")[0])
    assert b.backends("api")[0].ejected_until  # 10% of 3 is 0, but one may go


def test_the_only_instance_is_never_ejected():
    b = balancer(1, consecutive_failures=1)
    only = b.backends("api")[0]
    fail(b, only, 5)
    assert not only.ejected_until and b.pick("api") is only


def test_outlier_detection_can_be_turned_off():
    b = balancer(3, consecutive_failures=0)
    first = b.backends("api")[0]
    fail(b, first, 50)
    assert not first.ejected_until


# through real sidecars


async def spread(url: str, total: int, concurrency: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    queue = iter(range(total))
    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            for _ in queue:
                async with session.get(url, headers={"Host": "api"}) as response:
                    assert response.status == 200, await response.text()
                    seen[await response.text()] += 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return seen


@pytest.mark.parametrize("lb", ["p2c", "round-robin"])
async def test_a_slow_instance_gets_fewer_requests_with_p2c(aiohttp_server, lb):
    fast, slow, web = await serve(aiohttp_server, App("fast"), App("slow", delay=0.15), App("web"))
    toml = routed_toml("lb", defaults=f'defaults = {{ lb = "{lb}" }}')
    async with cluster(toml, {"web": [web], "api": [fast, slow]}) as (mesh, _):
        seen = await spread(mesh.url("web", "outbound") + "/", total=160, concurrency=8)
        assert mesh.sidecars["web"].balancer.policy == lb
    if lb == "p2c":
        # The slow one holds its requests longer, so it is the busier of the two most of the time.
        assert seen["slow"] < 0.25 * 160, seen
    else:
        assert seen["slow"] == seen["fast"] == 80, seen


def test_a_lifecycle_chooser_picks_first_and_falls_back_to_the_policy():
    from mesh.sidecar.balancer import Balancer
    from mesh.sidecar.registry import Registry

    def by_header(request, instances):
        wanted = request.headers.get("x-pin") if request is not None else None
        if wanted == "boom":
            raise RuntimeError("chooser bug")
        return next((b for b in instances if b.address == wanted), None)

    registry = Registry({"api": ["127.0.0.1:1001", "127.0.0.1:1002", "127.0.0.1:1003"]})
    balancer = Balancer(registry, choosers={"api": by_header})
    from mesh.testing import make_request

    pinned = make_request(headers={"x-pin": "127.0.0.1:1002"})
    assert {balancer.pick("api", request=pinned).address for _ in range(20)} == {"127.0.0.1:1002"}
    for header in ("127.0.0.1:9999", "boom"):  # not offered, or raising: the policy decides
        assert balancer.pick("api", request=make_request(headers={"x-pin": header})) is not None
