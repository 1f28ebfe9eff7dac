"""The WebSocket handshake (RFC 6455 §4): what the sidecar checks of it, on both sides.

After a 101 the sidecar carries the connection as a byte tunnel
(`mesh.upstream.Tunnel`): frames, close codes and reasons, pings,
extensions and subprotocols are the two ends' business, and pass as sent.
What a proxy must still check is the handshake itself: that a client's
request is one (a key of 16 bytes, version 13), and that the upstream's
101 answers *that* request (its ``Sec-WebSocket-Accept``), so a
connection turns into raw bytes only when both ends agreed to it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

__all__ = ["GUID", "accept", "valid_key"]

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def valid_key(key: str | None) -> bool:
    """Whether ``key`` is a client's ``Sec-WebSocket-Key``: 16 bytes in base64."""
    if not key:
        return False
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def accept(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value that answers ``key``."""
    return base64.b64encode(hashlib.sha1(key.strip().encode("ascii") + GUID).digest()).decode("ascii")
