"""`mesh.http.client`: the pooled HTTP/1.1 client, against tiny raw servers on 127.0.0.1.

Each upstream here is an asyncio server whose handler reads requests and
writes exactly the bytes a test wants (interim responses, bad statuses,
huge heads, bodies cut by a FIN or a reset), so what the pool does with
them is seen byte for byte. The last tests run the same upstreams behind
a real sidecar (`mesh.testing.run_mesh`) and read its answers raw.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from multidict import CIMultiDict

from mesh.errors import UpstreamError
from mesh.http.client import Endpoint, Limits, Pool, UpstreamTimeout
from mesh.testing import run_mesh

from ..conftest import eventually, port_of, raw_http

Handler = Callable[["Raw", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Raw:
    """An upstream that hands each connection to ``handler`` and counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> Raw:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes] | None:
        """The next request on a connection, or None when the client closed it."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        request = (method, target, headers, body)
        self.requests.append(request)
        return request


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def answer_ok(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await raw.read_request(reader) is not None:
        writer.write(OK)


async def read_all(response: Any) -> bytes:
    return await response.read()


def headers(**items: str) -> CIMultiDict:
    return CIMultiDict({"Host": "app", **items})


# no resend of what may have reached the app (RFC 9112 §9.3.1.1), one timeout


def second_request_unanswered(close: bool) -> Handler:
    """Answer the first request on a connection; read the second, then close (or say nothing)."""

    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while await raw.read_request(reader) is not None:
            if first:
                writer.write(OK)
                first = False
            elif close:
                return  # read, perhaps acted on, and no answer: the connection closes
            else:
                await asyncio.sleep(3600)

    return handler


async def test_a_post_is_never_sent_twice_when_a_reused_connection_closes_unanswered():
    async with Raw(second_request_unanswered(close=True)) as raw:
        pool = Pool()
        response = await pool.request(raw.endpoint, "GET", "/", headers())
        assert await read_all(response) == b"ok"
        with pytest.raises(UpstreamError) as failure:
            await pool.request(raw.endpoint, "POST", "/order", headers(), b"buy one")
        assert failure.value.status == 502
        await pool.close()
    assert [(m, t) for m, t, _, _ in raw.requests] == [("GET", "/"), ("POST", "/order")]


async def test_an_idempotent_request_is_sent_again_on_a_fresh_connection():
    async with Raw(second_request_unanswered(close=True)) as raw:
        pool = Pool()
        assert await read_all(await pool.request(raw.endpoint, "GET", "/", headers())) == b"ok"
        response = await pool.request(raw.endpoint, "PUT", "/x", headers(), b"same again")
        assert response.status == 200 and await read_all(response) == b"ok"
        await pool.close()
    assert [(m, t) for m, t, _, _ in raw.requests] == [("GET", "/"), ("PUT", "/x"), ("PUT", "/x")]
    assert raw.connections == 2


async def test_a_timeout_on_a_reused_connection_fires_once_and_sends_nothing_again():
    async with Raw(second_request_unanswered(close=False)) as raw:
        pool = Pool()
        assert await read_all(await pool.request(raw.endpoint, "GET", "/", headers())) == b"ok"
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(UpstreamTimeout):
            await pool.request(raw.endpoint, "GET", "/slow", headers(), timeout=1.0)
        took = loop.time() - start
        await pool.close()
    assert took < 1.5 + 0.5, f"a 1s timeout took {took:.2f}s"
    assert [t for _, t, _, _ in raw.requests] == ["/", "/slow"]


# what comes back is checked


async def test_interim_responses_go_to_the_callback_as_they_come_but_not_100_continue():
    seen: list[tuple[int, str, list[tuple[str, str]]]] = []
    hinted = asyncio.Event()

    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n"
                     b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n"
                     b"Link: </app.js>; rel=preload\r\nConnection: x-drop\r\nX-Drop: 1\r\n\r\n")
        async with asyncio.timeout(10):
            await hinted.wait()  # the final answer only once the hint is through
        writer.write(OK)

    def informational(status: int, reason: str, items: list[tuple[str, str]]) -> None:
        seen.append((status, reason, items))
        hinted.set()

    async with Raw(handler) as raw:
        pool = Pool()
        response = await pool.request(raw.endpoint, "GET", "/", headers(), informational=informational)
        assert response.status == 200 and await read_all(response) == b"ok"
        await pool.close()
    assert seen == [(103, "Early Hints", [("Link", "</style.css>; rel=preload"), ("Link", "</app.js>; rel=preload")])]


@pytest.mark.parametrize("status", [b"999", b"600", b"099", b"000"])
async def test_a_status_outside_100_to_599_is_a_502(status):
    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 " + status + b" Odd\r\nContent-Length: 2\r\n\r\nok")
        await reader.read()

    async with Raw(handler) as raw:
        pool = Pool()
        with pytest.raises(UpstreamError) as failure:
            await pool.request(raw.endpoint, "GET", "/", headers())
        await pool.close()
    assert failure.value.status == 502 and str(int(status)) in failure.value.reason


async def test_a_101_to_a_plain_request_is_a_502():
    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        await reader.read()

    async with Raw(handler) as raw:
        pool = Pool()
        with pytest.raises(UpstreamError) as failure:
            await pool.request(raw.endpoint, "GET", "/", headers())
        await pool.close()
    assert failure.value.status == 502


@pytest.mark.parametrize("shape", ["one long header", "many headers"])
async def test_a_response_head_over_the_cap_is_a_502_and_is_not_read_to_its_end(shape):
    written = 0
    stopped = asyncio.Event()

    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + (b"X-Big: " if shape == "one long header" else b""))
        block = b"a" * 65536 if shape == "one long header" else b"X-Small: 1\r\n" * 5000
        try:
            while written < 50 << 20:
                writer.write(block)
                await writer.drain()
                written += len(block)
        except ConnectionError:
            pass
        finally:
            stopped.set()

    async with Raw(handler) as raw:
        pool = Pool()
        with pytest.raises(UpstreamError) as failure:
            await pool.request(raw.endpoint, "GET", "/", headers())
        async with asyncio.timeout(10):
            await stopped.wait()
        await pool.close()
    assert failure.value.status == 502 and "head" in failure.value.reason
    assert written < 50 << 20, "the sidecar read all 50 MB of response head"


async def test_a_few_kilobytes_of_headers_pass():
    many = b"".join(b"Set-Cookie: c%d=%s\r\n" % (i, b"v" * 200) for i in range(90))

    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: 2\r\n\r\nok")
        await reader.read()

    async with Raw(handler) as raw:
        pool = Pool()
        response = await pool.request(raw.endpoint, "GET", "/", headers())
        assert len(response.headers.getall("Set-Cookie")) == 90 and await read_all(response) == b"ok"
        await pool.close()


# bodies that break off


def body_then(ending: str, framing: str) -> Handler:
    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        elif framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.1)
        if ending == "reset":
            reset(writer)
        else:
            writer.close()

    return handler


@pytest.mark.parametrize("framing,ending", [("chunked", "fin"), ("chunked", "reset"), ("length", "fin"),
                                            ("length", "reset"), ("close", "reset")])
async def test_a_body_that_breaks_off_raises_from_its_iterator(framing, ending):
    async with Raw(body_then(ending, framing)) as raw:
        pool = Pool()
        response = await pool.request(raw.endpoint, "GET", "/", headers())
        got = b""
        with pytest.raises(UpstreamError):
            async for chunk in response.stream():
                got += chunk
        await pool.close()
    assert got == b"hello"


async def test_a_close_delimited_body_ended_by_a_fin_is_complete():
    async with Raw(body_then("fin", "close")) as raw:
        pool = Pool()
        response = await pool.request(raw.endpoint, "GET", "/", headers())
        assert await read_all(response) == b"hello"
        await pool.close()


async def test_the_wait_between_body_chunks_is_the_requests_idle_timeout():
    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await raw.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await asyncio.sleep(1.0)
            writer.write(b"4\r\nlast\r\n0\r\n\r\n")

    async with Raw(handler) as raw:
        pool = Pool(Limits(stream_idle_timeout=0.3))
        response = await pool.request(raw.endpoint, "GET", "/", headers(), idle_timeout=5)
        assert await read_all(response) == b"firstlast"  # a 1 s gap within 5 s
        response = await pool.request(raw.endpoint, "GET", "/", headers())
        with pytest.raises(UpstreamError) as failure:
            await read_all(response)  # the pool's default: 0.3 s
        assert failure.value.status == 504
        await pool.close()


# connection reuse


async def test_head_responses_leave_the_connection_in_the_pool():
    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await raw.read_request(reader)) is not None:
            if request[0] == "HEAD":
                # What a GET would get, without its body; llhttp alone would wait for 1234 bytes.
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            else:
                writer.write(OK)

    async with Raw(handler) as raw:
        pool = Pool()
        for method in ("HEAD", "HEAD", "GET", "HEAD", "GET", "HEAD"):
            response = await pool.request(raw.endpoint, method, "/", headers())
            assert response.status == 200
            if method == "HEAD":
                assert response.headers["Content-Length"] == "1234" and response.body == b""
            else:
                assert await read_all(response) == b"ok"
        await pool.close()
    assert raw.connections == 1


async def test_bytes_on_an_idle_pooled_connection_retire_it():
    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while await raw.read_request(reader) is not None:
            writer.write(OK)
            if first:
                first = False
                # An answer nobody asked for (some servers say 408 before closing an idle connection).
                writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")

    async with Raw(handler) as raw:
        pool = Pool()
        assert await read_all(await pool.request(raw.endpoint, "GET", "/", headers())) == b"ok"
        await asyncio.sleep(0.2)
        response = await pool.request(raw.endpoint, "GET", "/", headers())
        assert response.status == 200 and await read_all(response) == b"ok"
        await pool.close()
    assert raw.connections == 2


# through a sidecar


ONE = """
[mesh]
name = "up"
[services.a]
command = "app"
[services.b]
command = "app"
[[routes]]
from = "a"
to = "b"
"""


async def read_head(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):
        return await reader.readuntil(b"\r\n\r\n")


@pytest.mark.parametrize("way", ["public", "outbound"])
async def test_early_hints_reach_an_http_1_1_client_before_the_final_response(way):
    hinted = asyncio.Event()

    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await raw.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            async with asyncio.timeout(10):
                await hinted.wait()
            writer.write(OK)

    async with Raw(handler) as raw, run_mesh(ONE, {"a": raw.port, "b": raw.port}) as mesh:
        host = b"a" if way == "public" else b"b"
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(mesh.url("a", way)))
        writer.write(b"GET /page HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        interim = await read_head(reader)
        assert interim.startswith(b"HTTP/1.1 103 Early Hints\r\n")
        assert b"\r\nLink: </style.css>; rel=preload\r\n" in interim
        hinted.set()
        final = await read_head(reader)
        assert final.startswith(b"HTTP/1.1 200 OK\r\n")
        assert await reader.readexactly(2) == b"ok"
        writer.close()


async def test_no_interim_response_for_an_http_1_0_client_and_never_a_100_continue():
    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await raw.read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK)

    async with Raw(handler) as raw, run_mesh(ONE, {"a": raw.port, "b": raw.port}) as mesh:
        port = port_of(mesh.url("a"))
        old = await raw_http(port, b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert old.startswith(b"HTTP/1.1 200 OK\r\n") and old.count(b"HTTP/1.1") == 1
        new = await raw_http(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert new.startswith(b"HTTP/1.1 103 Early Hints\r\n") and b"100 Continue" not in new
        assert new.count(b"HTTP/1.1 200 OK\r\n") == 1


async def test_a_bad_status_or_an_oversized_head_from_the_app_is_a_502():
    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await raw.read_request(reader)) is not None:
            if request[1] == "/999":
                writer.write(b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nok")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 1000 + b"Content-Length: 2\r\n\r\nok")

    async with Raw(handler) as raw, run_mesh(ONE, {"a": raw.port, "b": raw.port}) as mesh:
        port = port_of(mesh.url("a"))
        for path in (b"/999", b"/big"):
            data = await raw_http(port, b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert data.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), data[:100]
            assert b"X-Many" not in data


async def test_head_requests_through_the_sidecar_share_one_connection_to_the_app():
    async def handler(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await raw.read_request(reader)) is not None:
            if request[0] == "HEAD":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            else:
                writer.write(OK)

    async with Raw(handler) as raw, run_mesh(ONE, {"a": raw.port, "b": raw.port}) as mesh:
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(mesh.url("a")))
        for _ in range(5):
            writer.write(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 1234\r\n" in head
        writer.close()
    assert raw.connections == 1


# a streamed request body is exactly as long as the Content-Length that goes with it


async def record_all(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep every byte the connection carries, in ``raw.requests`` as one raw entry, answering nothing."""
    raw.requests.append(("raw", "", {}, await reader.read()))


async def stream(*chunks: bytes) -> Any:
    for chunk in chunks:
        yield chunk


@pytest.mark.parametrize("chunks", [(b"12345", b"GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n"), (b"123",)],
                         ids=["longer", "shorter"])
async def test_a_streamed_body_that_does_not_match_its_content_length_never_desyncs_the_upstream(chunks):
    async with Raw(record_all) as raw:
        pool = Pool(Limits(response_timeout=10))
        try:
            with pytest.raises(UpstreamError) as caught:
                await pool.request(raw.endpoint, "POST", "/", headers(**{"Content-Length": "5"}), stream(*chunks))
            assert caught.value.status == 502
            assert "Content-Length" in caught.value.reason
            await eventually(lambda: raw.requests)  # the connection was closed, not kept for the next request
            sent = raw.requests[0][3]
            head, _, body = sent.partition(b"\r\n\r\n")
            assert b"content-length: 5" in head.lower()
            assert len(body) <= 5 and b"smuggled" not in sent
        finally:
            await pool.close()


async def test_a_streamed_body_with_a_length_goes_as_is():
    async with Raw(answer_ok) as raw:
        pool = Pool()
        try:
            response = await pool.request(raw.endpoint, "POST", "/", headers(**{"Content-Length": "5"}),
                                          stream(b"12", b"345"))
            assert response.status == 200 and await read_all(response) == b"ok"
            assert raw.requests[-1][3] == b"12345"
            assert "transfer-encoding" not in raw.requests[-1][2]
        finally:
            await pool.close()
