"""Budgets kept in the sidecar's own memory: the ``ratelimit`` plugin's ``storage = "memory"``.

The three strategies of the ``limits`` library (`FixedWindow`, `SlidingWindow`,
`MovingWindow`), with the arithmetic of ``limits``' in-memory storage and
strategies, so that decisions and the RateLimit headers are the ones
``limits`` gives (tests/plugins/test_ratelimit_windows.py holds each against
it). What is left out is per-request work a sidecar doesn't need: a hit is
one synchronous call that returns the verdict and the window after it, so
there is no lock (one event loop, nothing awaited between reading a count
and writing it), no second lookup for the headers, no storage key built as
a string, and no clean-up pass over every budget: budgets are filed by the
window of ``seconds`` since the epoch they were last touched in, and only
the two newest windows are kept (`Generations`), so a budget left alone
for a whole window is dropped with its window, at no cost per budget.

A budget's key is any hashable value; ``now`` is wall time in seconds
(``time.time()``), as ``limits`` reads it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from math import floor, inf
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["FixedWindow", "Generations", "Hit", "MovingWindow", "SlidingWindow", "Window", "Windows"]

# (allowed, remaining, reset): the verdict, then the budget as it stands
# after the hit: what is left of it and when (wall time) it is next reset.
Hit = tuple[bool, int, float]

_B = TypeVar("_B")


class Window(Protocol):
    """One rate's budgets, one per key."""

    amount: int
    seconds: int

    def hit(self, key: Hashable, now: float) -> Hit: ...


class Generations(Generic[_B]):
    """Budgets of the current window of ``seconds`` (``current``) and of the one before.

    Moving on by one window makes ``current`` the one before; by more, both
    start empty. A clock that steps back keeps counting in the newest.
    """

    def __init__(self) -> None:
        self.index = -1
        self.current: dict[Hashable, _B] = {}
        self.previous: dict[Hashable, _B] = {}

    def move_to(self, index: int) -> None:
        if index > self.index:
            self.previous = self.current if index == self.index + 1 else {}
            self.current = {}
            self.index = index


class FixedWindow:
    """A window that opens with a budget's first hit and lasts ``seconds``.

    Refused hits count too (``limits`` counts them), so ``remaining`` stays 0
    until the window closes. A budget is filed under the window its own
    opened in, and is closed before that one is dropped.
    """

    def __init__(self, amount: int, seconds: int) -> None:
        self.amount = amount
        self.seconds = seconds
        self.budgets: Generations[list[Any]] = Generations()   # key -> [count, closes at]

    def hit(self, key: Hashable, now: float) -> Hit:
        budgets = self.budgets
        index = int(now / self.seconds)
        if index != budgets.index:
            budgets.move_to(index)
        budget = budgets.current.get(key)
        if budget is None:
            budget = budgets.previous.get(key)
        if budget is None or budget[1] <= now:
            budget = budgets.current[key] = [0, now + self.seconds]
        budget[0] += 1
        count = budget[0]
        return count <= self.amount, max(0, self.amount - count), budget[1]


class SlidingWindow:
    """Counts per window of ``seconds`` since the epoch; the previous window weighs in
    for the part of it that the last ``seconds`` still cover."""

    def __init__(self, amount: int, seconds: int) -> None:
        self.amount = amount
        self.seconds = seconds
        self.budgets: Generations[int] = Generations()   # key -> hits in the window

    def hit(self, key: Hashable, now: float) -> Hit:
        expiry, amount, budgets = self.seconds, self.amount, self.budgets
        index = int(now / expiry)
        if index != budgets.index:
            budgets.move_to(index)
        current = budgets.current.get(key, 0)
        previous = budgets.previous.get(key, 0)
        if previous:
            previous_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry
            weight = previous * previous_ttl / expiry
            allowed = floor(weight + current) < amount
            reset = previous_ttl % (expiry / previous)
        else:
            weight = 0.0
            allowed = current < amount
            reset = inf
        if allowed:
            current += 1
            budgets.current[key] = current
        remaining = amount - floor(weight + current)
        if current:
            current_reset = ((1 - ((now / expiry) % 1)) * expiry + expiry) % expiry
            if current_reset < reset:
                reset = current_reset
        elif not previous:
            reset = 0.0
        return allowed, remaining if remaining > 0 else 0, now + reset


class MovingWindow:
    """The time of every hit allowed in the last ``seconds``: exact, one float per hit.

    A budget is filed under the window it was last hit in: once that is two
    windows back, every time in it is more than ``seconds`` old.
    """

    def __init__(self, amount: int, seconds: int) -> None:
        self.amount = amount
        self.seconds = seconds
        self.budgets: Generations[deque[float]] = Generations()   # key -> hit times, oldest first

    def hit(self, key: Hashable, now: float) -> Hit:
        budgets = self.budgets
        index = int(now / self.seconds)
        if index != budgets.index:
            budgets.move_to(index)
        times = budgets.current.get(key)
        if times is None:
            times = budgets.previous.pop(key, None)
            if times is None:
                times = deque()
            budgets.current[key] = times
        start = now - self.seconds
        while times and times[0] < start:
            times.popleft()
        allowed = len(times) < self.amount
        if allowed:
            times.append(now)
        # A hit exactly `seconds` old still takes a place, but no longer counts
        # in the remaining budget (as in limits).
        skip = 0
        while skip < len(times) and times[skip] == start:
            skip += 1
        inside = len(times) - skip
        oldest = times[skip] if inside else (times[0] if times else start)
        return allowed, self.amount - inside, oldest + self.seconds


STRATEGIES: dict[str, type[FixedWindow] | type[SlidingWindow] | type[MovingWindow]] = {
    "sliding-window": SlidingWindow,
    "moving-window": MovingWindow,
    "fixed-window": FixedWindow,
}


class Windows:
    """Several rates that must all hold, shortest window first."""

    def __init__(self, strategy: str, rates: list[tuple[int, int]]) -> None:
        kind = STRATEGIES[strategy]
        self.windows: list[Window] = [kind(amount, seconds) for amount, seconds in rates]
        self._only = self.windows[0] if len(self.windows) == 1 else None

    def hit(self, key: Hashable, now: float) -> tuple[int, int, float, bool]:
        """``(which, remaining, reset, allowed)``: the first rate that refused the hit,
        else the one with the least budget left (the first of equals).

        A refused hit stops there: it doesn't use up the rates after it.
        """
        if self._only is not None:
            allowed, remaining, reset = self._only.hit(key, now)
            return 0, remaining, reset, allowed
        binding, least, reset_at = 0, -1, now
        for which, window in enumerate(self.windows):
            allowed, remaining, reset = window.hit(key, now)
            if not allowed:
                return which, remaining, reset, False
            if least < 0 or remaining < least:
                binding, least, reset_at = which, remaining, reset
        return binding, least, reset_at, True
