"""The ``ratelimit`` plugin's ``batch``: hits claimed from a shared budget and spent locally.

Several sidecars (`Claims`) share one exact budget here, a moving window
kept in a plain list, claimed from as the plugin claims from Redis. Time
is a number moved by hand. What ratelimit_claims.py promises, with S
sidecars and ``batch = N``: at most S × (N - 1) requests over the limit in
any window, a quiet budget counted hit by hit, and one claim at a time
per budget however many requests wait for it.
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_plugins.ratelimit_claims import FAST, Claims

PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
TICK = 1 / 64


class Budget:
    """An exact moving window per key, claimed from like the plugin claims from Redis."""

    def __init__(self, amount: int, seconds: int) -> None:
        self.amount = amount
        self.seconds = seconds
        self.hits: dict[str, list[float]] = {}
        self.takes: list[int] = []
        self.now = 0.0

    def taker(self, key: str):
        async def take(which: int, size: int) -> tuple[int, int, float]:
            assert which == 0
            self.takes.append(size)
            hits = self.hits.setdefault(key, [])
            hits[:] = [t for t in hits if t >= self.now - self.seconds]
            granted = size if len(hits) + size <= self.amount else int(len(hits) < self.amount)
            hits.extend([self.now] * granted)
            reset = (hits[0] if hits else self.now) + self.seconds
            return granted, self.amount - len(hits), reset
        return take


def spend(claims: Claims, budget: Budget, key: str, now: float) -> tuple[int, int, float, bool]:
    budget.now = now
    return asyncio.run(claims.spend(key, now, budget.taker(key)))


@PROPERTY
@given(amount=st.integers(1, 12), batch=st.integers(1, 6), sidecars=st.integers(1, 3),
       run=st.lists(st.tuples(st.integers(0, 3 * 64 * 2), st.integers(0, 2), st.sampled_from("ab")),
                    min_size=1, max_size=80))
def test_no_window_lets_through_more_than_the_limit_and_what_claims_may_hold(
        amount, batch, sidecars, run):
    window = 2
    budget = Budget(amount, window)
    fleet = [Claims([window], batch) for _ in range(sidecars)]
    allowed: dict[str, list[float]] = {"a": [], "b": []}
    now = 1000.0
    for gap, sidecar, key in run:
        now += gap * TICK
        if spend(fleet[sidecar % sidecars], budget, key, now)[3]:
            allowed[key].append(now)
    bound = amount + sidecars * (batch - 1)
    for at in allowed.values():
        for end in at:
            assert sum(end - window <= t <= end for t in at) <= bound


@PROPERTY
@given(amount=st.integers(1, 30), batch=st.integers(1, 8), requests=st.integers(1, 60))
def test_one_sidecar_within_one_window_lets_exactly_the_limit_through(amount, batch, requests):
    budget = Budget(amount, 3600)
    claims = Claims([3600], batch)
    statuses = [spend(claims, budget, "k", 1000.0)[3] for _ in range(requests)]
    assert statuses == [True] * min(amount, requests) + [False] * max(0, requests - amount)


def test_claims_grow_while_spent_quickly_and_a_quiet_budget_is_counted_hit_by_hit():
    budget = Budget(10_000, 3600)
    claims = Claims([3600], 8)
    for _ in range(40):
        spend(claims, budget, "busy", 1000.0)
    assert budget.takes[:5] == [1, 2, 4, 8, 8]
    budget.takes.clear()
    now = 1000.0
    for _ in range(5):
        now += 2 * FAST
        spend(claims, budget, "quiet", now)
    assert budget.takes == [1] * 5


def test_the_headers_count_down_through_a_claim():
    budget = Budget(100, 3600)
    claims = Claims([3600], 4)
    remaining = [spend(claims, budget, "k", 1000.0)[1] for _ in range(7)]
    assert remaining == [99, 98, 97, 96, 95, 94, 93]


async def test_requests_waiting_for_a_claim_share_it_instead_of_claiming_beside_it():
    budget = Budget(1000, 3600)
    claims = Claims([3600], 8)
    gate = asyncio.Event()
    taker = budget.taker("k")

    async def slow(which: int, size: int) -> tuple[int, int, float]:
        await gate.wait()
        return await taker(which, size)

    for _ in range(3):  # claims of 1 and 2: the next one is 4 hits
        await claims.spend("k", 1000.0, taker)
    budget.takes.clear()
    waiting = [asyncio.ensure_future(claims.spend("k", 1000.0, slow)) for _ in range(4)]
    await asyncio.sleep(0)
    gate.set()
    results = await asyncio.gather(*waiting)
    assert all(allowed for *_, allowed in results)
    assert budget.takes == [4]


async def test_a_refused_claim_refuses_with_the_storage_s_budget_and_the_later_rates_are_untouched():
    calls: list[tuple[int, int]] = []

    async def take(which: int, size: int) -> tuple[int, int, float]:
        calls.append((which, size))
        return (0, 0, 1030.0) if which == 0 else (size, 50, 2000.0)

    which, remaining, reset, allowed = await Claims([1, 60], 4).spend("k", 1000.0, take)
    assert (which, remaining, reset, allowed) == (0, 0, 1030.0, False)
    assert calls == [(0, 1)]


def test_hits_claimed_before_the_window_moved_on_are_what_can_go_over_the_limit():
    budget = Budget(3, 2)
    claims = Claims([2], 2)
    spent = [1000.0, 1000.0, 1001.99, 1002.01, 1002.01, 1002.01]
    assert all(spend(claims, budget, "k", now)[3] for now in spent)
    # The third hit was claimed at 1000 and spent at 1001.99: 4 in the window
    # ending at 1002.01, one more than the limit, as much as one claim of 2 holds back.
    assert sum(1000.01 <= t <= 1002.01 for t in spent) == 3 + 1 * (2 - 1)
