"""The server side of RFC 6455: checking a handshake, reading client frames, writing ours.

Only what the listener needs to carry a WebSocket between a client and the
upstream: masking is required of clients, control frames must be short and
whole, messages are capped, and close codes are checked both ways.
"""

from __future__ import annotations

import base64
import binascii

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_MESSAGE = 16 * 1024 * 1024  # a client message over this closes the WebSocket (1009)


class WSError(Exception):
    """A WebSocket protocol violation by the client: close with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def valid_key(key: str | None) -> bool:
    if not key:
        return False
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def unmask(data: bytes, mask: bytes) -> bytes:
    size = len(data)
    if not size:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def parse_frame(buffer: bytearray) -> tuple[bool, int, bytes, int] | None:
    """The client frame at the start of ``buffer``: (fin, opcode, payload, size), or None if incomplete."""
    have = len(buffer)
    if have < 2:
        return None
    first, second = buffer[0], buffer[1]
    if first & 0x70:
        raise WSError(1002, "reserved bits set, and no extension was negotiated")
    if not second & 0x80:
        raise WSError(1002, "a client frame must be masked")
    opcode = first & 0x0F
    length = second & 0x7F
    start = 2
    if length == 126:
        if have < 4:
            return None
        length, start = int.from_bytes(buffer[2:4], "big"), 4
    elif length == 127:
        if have < 10:
            return None
        length, start = int.from_bytes(buffer[2:10], "big"), 10
    if opcode >= 8 and (length > 125 or not first & 0x80):
        raise WSError(1002, "a control frame must be short and whole")
    if length > MAX_MESSAGE:
        raise WSError(1009, "message too big")
    end = start + 4 + length
    if have < end:
        return None
    payload = unmask(bytes(buffer[start + 4:end]), bytes(buffer[start:start + 4]))
    return bool(first & 0x80), opcode, payload, end


def frame(opcode: int, payload: bytes) -> bytes:
    """A whole, unmasked server frame."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + size.to_bytes(8, "big")
    return head + payload


def close_payload(payload: bytes) -> tuple[int, bytes]:
    """A client's close frame: (code, reason); a malformed one is a protocol error."""
    if not payload:
        return 1000, b""
    if len(payload) < 2:
        raise WSError(1002, "close frame with a one-byte payload")
    code = int.from_bytes(payload[:2], "big")
    if not (1000 <= code <= 1003 or 1007 <= code <= 1011 or 3000 <= code <= 4999):
        raise WSError(1002, f"invalid close code {code}")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WSError(1007, "close reason is not UTF-8") from None
    return code, payload[2:]


def wire_code(code: int | None) -> int:
    """A close code fit to send: the 'no status' and 'abnormal' codes are never on the wire."""
    if code is None or code == 1005:
        return 1000
    if code in (1006, 1015) or not 1000 <= code <= 4999:
        return 1011
    return code
