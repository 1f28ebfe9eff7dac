"""What HTTP/1.1 framing the listeners and the upstream client share.

Flow-control marks for bodies buffered in memory, the statuses that carry no
body, and the one way a message head is put on the wire: with the check
that no name, value or reason splits it.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from email.utils import formatdate

__all__ = ["HIGH_WATER", "LOW_WATER", "NO_BODY_STATUS", "date_line", "encode_head"]

HIGH_WATER = 256 * 1024  # buffered body bytes above which reading from the sender pauses
LOW_WATER = 64 * 1024  # ... and below which it resumes
NO_BODY_STATUS = frozenset({204, 304})

# Date header: formatting it costs more than a whole head, so once a second.
_date_second = 0
_date_line = ""


def date_line() -> str:
    """``Date: <now>`` (RFC 9110 §6.6.1), formatted at most once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second = now
        _date_line = "Date: " + formatdate(now, usegmt=True)
    return _date_line


def encode_head(first: str, items: Collection[tuple[str, str]], extra: Sequence[str] = ()) -> bytes:
    """A message head: the ``first`` line, ``items`` (name, value) as given, then ``extra`` lines.

    Raises ValueError when a line would hold CR, LF or NUL. Values came from
    our parsers as UTF-8 with surrogate escapes: the original bytes go out.
    """
    head = first + "\r\n"
    if items:
        head += "\r\n".join(map(": ".join, items)) + "\r\n"
    if extra:
        head += "\r\n".join(extra) + "\r\n"
    lines = 1 + len(items) + len(extra)
    # SECURITY: a CR or LF inside a line would split the message (header injection, smuggling).
    if head.count("\n") != lines or head.count("\r") != lines or "\x00" in head:
        raise ValueError("a header name or value, or the first line, holds CR, LF or NUL")
    return (head + "\r\n").encode("utf-8", "surrogateescape")
