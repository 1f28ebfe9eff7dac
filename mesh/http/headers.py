"""Header rules of a proxy: hop-by-hop removal, forwarding headers, request ids."""

from __future__ import annotations

import re

from multidict import CIMultiDict

__all__ = ["HOP_BY_HOP", "PEER_HEADER", "request_id", "set_forwarded", "strip_hop_by_hop",
           "strip_keeping_upgrade"]

# RFC 9110 §7.6.1, plus the non-standard Proxy-Connection that old clients send.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection",
})

PEER_HEADER = "x-mesh-peer"

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@+/=-]{1,128}$")


def strip_hop_by_hop(headers: CIMultiDict) -> None:
    """Remove hop-by-hop headers, including every header the Connection header names."""
    for value in headers.getall("Connection", ()):
        for token in value.split(","):
            token = token.strip()
            if token:
                headers.popall(token, None)
    for name in HOP_BY_HOP:
        if name in headers:
            del headers[name]


def strip_keeping_upgrade(headers: CIMultiDict) -> None:
    """`strip_hop_by_hop`, except that a WebSocket upgrade stays asked for."""
    upgrade = headers.get("Upgrade", "")
    wants = upgrade.lower() == "websocket" and "upgrade" in headers.get("Connection", "").lower()
    strip_hop_by_hop(headers)
    if wants:
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = upgrade


def set_forwarded(headers: CIMultiDict, client: str, scheme: str) -> None:
    """Append the client to X-Forwarded-For; set X-Forwarded-Proto and -Host."""
    prior = headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
    headers["X-Forwarded-Proto"] = scheme
    host = headers.get("Host")
    if host is not None:
        headers["X-Forwarded-Host"] = host


def request_id(headers: CIMultiDict, new: str) -> str:
    """Keep a well-formed incoming x-request-id, or set ``new``; return the one in use."""
    rid = headers.get("x-request-id")
    if rid is not None and _REQUEST_ID.match(rid):
        return rid
    headers["x-request-id"] = new
    return new
