"""Built-in outbound layers: deadlines, circuit breaking, retries.

They are ordinary `Plugin`s. A sidecar appends the ones a service's
``outbound`` list does not already hold, after the user's plugins, so a
service's outbound chain is by default::

    user plugins... -> deadline -> breaker -> retry -> terminal
                                                      (route check, balancer pick, mutual TLS)

and ``GET /config`` on the admin listener lists them under ``outbound``
as ``mesh.defaults (deadline)``, ``mesh.defaults (breaker)`` and
``mesh.defaults (retry)``.

Replacing one: list it yourself. ``outbound = [{ use = "retry", attempts = 5 }]``
puts *that* retry layer where it is listed and no default one; a subclass
(``use = "my_retry.py:MyRetry"`` with ``class MyRetry(mesh.sidecar.resilience.Retry)``)
replaces it the same way. Options given to a listed layer win over the
route's keys, which win over ``[mesh.defaults]`` (see `mesh.config`); the
options it leaves out still come from them. To turn retries off, set
``retries = { attempts = 1 }`` on a route or in ``[mesh.defaults]``.

One request may carry its own settings, which win over all of those: a
timeout in ``request.state[TIMEOUT]`` (read by `Deadline`, in place of
the route's) and a `Retries` table in ``request.state[RETRIES]`` (read by
`Retry`, over the route's). That is how the ``router`` plugin's
``timeout`` and ``retries`` reach the calls it sends to other services.

The layers talk to the terminal through ``request.state``, under the typed
keys of `mesh.keys`, so a try costs no task and no ``asyncio.wait_for``:
the timeouts are handed to the connection pool, which already waits for
the response head under one.

- ``request.state[DEADLINE]``: when the whole call must have its response
  head, in `time.monotonic` seconds. Set by `Deadline` from the route's
  ``timeout`` and from an incoming ``x-mesh-deadline-ms`` header (the
  earlier wins); the receiving sidecar's `mesh.sidecar.inbound.CallerDeadline`
  sets it from that header too.
- ``request.state[TRY_TIMEOUT]``, ``[BACKEND]``, ``[AVOID]``: the bound of
  one try (`Retry` to the terminal), the instance the try went to (the
  terminal to `Retry`) and the instances earlier tries went to (`Retry`
  to the balancer, which picks another one if it can).
- ``x-mesh-deadline-ms``: the header that carries a deadline to the next
  hop, as the *milliseconds left* (relative: no clocks to agree on). The
  terminal sets it on every try to what that try will wait; the receiving
  sidecar bounds its call to its app by it and passes the header on, with
  what is left, to the app. An app that copies it onto the calls it makes
  has them bounded by it in turn (its sidecar reads it on the way out).

Timeouts bound the wait for the response *head* once the request has
been sent: an upload is bounded by the stream idle timeout between chunks
(``stream_idle_timeout``), not by the deadline, and so is a response that
has started to stream.

A timeout fires once, at its value: every try is bounded by what is left
of the one deadline, the pool never sends a request again after a timeout
(nor a non-idempotent one at all), and a retry here starts only while
time is left.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

from mesh.chain import short_error
from mesh.config import RETRIES_DEFAULT, Defaults, MeshConfig, Retries
from mesh.errors import UpstreamError
from mesh.http.client import IDEMPOTENT, ConnectFailed, UpstreamTimeout
from mesh.keys import AVOID, BACKEND, DEADLINE, RETRIES, TIMEOUT, TRY_TIMEOUT, UPSTREAM, StateKey
from mesh.messages import Request, Response
from mesh.options import Duration
from mesh.plugin import CallNext, Context, Plugin
from mesh.sidecar.routes import Rule

__all__ = ["AVOID", "BACKEND", "BUILTIN", "CircuitBreaker", "DEADLINE", "DEADLINE_HEADER", "Deadline",
           "OUTBOUND", "Outbound", "Retry", "RetryBudget", "RouteSettings", "TRY_TIMEOUT", "deadline_from",
           "with_defaults"]

log = logging.getLogger("mesh.resilience")

DEADLINE_HEADER = "x-mesh-deadline-ms"

BUFFER_LIMIT = 64 * 1024  # a request body up to this size (with a Content-Length) is kept to replay


class RouteSettings:
    """What the resilience layers do for one route (or the default of one target)."""

    __slots__ = ("target", "timeout", "retries", "max_pending")

    def __init__(self, target: str, timeout: float | None, retries: Retries, max_pending: int) -> None:
        self.target = target
        self.timeout = timeout or None  # 0: no deadline
        self.retries = retries
        self.max_pending = max_pending

    def __repr__(self) -> str:
        return f"<RouteSettings {self.target} timeout={self.timeout} max_pending={self.max_pending}>"


class Outbound:
    """One service's outbound settings, by target and route, resolved once from mesh.toml.

    Precedence, per key: the route, then (for ``timeout``) the target
    service's own ``timeout``, then ``[mesh.defaults]``, then the built-in default.
    """

    def __init__(self, config: MeshConfig | None = None, source: str = "") -> None:
        defaults = config.defaults if config is not None else Defaults()
        retries = defaults.retries.over(RETRIES_DEFAULT)
        self.default = RouteSettings("", defaults.timeout, retries, defaults.max_pending)
        self._targets: dict[str, tuple[list[tuple[Rule, RouteSettings]], RouteSettings]] = {}
        if config is None:
            return
        for target, service in config.services.items():
            timeout = service.timeout if service.timeout is not None else defaults.timeout
            fallback = RouteSettings(target, timeout, retries, defaults.max_pending)
            rules = []
            for route in config.routes:
                if route.source == source and route.to == target:
                    rules.append((Rule(route), RouteSettings(
                        target,
                        route.timeout if route.timeout is not None else timeout,
                        route.retries.over(retries) if route.retries is not None else retries,
                        route.max_pending if route.max_pending is not None else defaults.max_pending)))
            self._targets[target] = (rules, fallback)

    def lookup(self, target: str, method: str, path: str) -> RouteSettings:
        entry = self._targets.get(target)
        if entry is None:
            return self.default
        rules, fallback = entry
        for rule, settings in rules:
            if rule.matches(method, path):
                return settings
        return fallback


OUTBOUND: StateKey[Outbound] = StateKey("mesh.outbound")  # Context.state: this sidecar's `Outbound`
# request.state: the route a request takes, worked out by the first layer that needs it, with what it
# was worked out from (target, path, method).
_ROUTE: StateKey[tuple[str, str, str, RouteSettings]] = StateKey("mesh.route_settings")
_NO_CONFIG = Outbound()


class _Layer(Plugin):
    """What the built-in layers share: this sidecar's `Outbound`, found at start."""

    _outbound: Outbound = _NO_CONFIG

    async def start(self, ctx: Context) -> None:
        self._outbound = ctx.state.get(OUTBOUND, _NO_CONFIG)

    def settings(self, request: Request) -> RouteSettings:
        """The settings of the route this request takes (worked out once per request)."""
        state = request.state
        target = state.get(UPSTREAM) or ""
        cached = state.get(_ROUTE)
        # The same objects unless a plugin between two layers rewrote the request: then look again.
        if (cached is not None and cached[0] is target and cached[1] is request.path
                and cached[2] is request.method):
            return cached[3]
        settings = self._outbound.lookup(target, request.method, request.path)
        state[_ROUTE] = (target, request.path, request.method, settings)
        return settings


def deadline_from(value: str | None, now: float) -> float | None:
    """The monotonic deadline an ``x-mesh-deadline-ms`` value means, or None if it means none."""
    if not value:
        return None
    value = value.strip()
    if not value.isdigit() or len(value) > 12:
        return None
    return now + int(value) / 1000


class Deadline(_Layer):
    """Set the call's deadline: the route's ``timeout`` and the caller's ``x-mesh-deadline-ms``, the earlier.

    ``timeout`` (this layer's option) replaces the route's, and the
    request's own ``request.state[TIMEOUT]`` replaces both; ``"0s"`` (0)
    means none. A call whose deadline has already passed gets 504 at once.
    """

    def __init__(self, timeout: Duration | None = None) -> None:
        self.timeout = timeout

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        state = request.state
        timeout = state.get(TIMEOUT)
        if timeout is None:
            timeout = self.timeout if self.timeout is not None else self.settings(request).timeout
        now = time.monotonic()
        deadline = state.get(DEADLINE)
        incoming = deadline_from(request.headers.popone(DEADLINE_HEADER, None), now)
        if incoming is not None and (deadline is None or incoming < deadline):
            deadline = incoming
        if timeout and (deadline is None or now + timeout < deadline):
            deadline = now + timeout
        if deadline is not None:
            if deadline <= now:
                return short_error(504, "the caller's deadline has passed", request.id)
            state[DEADLINE] = deadline
        return await call_next(request)


class CircuitBreaker(_Layer):
    """Fail fast when a target has too many requests in flight from this sidecar.

    Over ``max_pending`` (this layer's option, else the route's, else
    ``[mesh.defaults]``) a request gets 503 with ``Retry-After`` at once,
    without being sent. A request counts until its response head arrives;
    with HTTP/1.1 each one holds a connection, so this caps the
    connections in use to the target too.
    """

    def __init__(self, max_pending: int | None = None, retry_after: Duration = Duration(1)) -> None:
        if max_pending is not None and max_pending < 1:
            raise ValueError(f"max_pending: expected at least 1, found {max_pending}")
        self.max_pending = max_pending
        self.retry_after = retry_after
        self.pending: dict[str, int] = {}
        self.rejected = 0

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        settings = self.settings(request)
        target = settings.target
        limit = self.max_pending or settings.max_pending
        pending = self.pending.get(target, 0)
        if pending >= limit:
            self.rejected += 1
            response = short_error(503, f"'{target}' has {limit} requests in flight from "
                                        f"'{request.service}' already (max_pending)", request.id)
            response.headers["Retry-After"] = str(max(1, round(self.retry_after)))
            return response
        self.pending[target] = pending + 1
        try:
            return await call_next(request)
        finally:
            self.pending[target] -= 1


class RetryBudget:
    """How many retries a target may still take: at most ``ratio`` of its requests, plus a floor.

    Counted over a sliding ``window`` of seconds: retries may reach
    ``ratio * requests + min_per_second * window`` in it. So a failing
    target gets at most 20% more load (``ratio = 0.2``) from retries, not
    three times as much, while a quiet one can still retry a few.
    """

    __slots__ = ("window", "_requests", "_retries", "_second", "_clock")

    def __init__(self, window: int = 10, clock: Any = time.monotonic) -> None:
        self.window = window
        self._requests = [0] * window
        self._retries = [0] * window
        self._clock = clock
        self._second = int(clock())

    def _advance(self, second: int) -> None:
        for step in range(1, min(second - self._second, self.window) + 1):
            slot = (self._second + step) % self.window
            self._requests[slot] = 0
            self._retries[slot] = 0
        self._second = second

    def request(self) -> None:
        second = int(self._clock())
        if second != self._second:
            self._advance(second)
        self._requests[second % self.window] += 1

    def allows(self, ratio: float, min_per_second: float) -> bool:
        second = int(self._clock())
        if second != self._second:
            self._advance(second)
        return sum(self._retries) < ratio * sum(self._requests) + min_per_second * self.window

    def retried(self) -> None:
        self._retries[self._second % self.window] += 1


class _Policy:
    """A `Retries` table made ready to use."""

    __slots__ = ("attempts", "per_try_timeout", "statuses", "connect", "reset", "timeout",
                 "idempotent_only", "backoff", "max_backoff", "budget", "min_per_second")

    def __init__(self, retries: Retries) -> None:
        full = retries.over(RETRIES_DEFAULT)
        on = {str(c) for c in full.on or ()}
        self.attempts = full.attempts or 1
        self.per_try_timeout = full.per_try_timeout or None
        statuses = {int(c) for c in on if c.isdigit()}
        if "5xx" in on:
            statuses.update(range(500, 600))
        self.statuses = frozenset(statuses)
        self.connect = "connect-failure" in on
        self.reset = "reset" in on
        self.timeout = "timeout" in on or 504 in statuses  # a try that timed out is answered 504
        self.idempotent_only = bool(full.idempotent_only)
        self.backoff = float(full.backoff or 0)
        self.max_backoff = float(full.max_backoff or 0)
        self.budget = float(full.budget or 0)
        self.min_per_second = float(full.min_per_second or 0)


class Retry(_Layer):
    """Try a call again, on another instance, when it failed in a way worth retrying.

    Retried: what ``on`` lists (``connect-failure``, ``reset``, ``timeout``,
    ``5xx`` or statuses), for ``attempts`` tries in all, each bounded by
    ``per_try_timeout`` and all by the call's deadline, with a full-jitter
    backoff (random, up to ``backoff`` doubled per retry, at most
    ``max_backoff``) and while the target's `RetryBudget` allows. A
    request is replayed only if its body is known: bytes, or a stream with
    a ``Content-Length`` up to 64 KiB (read first, then). With
    ``idempotent_only`` only GET, HEAD, OPTIONS, TRACE, PUT and DELETE are
    replayed; a connect failure is retried for any method and any body,
    since nothing was sent. A replayable request's response with a
    ``Content-Length`` up to 64 KiB is read whole before it is passed on
    (it almost always came with its head anyway), so one that breaks off
    mid-body counts as a ``reset`` and is tried again instead of reaching
    the app cut short. Each option left None comes from the route; a
    `Retries` table in ``request.state[RETRIES]`` goes over both, for that
    request only (its keys left None come from this layer and the route).
    """

    def __init__(self, attempts: int | None = None, per_try_timeout: Duration | None = None,
                 on: list[str | int] | None = None, idempotent_only: bool | None = None,
                 backoff: Duration | None = None, max_backoff: Duration | None = None,
                 budget: float | None = None, min_per_second: float | None = None) -> None:
        # Checked now, as mesh.toml's own retries tables are.
        self.overrides = Retries(attempts=attempts, per_try_timeout=per_try_timeout, on=on,
                                 idempotent_only=idempotent_only, backoff=backoff,
                                 max_backoff=max_backoff, budget=budget, min_per_second=min_per_second)
        self._policies: dict[int, tuple[RouteSettings, _Policy]] = {}
        self._request_policies: dict[tuple[int, int], tuple[RouteSettings, Retries, _Policy]] = {}
        self.budgets: dict[str, RetryBudget] = {}
        self.retries = 0  # retries made
        self.refused = 0  # retries the budget refused
        self._random = random.random

    def policy(self, settings: RouteSettings) -> _Policy:
        cached = self._policies.get(id(settings))
        if cached is None or cached[0] is not settings:
            cached = (settings, _Policy(self.overrides.over(settings.retries)))
            self._policies[id(settings)] = cached
        return cached[1]

    def request_policy(self, settings: RouteSettings, retries: Retries) -> _Policy:
        """The policy of a request that carries its own `Retries` (``request.state[RETRIES]``)."""
        key = (id(settings), id(retries))
        cached = self._request_policies.get(key)
        if cached is None or cached[0] is not settings or cached[1] is not retries:
            if len(self._request_policies) >= 256:
                self._request_policies.clear()  # tables made per request: keep the cache bounded
            cached = (settings, retries, _Policy(retries.over(self.overrides.over(settings.retries))))
            self._request_policies[key] = cached
        return cached[2]

    def delay(self, policy: _Policy, retry: int) -> float:
        """How long to wait before retry number ``retry`` (1, 2, ...): full jitter."""
        cap = min(policy.max_backoff, policy.backoff * (1 << min(retry - 1, 30)))
        return self._random() * cap

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        settings = self.settings(request)
        state = request.state
        retries = state.get(RETRIES)
        if retries is not None:
            policy = self.request_policy(settings, retries)
        else:
            cached = self._policies.get(id(settings))
            policy = cached[1] if cached is not None and cached[0] is settings else self.policy(settings)
        budget = self.budgets.get(settings.target)
        if budget is None:
            budget = self.budgets[settings.target] = RetryBudget()
        budget.request()
        if policy.attempts < 2:
            return await call_next(request)
        replayable = not policy.idempotent_only or request.method in IDEMPOTENT
        if replayable and not isinstance(request.body, bytes):
            length = request.headers.get("Content-Length", "")
            if length.isdigit() and int(length) <= BUFFER_LIMIT:
                await request.read(BUFFER_LIMIT)
            else:
                replayable = False
        if not replayable and not policy.connect:
            return await call_next(request)
        if policy.per_try_timeout:
            state[TRY_TIMEOUT] = policy.per_try_timeout
        attempt = 1
        tried: list[Any] | None = None
        response: Response | None
        while True:
            try:
                response = await call_next(request)
            except UpstreamError as exc:
                if attempt >= policy.attempts or not self._worth_retrying(exc, policy, replayable, state):
                    raise
                failure: UpstreamError | None = exc
                response = None
            else:
                if attempt >= policy.attempts or not replayable:
                    return response
                if response.status not in policy.statuses:
                    if isinstance(response.body, bytes) or not policy.reset or not _small(response):
                        return response
                    try:
                        # All or nothing: a body that breaks off now can still be tried again.
                        await response.read(BUFFER_LIMIT)
                        return response
                    except UpstreamError as exc:
                        failure, response = exc, None
                else:
                    failure = None
            delay = self.delay(policy, attempt)
            deadline = state.get(DEADLINE)
            out_of_time = deadline is not None and time.monotonic() + delay >= deadline
            if out_of_time or not budget.allows(policy.budget, policy.min_per_second):
                if not out_of_time:
                    self.refused += 1
                if failure is not None:
                    raise failure
                assert response is not None
                return response
            if response is not None:
                await response.aclose()
            backend = state.get(BACKEND)
            if backend is not None:
                if tried is None:
                    tried = state[AVOID] = []
                tried.append(backend)
            budget.retried()
            self.retries += 1
            log.debug("request %s: try %d to %s failed (%s); retrying in %.0fms", request.id, attempt,
                      settings.target, failure.reason if failure else getattr(response, "status", "?"),
                      delay * 1000)
            if delay > 0:
                await asyncio.sleep(delay)
            attempt += 1
            state[BACKEND] = None

    @staticmethod
    def _worth_retrying(exc: UpstreamError, policy: _Policy, replayable: bool, state: dict[str, Any]) -> bool:
        if state.get(BACKEND) is None:
            return False  # it failed before reaching any instance (no route, no instance, no time left)
        if isinstance(exc, ConnectFailed):
            return policy.connect
        if not replayable:
            return False
        if isinstance(exc, UpstreamTimeout):
            return policy.timeout
        return policy.reset and exc.status == 502


def _small(response: Response) -> bool:
    length = response.headers.get("Content-Length", "")
    return length.isdigit() and int(length) <= BUFFER_LIMIT


# The built-in layers in the order they wrap the terminal, by their mesh.toml names.
BUILTIN: tuple[tuple[str, type[_Layer]], ...] = (
    ("deadline", Deadline),
    ("breaker", CircuitBreaker),
    ("retry", Retry),
)


def with_defaults(plugins: list[tuple[str, Plugin]]) -> list[tuple[str, Plugin]]:
    """``plugins`` followed by a default instance of each built-in layer they do not hold."""
    chain = list(plugins)
    for name, cls in BUILTIN:
        if not any(isinstance(plugin, cls) for _, plugin in plugins):
            chain.append((f"mesh.defaults ({name})", cls()))
    return chain
