"""Route policy: the declared ``[[routes]]`` are the only calls allowed.

A service may always call itself (the front of a keyed service forwards to
its instances as the service itself).

A call is allowed when a route names its caller and target and, where the
route narrows them, its path (``*`` globs) and method. Everything else is
denied with a reason that names caller, target and path. In ``audit`` mode
(on the mesh or on a route) a denial is logged and the call goes through.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass

from mesh.config import RouteConfig

__all__ = ["Decision", "Policy", "Rule"]

log = logging.getLogger("mesh.policy")


@dataclass(frozen=True)
class Decision:
    """Whether a call may go, why not, and the matching route's own ``timeout`` and ``stream_idle_timeout``."""

    allowed: bool
    reason: str
    timeout: float | None = None
    stream_idle_timeout: float | None = None


_SELF = Decision(True, "")


class Rule:
    __slots__ = ("route", "paths", "methods")

    def __init__(self, route: RouteConfig) -> None:
        self.route = route
        self.paths = (re.compile("|".join(fnmatch.translate(p) for p in route.paths))
                      if route.paths else None)
        self.methods = frozenset(route.methods) or None

    def matches(self, method: str, path: str) -> bool:
        return ((self.methods is None or method in self.methods)
                and (self.paths is None or self.paths.match(path) is not None))


class Policy:
    def __init__(self, routes: list[RouteConfig], mode: str = "enforce") -> None:
        self.mode = mode
        self._rules: dict[tuple[str, str], list[Rule]] = {}
        for route in routes:
            self._rules.setdefault((route.source, route.to), []).append(Rule(route))

    def check(self, source: str | None, target: str, method: str, path: str) -> Decision:
        if source == target:
            return _SELF
        rules = self._rules.get((source or "", target), ())
        for rule in rules:
            if rule.matches(method, path):
                return Decision(True, "", rule.route.timeout, rule.route.stream_idle_timeout)
        who = f"'{source}'" if source else "an unidentified caller"
        if rules:
            reason = f"no route allows {who} to call {method} {path} on '{target}'"
        else:
            reason = f"no route allows {who} to call '{target}' ({method} {path})"
        audit = self.mode == "audit" or any(r.route.mode == "audit" for r in rules)
        if audit:
            log.warning("audit: would deny: %s", reason)
            return Decision(True, reason)
        log.warning("denied: %s", reason)
        return Decision(False, reason)
