"""The request path, normalized once: what plugins, policy and the app all see.

Proxies and apps that disagree about a path are how authorization gets
bypassed (``/public/..%2fadmin``, ``/admin%00``, ``//admin``): the policy
checks one path and the app serves another. So the sidecar decides the path
once, before any plugin runs, and forwards exactly that:

- ``%00`` (or a raw NUL), an encoded slash or backslash (``%2F``, ``%5C``) and a
  raw backslash are refused with 400;
- a ``%`` not followed by two hex digits (``/a%zzb``, ``/a%4``) is refused;
- percent-encoded unreserved characters (ALPHA, DIGIT, ``-._~``) are decoded
  and every other escape gets uppercase hex (RFC 3986 §6.2.2.1–2), so
  ``/%61pi/%69nternal`` is ``/api/internal`` for every check, and ``%2e%2e``
  is a dot-segment;
- runs of ``/`` merge, and dot-segments are resolved (RFC 3986 §5.2.4); a
  path that climbs above the root is refused;
- everything else stays as the client wrote it.

The result is a fixed point: normalizing it again changes nothing.
"""

from __future__ import annotations

import re

__all__ = ["BadPath", "normalize", "split_target"]

_REFUSED = re.compile(r"%(?:00|2[fF]|5[cC])|[\x00-\x1f\x7f\\ #]")
_MALFORMED = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _unescape(match: re.Match[str]) -> str:
    byte = int(match.group(1), 16)
    return chr(byte) if byte in _UNRESERVED else "%" + match.group(1).upper()
_SLASHES = re.compile(r"/{2,}")


class BadPath(ValueError):
    """A request-target the sidecar refuses (400)."""


def normalize(path: str) -> str:
    # SECURITY: CVE-2021-31920 (Istio) and CVE-2019-9901 (Envoy) class of bypasses.
    if not path.startswith("/"):
        raise BadPath("the path must start with '/'")
    if _REFUSED.search(path):
        raise BadPath("the path has an encoded slash, a NUL, a backslash or a control character")
    if "%" in path:
        if _MALFORMED.search(path):
            raise BadPath("the path has a '%' that is not followed by two hex digits")
        path = _ESCAPE.sub(_unescape, path)
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." not in path:
        return path
    segments = path.split("/")
    out: list[str] = []
    for segment in segments[1:-1]:
        if segment == "..":
            if not out:
                raise BadPath("the path climbs above '/'")
            out.pop()
        elif segment != ".":
            out.append(segment)
    last = segments[-1]
    if last == "..":
        if not out:
            raise BadPath("the path climbs above '/'")
        out.pop()
        last = ""
    elif last == ".":
        last = ""
    out.append(last)
    return "/" + "/".join(out)


def split_target(target: str) -> tuple[str, str]:
    """Split an origin-form request-target into a normalized path and the raw query."""
    path, _, query = target.partition("?")
    return normalize(path), query
