"""``router``: route requests inside the chain, as an API gateway does.

Options:

- ``rules`` (list of tables): tried in order; the first rule that matches
  decides what happens. A request no rule matches goes on down the chain to
  this service's own app, unchanged.

A rule matches when every condition it gives holds (a rule without
conditions matches everything):

- ``path``: ``"/old"`` matches that path exactly; ``"/api/v1/*"`` matches
  every path below ``/api/v1/`` (not ``/api/v1`` itself: give a list,
  ``path = ["/api/v1", "/api/v1/*"]``). ``*`` may only end a pattern.
- ``regex``: a Python regular expression the whole path must match
  (``re.fullmatch``). Give ``path`` or ``regex``, not both.
- ``methods``: e.g. ``["GET", "HEAD"]``.
- ``headers``: ``{ X-Canary = "1" }``: the request has the header with
  exactly that value (``"*"``: with any value).
- ``query``: ``{ debug = "1" }``: the same for query parameters.

What a matching rule does (at most one of ``to``, ``split``, ``redirect``
and ``respond``; with none of them the request goes to the own app,
after the rewrites below):

- ``to = "orders"``: forward to another service, by name, through the mesh
  (still subject to the declared routes: undeclared 403, unknown 502).
- ``split = { v1 = 90, v2 = 10 }``: forward to one of these services, chosen
  at random in proportion to the integer weights.
- ``sticky = "header:X-User"``: with ``split``, requests carrying the same
  value of that header go to the same service (a stable hash of the value,
  the same on every sidecar; changing the weights moves some keys).
  Requests without the header are spread at random.
- ``strip_prefix = "/api/v1"``: remove that prefix (whole segments only):
  ``/api/v1/orders`` becomes ``/orders``, ``/api/v1`` becomes ``/``.
- ``rewrite = "/new/*"``: the new path. A ``*`` takes what ``*`` matched in
  ``path``; with ``regex``, ``\\1`` and ``\\g<name>`` take its groups. Not
  together with ``strip_prefix``. The query string is kept.
- ``set_headers = { X-Api = "v1" }`` and ``remove_headers = ["Cookie"]``:
  change the request's headers (removals first).
- ``redirect = "/new/*"``: answer with a redirect to that location (``*`` and
  groups as in ``rewrite``; the query string is kept unless the location has
  one); ``redirect_status`` (default 302) may be 301, 302, 303, 307 or 308.
- ``respond = { status = 410, body = "gone", headers = { ... } }``: answer
  directly.
- ``timeout = "2s"``: the longest wait for the response's head, all tries
  included; past it the client gets a 504.
- ``retries = 2``: for GET, HEAD, OPTIONS, PUT and DELETE only, try again
  (after 25 ms, 50 ms, ... of back-off) when a try times out, fails to reach
  the service, or gets 502, 503 or 504. ``per_try_timeout = "500ms"`` bounds
  each try. A request body is buffered first so it can be sent again.

The chosen service is put in ``request.state["upstream"]``; the sidecar's
terminal forwards the request there.

Example::

    plugins = [ { use = "router", rules = [
      { path = "/api/v1/*", strip_prefix = "/api/v1", to = "orders" },
      { path = "/old", redirect = "/new" },
      { path = "/v/*", split = { v1 = 50, v2 = 50 }, sticky = "header:X-User" },
    ] } ]
"""

import asyncio
import hashlib
import random
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from mesh import CallNext, Duration, Plugin, Request, Response, UpstreamError

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
BACKOFF = 0.025  # seconds before the first retry, doubled for each next one


@dataclass
class Respond:
    """A direct answer: ``respond = { status = 404, body = "no such thing" }``."""

    status: int = 200
    body: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 200 <= self.status <= 599:
            raise ValueError(f"respond.status must be between 200 and 599, got {self.status}")


@dataclass
class _Match:
    """What a matching rule captured: the ``*`` tail, or the regex match."""

    tail: str = ""
    regex: re.Match[str] | None = None

    def expand(self, template: str) -> str:
        if self.regex is not None:
            return self.regex.expand(template)
        return template.replace("*", self.tail)


@dataclass
class Rule:
    """One routing rule: conditions, then what to do (see the module docstring)."""

    path: str | list[str] | None = None
    regex: str | None = None
    methods: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    to: str | None = None
    split: dict[str, int] = field(default_factory=dict)
    sticky: str | None = None
    strip_prefix: str | None = None
    rewrite: str | None = None
    set_headers: dict[str, str] = field(default_factory=dict)
    remove_headers: list[str] = field(default_factory=list)
    redirect: str | None = None
    redirect_status: int = 302
    respond: Respond | None = None
    timeout: Duration | None = None
    retries: int = 0
    per_try_timeout: Duration | None = None

    def __post_init__(self) -> None:
        # Built directly in Python, a rule may get plain strings and tables.
        if isinstance(self.respond, dict):
            self.respond = Respond(**self.respond)
        for name in ("timeout", "per_try_timeout"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, Duration.parse(getattr(self, name)))
        self.methods = [m.upper() for m in self.methods]
        self._patterns = self._check_paths()
        self._regex = self._check_regex()
        self._sticky = self._check_actions()
        self._cumulative = []
        total = 0
        for name, weight in self.split.items():
            total += weight
            self._cumulative.append((total, name))

    def _check_paths(self) -> list[tuple[str, bool]]:
        paths = [self.path] if isinstance(self.path, str) else list(self.path or [])
        patterns = []
        for path in paths:
            if not path.startswith("/"):
                raise ValueError(f"path {path!r} must start with '/'")
            if "*" in path[:-1]:
                raise ValueError(f"path {path!r}: '*' may only end a pattern, as in '/api/*'")
            prefix = path.endswith("*")
            patterns.append((path[:-1] if prefix else path, prefix))
        if patterns and self.regex is not None:
            raise ValueError("give path or regex, not both")
        return patterns

    def _check_regex(self) -> re.Pattern[str] | None:
        if self.regex is None:
            return None
        try:
            return re.compile(self.regex)
        except re.error as exc:
            raise ValueError(f"regex {self.regex!r} is not a valid regular expression: {exc}") from None

    def _check_actions(self) -> str | None:
        """Reject rules that say two contradictory things; return the sticky header."""
        given = [name for name in ("to", "split", "redirect", "respond") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"a rule does one thing: {' and '.join(given)} were both given")
        if self.redirect is not None or self.respond is not None:
            extra = [name for name in ("strip_prefix", "rewrite", "set_headers", "remove_headers",
                                       "timeout", "per_try_timeout") if getattr(self, name)]
            if self.retries:
                extra.append("retries")
            if extra:
                raise ValueError(f"{given[0]} answers without forwarding, so "
                                 f"{', '.join(extra)} would do nothing")
        if self.redirect_status not in REDIRECT_STATUSES:
            raise ValueError(f"redirect_status must be one of 301, 302, 303, 307, 308, "
                             f"got {self.redirect_status}")
        if self.strip_prefix is not None and self.rewrite is not None:
            raise ValueError("give strip_prefix or rewrite, not both")
        if self.strip_prefix is not None and not self.strip_prefix.startswith("/"):
            raise ValueError(f"strip_prefix {self.strip_prefix!r} must start with '/'")
        if self.rewrite is not None and not self.rewrite.startswith("/"):
            raise ValueError(f"rewrite {self.rewrite!r} must start with '/'")
        if any(weight < 0 for weight in self.split.values()):
            raise ValueError("split weights must not be negative")
        if self.split and sum(self.split.values()) == 0:
            raise ValueError("split weights add up to 0: give at least one a positive weight")
        if self.retries < 0:
            raise ValueError(f"retries must not be negative, got {self.retries}")
        if self.per_try_timeout is not None and not self.retries:
            raise ValueError("per_try_timeout needs retries (use timeout for a single try)")
        for name in ("timeout", "per_try_timeout"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be more than 0")
        if self.sticky is None:
            return None
        if not self.split:
            raise ValueError("sticky only applies to a split")
        kind, _, name = self.sticky.partition(":")
        if kind != "header" or not name.strip():
            raise ValueError(f"sticky must look like 'header:X-User', got {self.sticky!r}")
        return name.strip()

    def match(self, request: Request) -> _Match | None:
        """What this rule captured from ``request``, or None if it does not match."""
        if self.methods and request.method not in self.methods:
            return None
        for name, value in self.headers.items():
            values = request.headers.getall(name, [])
            if not values or (value != "*" and value not in values):
                return None
        if self.query:
            params = parse_qs(request.query, keep_blank_values=True)
            for name, value in self.query.items():
                if name not in params or (value != "*" and value not in params[name]):
                    return None
        if self._regex is not None:
            found = self._regex.fullmatch(request.path)
            return _Match(regex=found) if found else None
        if not self._patterns:
            return _Match()
        for pattern, prefix in self._patterns:
            if prefix and request.path.startswith(pattern):
                return _Match(tail=request.path[len(pattern):])
            if not prefix and request.path == pattern:
                return _Match()
        return None

    def pick(self, request: Request) -> str:
        """The service of ``split`` this request goes to."""
        total = self._cumulative[-1][0]
        value = request.headers.get(self._sticky) if self._sticky else None
        if value is not None:
            # A stable hash, unlike hash(): every sidecar sends a user the same way.
            digest = hashlib.sha256(value.encode()).digest()
            point = int.from_bytes(digest[:8], "big") % total
        else:
            point = random.randrange(total)
        return next(name for upper, name in self._cumulative if point < upper)


class Router(Plugin):
    """Routes requests by the first matching rule (see the module docstring)."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = [rule if isinstance(rule, Rule) else Rule(**rule) for rule in rules]

    async def handle(self, request: Request, call_next: CallNext) -> Response:
        for rule in self.rules:
            found = rule.match(request)
            if found is not None:
                return await self._apply(rule, found, request, call_next)
        return await call_next(request)

    async def _apply(self, rule: Rule, found: _Match, request: Request,
                     call_next: CallNext) -> Response:
        if rule.respond is not None:
            response = Response(rule.respond.status, rule.respond.body.encode(), rule.respond.headers)
            if rule.respond.body and "Content-Type" not in response.headers:
                response.headers["Content-Type"] = "text/plain; charset=utf-8"
            return response
        if rule.redirect is not None:
            location = found.expand(rule.redirect)
            if request.query and "?" not in location:
                location = f"{location}?{request.query}"
            return Response(rule.redirect_status, b"", {"Location": location})
        if rule.strip_prefix is not None:
            request.path = _strip(request.path, rule.strip_prefix)
        elif rule.rewrite is not None:
            request.path = found.expand(rule.rewrite)
        for name in rule.remove_headers:
            request.headers.popall(name, None)
        for name, value in rule.set_headers.items():
            request.headers[name] = value
        if rule.to:
            request.state["upstream"] = rule.to
        elif rule.split:
            request.state["upstream"] = rule.pick(request)
        if rule.timeout is None and not rule.retries:
            return await call_next(request)
        return await _forward(rule, request, call_next)


def _strip(path: str, prefix: str) -> str:
    """``path`` without ``prefix``, cut only at a segment boundary."""
    prefix = prefix.rstrip("/")
    if path == prefix:
        return "/"
    if path.startswith(prefix + "/"):
        return path[len(prefix):]
    return path


async def _forward(rule: Rule, request: Request, call_next: CallNext) -> Response:
    """``call_next`` under the rule's timeout, retried as the rule allows."""
    loop = asyncio.get_running_loop()
    deadline = None if rule.timeout is None else loop.time() + rule.timeout
    tries = 1 + (rule.retries if request.method in IDEMPOTENT else 0)
    if tries > 1:
        await request.read()  # a stream can be sent only once; bytes can be sent again
    for attempt in range(tries):
        last = attempt == tries - 1
        until = deadline
        if rule.per_try_timeout is not None:
            try_deadline = loop.time() + rule.per_try_timeout
            until = try_deadline if until is None else min(until, try_deadline)
        try:
            async with asyncio.timeout_at(until) as scope:
                response = await call_next(request)
        except TimeoutError:
            if not scope.expired():
                raise  # not our timeout: someone further down gave up
            if last or (deadline is not None and loop.time() >= deadline):
                return _timed_out(request, rule)
        except UpstreamError:
            if last:
                raise
        else:
            if last or response.status not in RETRY_STATUSES:
                return response
            await response.aclose()
        pause = BACKOFF * 2 ** attempt * random.uniform(0.5, 1.5)
        if deadline is not None:
            pause = min(pause, deadline - loop.time())
            if pause <= 0:
                return _timed_out(request, rule)
        await asyncio.sleep(pause)
    raise AssertionError("unreachable: the last try always returns or raises")


def _timed_out(request: Request, rule: Rule) -> Response:
    """The short 504 a client gets when the rule's time ran out."""
    where = request.state.get("upstream") or "the app"
    text = f"504 Gateway Timeout: {where} did not answer in time\nrequest id: {request.id}\n"
    return Response(504, text, {"x-request-id": request.id})
