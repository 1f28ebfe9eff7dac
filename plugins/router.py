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
  included; past it the client gets a 504. It takes the place of the
  route's ``timeout`` (or ``[mesh.defaults]``') for this request; a
  caller's earlier deadline still wins.
- ``retries = 2``: try again, at most twice, when a try fails to reach the
  service, is reset, times out, or gets 502, 503 or 504: for GET, HEAD,
  OPTIONS, TRACE, PUT and DELETE (and for every method when it could not
  connect, since nothing was sent), after a back-off drawn at random up to
  25 ms, doubling per retry up to the route's ``max_backoff``, and while the
  route's retry budget allows. ``per_try_timeout = "500ms"`` bounds each
  try. A request body is sent again only if it is known: up to 64 KiB with
  a ``Content-Length`` (kept for that), or already read. ``retries = 0``:
  never retry.

A request a rule sends to another service (``to``, ``split``) goes there
as this service's own calls do, through its outbound chain: its
``outbound`` plugins, then the built-in deadline, circuit breaker and retry
layers and the balancer. Without ``timeout`` or ``retries`` the route's
settings apply (the ``[[routes]]`` entry from this service to that one,
then ``[mesh.defaults]``): by default such a call is retried as the app's
calls are. A rule's ``timeout`` and ``retries`` reach those layers as this
request's own settings, ``request.state[mesh.TIMEOUT]`` and
``request.state[mesh.RETRIES]``; on a rule that leaves the request for the
own app they bound and retry the call to the app the same way (without
``retries`` the app never gets a request twice).

The chosen service is put in ``request.state[mesh.UPSTREAM]``; the
sidecar sends the request there.

Example::

    plugins = [ { use = "router", rules = [
      { path = "/api/v1/*", strip_prefix = "/api/v1", to = "orders" },
      { path = "/old", redirect = "/new" },
      { path = "/v/*", split = { v1 = 50, v2 = 50 }, sticky = "header:X-User" },
    ] } ]
"""

import hashlib
import random
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from mesh import RETRIES, TIMEOUT, UPSTREAM, CallNext, Duration, Plugin, Request, Response, Retries

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# What a rule's `retries` retries, and the back-off it starts from (doubled per retry).
RETRY_ON: list[str | int] = ["connect-failure", "reset", "timeout", "502", "503", "504"]
BACKOFF = Duration(0.025)


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
    retries: int | None = None
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
        # What this rule asks of the retry layer, made once: every matching request carries it.
        self._retry_table = None if self.retries is None else Retries(
            attempts=self.retries + 1, per_try_timeout=self.per_try_timeout, on=list(RETRY_ON),
            idempotent_only=True, backoff=BACKOFF)

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
        if self.retries is not None and self.retries < 0:
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
        state = request.state
        if rule.to:
            state[UPSTREAM] = rule.to
        elif rule.split:
            state[UPSTREAM] = rule.pick(request)
        # The sidecar's deadline and retry layers apply them, on the way to a service or to the own app.
        if rule.timeout is not None:
            state[TIMEOUT] = rule.timeout
        if rule._retry_table is not None:
            state[RETRIES] = rule._retry_table
        return await call_next(request)


def _strip(path: str, prefix: str) -> str:
    """``path`` without ``prefix``, cut only at a segment boundary."""
    prefix = prefix.rstrip("/")
    if path == prefix:
        return "/"
    if path.startswith(prefix + "/"):
        return path[len(prefix):]
    return path
