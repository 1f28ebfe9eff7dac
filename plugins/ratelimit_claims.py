"""Hits taken from a shared budget a batch at a time and spent locally: the ``ratelimit`` plugin's ``batch``.

With ``batch = N`` a sidecar doesn't ask Redis about every request. For each
budget (key) and rate it holds at most one `Claim`: hits already counted in
Redis, spent by the requests that follow without a round trip, for at most
the rate's window. When a claim is spent or its window has passed, the next
request claims again; requests arriving meanwhile wait for that claim
instead of claiming beside it.

Claims start at one hit and double (up to N) while a budget's traffic
spends a whole claim within `FAST` seconds, and halve when it doesn't, so a
quiet budget is counted hit by hit. The storage grants what fits the budget
(`Take`), falling back to a single hit near the limit.

What that costs in precision, with S sidecars sharing a budget, for every
strategy:

- a claim's hits are counted when claimed, not when spent, so hits claimed
  before a window moved on and spent after it are not counted in the new
  one: in any window, at most S × (N - 1) requests more than the limit;
- hits a sidecar claimed and has not spent are out of the others' reach,
  and lost if its window passes first: in any window, at most S × (N - 1)
  requests refused that exact counting would let through.

``N = 1`` is not a claim at all; the plugin then counts every request in
Redis as it comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from mesh_plugins.ratelimit_windows import Generations

__all__ = ["FAST", "Claim", "Claims", "Take"]

FAST = 1.0   # seconds: a claim spent whole within them makes the next one twice as big

# take(which, size): ask the storage for up to `size` hits of rate `which`;
# it answers (hits granted, 0 when refused; the budget left after them; when
# the budget is next reset, wall time).
Take = Callable[[int, int], Awaitable[tuple[int, int, float]]]


@dataclass
class Claim:
    """Hits of one budget and rate, counted in the storage, not spent yet."""

    size: int         # hits granted
    left: int         # hits not spent yet
    remaining: int    # the budget the storage said was left after granting them
    reset: float      # when the storage said the budget is next reset (wall time)
    at: float         # when it was granted (wall time)
    until: float      # wall time after which the unspent hits are given up: a window later


class Claims:
    """One sidecar's claims on several rates (their windows in seconds), shortest window first.

    Claims are filed by the window they were made in (`Generations`): by the
    time that is two windows back, every claim in it has run out.
    """

    def __init__(self, windows: list[int], batch: int) -> None:
        self.windows = windows
        self.batch = batch
        self.claims: list[Generations[Claim]] = [Generations() for _ in windows]
        self._claiming: dict[tuple[int, Hashable], asyncio.Event] = {}

    async def spend(self, key: Hashable, now: float, take: Take) -> tuple[int, int, float, bool]:
        """Spend one hit of every rate for budget ``key``: ``(which, remaining, reset, allowed)``,
        like `mesh_plugins.ratelimit_windows.Windows.hit`.

        The first rate the storage refuses decides, and the rates after it
        are not touched. Storage errors propagate from ``take``.
        """
        binding, least, reset_at = 0, -1, now
        for which, window in enumerate(self.windows):
            claims = self.claims[which]
            index = int(now / window)
            if index != claims.index:
                claims.move_to(index)
            claim = claims.current.get(key) or claims.previous.get(key)
            if claim is None or claim.left <= 0 or now >= claim.until:
                claim, remaining, reset = await self._claim(which, key, claim, now, take)
                if claim is None:
                    return which, remaining, reset, False
            claim.left -= 1
            remaining = claim.remaining + claim.left
            if least < 0 or remaining < least:
                binding, least, reset_at = which, remaining, claim.reset
        return binding, least, reset_at, True

    async def _claim(self, which: int, key: Hashable, spent: Claim | None, now: float,
                     take: Take) -> tuple[Claim | None, int, float]:
        """A claim for ``key`` and rate ``which`` with a hit left in it, or None and the
        storage's refusal (remaining, reset). ``spent``: the claim it follows, if any."""
        claims = self.claims[which]
        while (waiting := self._claiming.get((which, key))) is not None:
            await waiting.wait()  # another request is claiming: its claim may serve this one too
            spent = claims.current.get(key) or claims.previous.get(key)
            if spent is not None and spent.left > 0 and now < spent.until:
                return spent, spent.remaining, spent.reset
        size = self._size(spent, now)
        done = self._claiming[(which, key)] = asyncio.Event()
        try:
            granted, remaining, reset = await take(which, size)
        finally:
            del self._claiming[(which, key)]
            done.set()
        claims.previous.pop(key, None)
        if not granted:
            claims.current.pop(key, None)
            return None, remaining, reset
        claim = claims.current[key] = Claim(granted, granted, remaining, reset, now, now + self.windows[which])
        return claim, remaining, reset

    def _size(self, spent: Claim | None, now: float) -> int:
        if spent is None:
            return 1
        if spent.left <= 0 and now - spent.at < FAST:
            return min(self.batch, spent.size * 2)
        return max(1, spent.size // 2)
