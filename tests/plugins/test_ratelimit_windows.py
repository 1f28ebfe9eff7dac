"""The ``ratelimit`` plugin's in-memory budgets, held against the ``limits`` library.

`mesh_plugins.ratelimit_windows` counts as ``limits``' in-memory storage
and strategies do, without their per-request work. Every hit of a random
run must get the verdict ``limits`` gives and the same budget as the plugin
reports it (``RateLimit-Remaining``, ``RateLimit-Reset``), and the exact
strategies must never let more than the limit through in any window.

Times are multiples of 1/64 s, so the window arithmetic is exact in both;
``limits`` reads ``time.time()``, which each run stops and moves by hand.
"""

from __future__ import annotations

import asyncio
import math
import time
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)

from mesh_plugins.ratelimit_windows import STRATEGIES, Windows

# No deadline and no timing health check: the outcome must not depend on how
# fast the machine is. No example database: nothing is written to the tree.
PROPERTY = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

LIMITERS = {
    "sliding-window": SlidingWindowCounterRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}
T0 = 1_800_000_000.0 - 1_800_000_000.0 % 86400  # a whole number of days since the epoch
TICK = 1 / 64

# (seconds since the previous hit, in ticks; key). Gaps from none at all to
# three windows of the longest rate, so that bursts, window edges and
# budgets left to expire all come up, and whole seconds, so that a hit
# lands exactly one window after another.
gaps = st.one_of(st.integers(0, 3 * 64 * 4), st.sampled_from([64, 128, 256]))
hits = st.lists(st.tuples(gaps, st.sampled_from("ab")), min_size=1, max_size=60)
amounts = st.integers(1, 6)
seconds = st.sampled_from([1, 2, 4])


def times(run: list[tuple[int, str]]) -> list[tuple[float, str]]:
    now, found = T0 + 10, []
    for gap, key in run:
        now += gap * TICK
        found.append((now, key))
    return found


def header_reset(reset: float, now: float) -> int:
    return max(0, math.ceil(reset - now))


async def with_limits(strategy: str, amount: int, window: int,
                      run: list[tuple[float, str]]) -> list[tuple[bool, int, int]]:
    """What the plugin decided and reported with ``limits``: a hit, then the window's stats."""
    limiter = LIMITERS[strategy](MemoryStorage())
    item = RateLimitItemPerSecond(amount, window)
    clock = mock.Mock()
    found = []
    with mock.patch.object(time, "time", clock):
        for now, key in run:
            clock.return_value = now
            allowed = await limiter.hit(item, key)
            stats = await limiter.get_window_stats(item, key)
            found.append((allowed, max(0, stats.remaining), header_reset(stats.reset_time, now)))
    return found


def with_windows(strategy: str, amount: int, window: int,
                 run: list[tuple[float, str]]) -> list[tuple[bool, int, int]]:
    windows = Windows(strategy, [(amount, window)])
    found = []
    for now, key in run:
        which, remaining, reset, allowed = windows.hit(key, now)
        assert which == 0
        found.append((allowed, remaining, header_reset(reset, now)))
    return found


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@PROPERTY
@given(amount=amounts, window=seconds, run=hits)
def test_each_hit_is_decided_and_reported_as_limits_does(strategy, amount, window, run):
    run_times = times(run)
    expected = asyncio.run(with_limits(strategy, amount, window, run_times))
    assert with_windows(strategy, amount, window, run_times) == expected


@PROPERTY
@given(amount=amounts, window=seconds, run=hits)
def test_the_moving_window_never_allows_more_than_the_limit_in_any_window(amount, window, run):
    windows = Windows("moving-window", [(amount, window)])
    allowed: dict[str, list[float]] = {"a": [], "b": []}
    for now, key in times(run):
        if windows.hit(key, now)[3]:
            allowed[key].append(now)
    for at in allowed.values():
        # Every window of `window` seconds that ends at an allowed hit, both ends included.
        for end in at:
            assert sum(end - window <= t <= end for t in at) <= amount


@PROPERTY
@given(amount=amounts, window=seconds, run=hits)
def test_the_sliding_window_never_allows_more_than_the_limit_in_one_of_its_windows(amount, window, run):
    windows = Windows("sliding-window", [(amount, window)])
    allowed: dict[tuple[str, int], int] = {}
    for now, key in times(run):
        if windows.hit(key, now)[3]:
            index = (key, int(now // window))
            allowed[index] = allowed.get(index, 0) + 1
    assert all(count <= amount for count in allowed.values())


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_the_first_rate_to_refuse_decides_and_the_later_ones_are_not_used_up(strategy):
    windows = Windows(strategy, [(2, 1), (3, 60)])
    now = T0 + 10
    assert [windows.hit("k", now)[3] for _ in range(3)] == [True, True, False]
    assert windows.hit("k", now)[:2] == (0, 0)   # the per-second rate refused, nothing left
    now += 2.5  # the per-second budget is whole again, whatever the strategy
    which, remaining, _, allowed = windows.hit("k", now)
    assert allowed and (which, remaining) == (1, 0)  # 3 of 3 per minute used: it binds now
    which, _, _, allowed = windows.hit("k", now)
    assert not allowed and which == 1


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_budgets_left_alone_for_a_whole_window_are_dropped(strategy):
    windows = Windows(strategy, [(5, 1), (100, 4)])
    now = T0 + 10
    for key in ("a", "b", "c"):
        windows.hit(key, now)
    now += 2 * 4
    windows.hit("d", now)
    kept = [set(w.budgets.current) | set(w.budgets.previous) for w in windows.windows]
    assert kept == [{"d"}, {"d"}]
