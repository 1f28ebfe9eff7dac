"""`Request` and `Response`: what plugins see and return.

Both carry headers as a case-insensitive multidict and a body that is either
``bytes`` or an async iterator of byte chunks. Bodies stream by default: the
chain never reads them. A plugin that needs the bytes calls ``await
request.read()`` (or ``response.read()``), which buffers once and caches, so
everyone after it sees the same bytes.
"""

from __future__ import annotations

import json as _json
from collections.abc import AsyncGenerator, AsyncIterable
from http import HTTPStatus
from random import getrandbits as _random_bits
from typing import Any

from multidict import CIMultiDict

from mesh.errors import BodyTooLarge

__all__ = ["Body", "Headers", "Request", "Response"]

Headers = CIMultiDict
Body = bytes | AsyncIterable[bytes]

# Reason phrases for every registered status (RFC 9110 §15 names, where they changed).
_REASONS = {status.value: status.phrase for status in HTTPStatus} | {
    413: "Content Too Large", 414: "URI Too Long", 416: "Range Not Satisfiable",
    422: "Unprocessable Content"}


def _headers(value: Any) -> CIMultiDict:
    if value is None:
        return CIMultiDict()
    if isinstance(value, CIMultiDict):
        return value
    return CIMultiDict(value)


def new_request_id() -> str:
    # An id to correlate logs, not a secret: the fast PRNG is enough.
    return f"{_random_bits(128):032x}"


class _Message:
    """What requests and responses share: headers and a streaming body."""

    __slots__ = ("headers", "_body", "_consumed")

    def __init__(self, headers: Any, body: Body) -> None:
        self.headers: CIMultiDict = _headers(headers)
        self._body: Body = body
        self._consumed = False

    @property
    def body(self) -> Body:
        """The body as given: ``bytes`` once read or set, else an async iterator."""
        return self._body

    @body.setter
    def body(self, value: Body) -> None:
        if isinstance(value, str):
            raise TypeError("body must be bytes or an async iterator of bytes, not str")
        self._body = value
        self._consumed = False

    @property
    def streaming(self) -> bool:
        return not isinstance(self._body, bytes)

    async def read(self, limit: int | None = None) -> bytes:
        """Buffer the whole body and return it; later reads return the same bytes.

        Over ``limit`` bytes raises `BodyTooLarge` (413 for a request body,
        500 for a response body if nothing catches it).
        """
        body = self._body
        if isinstance(body, bytes):
            if limit is not None and len(body) > limit:
                raise BodyTooLarge(limit)
            return body
        if self._consumed:
            raise RuntimeError("the body stream was already consumed by stream()")
        self._consumed = True
        parts: list[bytes] = []
        size = 0
        try:
            async for chunk in body:
                size += len(chunk)
                if limit is not None and size > limit:
                    raise BodyTooLarge(limit)
                parts.append(chunk)
        finally:
            await _aclose(body)
        data = b"".join(parts)
        self._body = data
        return data

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """Yield the body chunk by chunk without buffering it (once for a stream)."""
        body = self._body
        if isinstance(body, bytes):
            if body:
                yield body
            return
        if self._consumed:
            raise RuntimeError("the body stream was already consumed")
        self._consumed = True
        try:
            async for chunk in body:
                if chunk:
                    yield chunk
        finally:
            await _aclose(body)

    async def aclose(self) -> None:
        """Release an unread body (returns or closes the connection behind it)."""
        if not isinstance(self._body, bytes) and not self._consumed:
            self._consumed = True
            await _aclose(self._body)


async def _aclose(body: Any) -> None:
    close = getattr(body, "aclose", None)
    if close is not None:
        await close()


class Request(_Message):
    """An HTTP request on its way through a plugin chain.

    ``path`` is the normalized path: exactly what route policy checks and
    what is forwarded (dot-segments resolved, encoded slashes and NULs
    refused before any plugin runs). ``query`` is the raw query string
    without ``?``. ``state`` is a dict that travels down the chain, with
    what mesh's layers and plugins hand each other under the typed keys
    of `mesh.keys` (``CLAIMS``, ``UPSTREAM``, ``DEADLINE``, ...); ``peer``
    is the calling service's name when the caller is a mesh service,
    ``service`` the name of the service this sidecar belongs to, and ``id``
    the request id (``x-request-id``).
    """

    __slots__ = ("method", "path", "query", "state", "peer", "service", "id",
                 "client", "scheme", "version", "_interim", "__weakref__")

    def __init__(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        query: str = "",
        headers: Any = None,
        body: Body = b"",
        peer: str | None = None,
        service: str = "",
        id: str | None = None,
        client: str = "127.0.0.1",
        scheme: str = "http",
        state: dict[str, Any] | None = None,
        version: str = "1.1",
    ) -> None:
        super().__init__(headers, body)
        self.method = method.upper()
        self.path = path
        self.query = query
        self.state: dict[str, Any] = {} if state is None else state
        self.peer = peer
        self.service = service
        self.id = id or new_request_id()
        self.client = client
        self.scheme = scheme
        self.version = version
        # Where interim (1xx) responses to this request go, straight to its client: set by the
        # listener for clients that may get them (HTTP/1.1), passed to the pool by the sidecar.
        self._interim: Any = None

    @property
    def target(self) -> str:
        """Path plus query: the request-target sent upstream."""
        return f"{self.path}?{self.query}" if self.query else self.path

    @property
    def host(self) -> str:
        return self.headers.get("Host", "")

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target} id={self.id}>"


class Response(_Message):
    """An HTTP response coming back through a plugin chain.

    ``Response(429)`` is a complete short-circuit answer; ``body`` may be
    bytes or an async iterator of bytes (streamed to the client as it comes).
    """

    __slots__ = ("status", "reason", "_upgrade")

    def __init__(
        self,
        status: int = 200,
        body: Body | str = b"",
        headers: Any = None,
        *,
        reason: str | None = None,
        content_type: str | None = None,
    ) -> None:
        if isinstance(body, str):
            body = body.encode()
            if content_type is None:
                content_type = "text/plain; charset=utf-8"
        super().__init__(headers, body)
        self.status = status
        self.reason = reason or _REASONS.get(status, "")
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self._upgrade: Any = None

    @classmethod
    def json(cls, data: Any, status: int = 200, headers: Any = None) -> Response:
        return cls(status, _json.dumps(data).encode(), headers,
                   content_type="application/json")

    @classmethod
    def text(cls, text: str, status: int = 200, headers: Any = None) -> Response:
        return cls(status, text.encode(), headers, content_type="text/plain; charset=utf-8")

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"
