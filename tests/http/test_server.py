"""The listeners' HTTP/1.1 server, on real sockets and raw bytes: framing, limits, timeouts, shutdown."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import socket

import httptools
import pytest

from mesh.chain import short_error
from mesh.errors import ClientTimeout
from mesh.http.server import ClientGone, Listener, ServerLimits
from mesh.messages import Request, Response

from ..conftest import raw_http
from ..harness import eventually


@contextlib.asynccontextmanager
async def serving(handler, **kwargs):
    listener = Listener(handler, name="test", **kwargs)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.stop()


async def echo(request: Request, conn) -> Response:
    """The path, method and body back, and what the handler saw of the request."""
    body = await request.read()
    return Response(200, request.method.encode() + b" " + request.target.encode() + b" " + body,
                    {"X-Version": request.version, "X-Expect": request.headers.get("Expect", "-"),
                     "X-Host": request.headers.get("Host", "-")})


class Parsed:
    """Every response in ``data``, parsed with llhttp: statuses, header lists, bodies."""

    def __init__(self, data: bytes, head_only: bool = False) -> None:
        self.responses: list[tuple[int, list[tuple[bytes, bytes]], bytes]] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = b""
        self.complete = True
        parser = httptools.HttpResponseParser(self)
        self._parser = parser
        parser.feed_data(data)

    def on_header(self, name, value):
        self._headers.append((name.lower(), value))

    def on_body(self, body):
        self._body += body

    def on_message_complete(self):
        self.responses.append((self._parser.get_status_code(), self._headers, self._body))
        self._headers, self._body = [], b""

    @property
    def statuses(self) -> list[int]:
        return [status for status, _, _ in self.responses]

    def header(self, index: int, name: bytes) -> bytes | None:
        for key, value in self.responses[index][1]:
            if key == name:
                return value
        return None


def status_of(data: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    assert match, data[:80]
    return int(match.group(1))


# keep-alive, pipelining, HTTP/1.0


async def test_pipelined_requests_are_answered_in_order():
    async def handler(request, conn):
        # The first takes longest: answers must still come back in request order.
        await asyncio.sleep({"/1": 0.2, "/2": 0.05}.get(request.path, 0))
        return await echo(request, conn)

    async with serving(handler) as listener:
        data = await raw_http(listener.port,
                              b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
                              b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                              b"GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    parsed = Parsed(data)
    assert [body for _, _, body in parsed.responses] == [b"GET /1 ", b"POST /2 abc", b"GET /3 "]
    assert parsed.header(2, b"connection") == b"close"


async def test_keep_alive_serves_many_requests_on_one_connection():
    peers = set()

    async def handler(request, conn):
        peers.add(conn.transport.get_extra_info("sockname"))
        return Response(200, b"ok")

    async with serving(handler) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        for _ in range(5):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 2" in head
            assert await reader.readexactly(2) == b"ok"
        writer.close()
    assert len(peers) == 1


async def test_http_1_0_closes_unless_keep_alive():
    async with serving(echo) as listener:
        data = await raw_http(listener.port, b"GET /a HTTP/1.0\r\n\r\n")  # returns only when we close
        assert status_of(data) == 200 and data.endswith(b"GET /a ")
        assert b"connection: close" in data.lower() and b"x-version: 1.0" in data.lower()
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        for path in (b"/1", b"/2"):
            writer.write(b"GET " + path + b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert b"Connection: keep-alive" in head
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
            assert await reader.readexactly(length) == b"GET " + path + b" "
        writer.close()


async def test_streamed_body_without_length_is_chunked_for_1_1_and_close_delimited_for_1_0():
    async def handler(request, conn):
        async def parts():
            for part in (b"one ", b"two ", b"three"):
                yield part
        return Response(200, parts())

    async with serving(handler) as listener:
        data = await raw_http(listener.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"transfer-encoding: chunked" in data.lower()
        assert Parsed(data).responses[0][2] == b"one two three"
        data = await raw_http(listener.port, b"GET / HTTP/1.0\r\n\r\n")
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
        assert body == b"one two three"


# Expect: 100-continue


async def test_expect_100_continue_is_answered_when_the_body_is_read():
    async with serving(echo) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"X-Expect: -" in head  # the handler never saw it
        assert await reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head).group(1))) == \
            b"POST /up hello"
        writer.close()


async def test_expect_100_continue_refused_without_reading_sends_no_continue_and_closes():
    async def deny(request, conn):
        return Response(403, b"no")

    async with serving(deny) as listener:
        data = await raw_http(listener.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                                             b"Expect: 100-continue\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 403") and b"100 Continue" not in data
    assert b"connection: close" in data.lower()


# errors


async def test_a_raising_handler_gets_a_short_500_and_the_connection_goes_on(caplog):
    async def handler(request, conn):
        if request.path == "/boom":
            raise RuntimeError("kaboom secret")
        return Response(200, b"fine")

    async with serving(handler) as listener:
        with caplog.at_level(logging.ERROR, logger="mesh.server"):
            data = await raw_http(listener.port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n"
                                                 b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    parsed = Parsed(data)
    assert parsed.statuses == [500, 200]
    body = parsed.responses[0][2]
    assert body.startswith(b"500 Internal Server Error: internal error") and b"kaboom" not in body
    assert any("kaboom" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


SMUGGLING = {
    "content-length and transfer-encoding": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding and content-length": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                            b"Content-Length: 4\r\n\r\n0\r\n\r\n",
    "two different content-lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                     b"Content-Length: 6\r\n\r\nhello!",
    "two equal content-lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "content-length list": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
    "signed content-length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
    "bare LF": b"GET / HTTP/1.1\nHost: x\n\n",
    "bare LF in a header": b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n",
    "bare CR": b"GET / HTTP/1.1\r\nHost: x\rX: y\r\n\r\n",
    "space before colon": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "transfer-encoding not chunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    "transfer-encoding chunked, gzip": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "transfer-encoding xchunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\nabc",
    "NUL in a header": b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "HTTP/2.0 request line": b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    "header without a colon": b"GET /<script> HTTP/1.1\r\nBad Header\r\n\r\n",
}

BAD_CHUNKS = {
    "invalid chunk size": b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk size overflow": b"FFFFFFFFFFFFFFFFF1\r\nabc\r\n0\r\n\r\n",
    "space after chunk size": b"3 \r\nabc\r\n0\r\n\r\n",
    "chunk data longer than its size": b"3\r\nabcGET /smuggled HTTP/1.1\r\n\r\n",
    "bare LF after chunk size": b"3\nabc\n0\n\n",
}
SMUGGLING.update({name: b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
                  for name, chunks in BAD_CHUNKS.items()})


@pytest.mark.parametrize("request_bytes", list(SMUGGLING.values()), ids=list(SMUGGLING))
async def test_request_smuggling_inputs_get_400_and_reach_no_handler(request_bytes):
    seen = []

    async def handler(request, conn):
        seen.append(request.target)
        return Response(200, b"should not happen")

    async with serving(handler) as listener:
        data = await raw_http(listener.port, request_bytes + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(data) == 400 and data.count(b"HTTP/1.1") == 1
    assert seen == []
    assert b"<script>" not in data and b"smuggled" not in data


@pytest.mark.parametrize("chunks", list(BAD_CHUNKS.values()), ids=list(BAD_CHUNKS))
async def test_a_body_that_breaks_its_framing_once_served_gets_400_and_nothing_after_it(chunks):
    seen = []
    reading = asyncio.Event()

    async def handler(request, conn):
        seen.append(request.target)
        reading.set()
        await request.read()  # raises: the body broke its framing
        return Response(200, b"should not happen")

    async with serving(handler) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")
        await asyncio.wait_for(reading.wait(), 5)
        writer.write(chunks + b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            data = await reader.read(-1)
        writer.close()
    assert status_of(data) == 400 and data.count(b"HTTP/1.1") == 1
    assert seen == ["/"]


async def test_connect_is_refused_absolute_form_accepted_and_asterisk_form_passed_on():
    async with serving(echo) as listener:
        data = await raw_http(listener.port, b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n")
        assert status_of(data) == 405 and b"CONNECT" in data
        data = await raw_http(listener.port, b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(data) == 200 and data.endswith(b"OPTIONS * ")
        # RFC 9112 §3.2.2: every server accepts absolute-form; its authority replaces Host.
        for target, host, path in ((b"http://svc:81/x?q=1", b"svc:81", b"/x?q=1"), (b"http://svc", b"svc", b"/"),
                                   (b"HTTP://svc?a", b"svc", b"/?a"), (b"ws://svc/socket", b"svc", b"/socket"),
                                   (b"https://svc/%61pi", b"svc", b"/api")):
            data = await raw_http(listener.port, b"GET " + target + b" HTTP/1.1\r\nHost: other\r\n"
                                                                    b"Connection: close\r\n\r\n")
            assert status_of(data) == 200 and b"X-Host: " + host + b"\r\n" in data, data
            assert data.endswith(b"GET " + path + b" ")
        for target in (b"ftp://svc/x", b"http://u@svc/x", b"http:///x", b"svc/x", b"http://a b/"):
            data = await raw_http(listener.port, b"GET " + target + b" HTTP/1.1\r\nHost: svc\r\n\r\n")
            assert status_of(data) == 400, target


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a:b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\\b\r\n\r\n",
])
async def test_missing_duplicate_or_invalid_host_is_400(head):
    async with serving(echo) as listener:
        data = await raw_http(listener.port, head)
        assert status_of(data) == 400, data


async def test_valid_hosts_and_http10_without_host_are_served():
    async with serving(echo) as listener:
        for host in (b"svc", b"svc:8080", b"127.0.0.1:1", b"[::1]:80", b"a-b.example.com", b""):
            data = await raw_http(listener.port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
            assert status_of(data) == 200, host
        data = await raw_http(listener.port, b"GET / HTTP/1.0\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 ")


async def test_percent_encoded_unreserved_characters_are_decoded_and_malformed_escapes_refused():
    async with serving(echo) as listener:
        data = await raw_http(listener.port, b"GET /%61pi/%69nternal/%7e%3a HTTP/1.1\r\nHost: x\r\n"
                                             b"Connection: close\r\n\r\n")
        assert data.endswith(b"GET /api/internal/~%3A ")
        for path in (b"/a%zzb", b"/a%4", b"/%", b"/a%2"):
            data = await raw_http(listener.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(data) == 400, path


async def test_header_names_with_underscores_are_dropped_unless_allowed():
    seen = []

    async def handler(request: Request, conn) -> Response:
        seen.append(sorted(k.lower() for k in request.headers))
        return Response(200, b"ok")

    head = (b"GET / HTTP/1.1\r\nHost: x\r\nX_User: alice\r\nX_Mesh_Peer: admin\r\nx_mesh-Deadline-ms: 1\r\n"
            b"X-Fine: 1\r\nConnection: close\r\n\r\n")
    async with serving(handler) as listener:
        assert status_of(await raw_http(listener.port, head)) == 200
    async with serving(handler, limits=ServerLimits(underscores_in_headers=True)) as listener:
        assert status_of(await raw_http(listener.port, head)) == 200
    assert seen == [["connection", "host", "x-fine"], ["connection", "host", "x-fine", "x_user"]]


async def test_own_answers_carry_reason_phrases():
    limits = ServerLimits(max_header_bytes=1024)
    async with serving(echo, limits=limits) as listener:
        data = await raw_http(listener.port, b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 414 URI Too Long\r\n")
        data = await raw_http(listener.port, b"GET /%zz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")


# limits


async def test_request_head_limits_give_431_and_414():
    limits = ServerLimits(max_header_bytes=2048, max_headers=10)
    async with serving(echo, limits=limits) as listener:
        port = listener.port
        many_bytes = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 500) for i in range(5))
        assert status_of(await raw_http(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + many_bytes + b"\r\n")) == 431
        many_headers = b"".join(b"X-H%d: v\r\n" % i for i in range(11))
        assert status_of(await raw_http(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + many_headers + b"\r\n")) == 431
        data = await raw_http(port, b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(data) == 414 and b"aaaa" not in data
        just_under = b"X-Fit: " + b"v" * 1900 + b"\r\n"
        data = await raw_http(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + just_under + b"\r\n")
        assert status_of(data) == 200


async def test_a_header_line_that_never_ends_is_cut_at_the_limit():
    # llhttp hands over a header only when its line ends: the server counts the reads in between.
    async with serving(echo, limits=ServerLimits(max_header_bytes=4096)) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        for _ in range(100):
            writer.write(b"v" * 1000)
            try:
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.01)
            if reader.at_eof() or len(reader._buffer):
                break
        async with asyncio.timeout(5):
            data = await reader.read(-1)
        writer.close()
    assert status_of(data) == 431


async def test_request_body_is_streamed_with_flow_control():
    seen = {"max": 0, "total": 0}

    async def slow_reader(request, conn):
        async for chunk in request.body:
            seen["total"] += len(chunk)
            seen["max"] = max(seen["max"], request.body.buffered)
            await asyncio.sleep(0.001)
        return Response(200, b"ok")

    size = 16 * 1024 * 1024
    async with serving(slow_reader) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"b" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
    assert head.startswith(b"HTTP/1.1 200") and seen["total"] == size
    assert seen["max"] < 1024 * 1024  # paused at 256 KiB, plus what was in flight


async def test_body_timeout_gives_408_and_closes_without_waiting_for_the_rest():
    async def handler(request, conn):
        try:
            await request.read()
        except ClientTimeout as exc:
            return short_error(408, exc.reason, request.id)
        return Response(200, b"ok")

    async with serving(handler, limits=ServerLimits(body_timeout=0.3)) as listener:
        loop = asyncio.get_running_loop()
        start = loop.time()
        data = await raw_http(listener.port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        assert status_of(data) == 408 and b"connection: close" in data.lower()
        assert loop.time() - start < 2


async def test_a_client_that_leaves_cancels_its_handler():
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def handler(request, conn):
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    async with serving(handler) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 5)


async def test_write_timeout_cuts_a_client_that_never_reads():
    closed = asyncio.Event()

    async def endless(request, conn):
        async def body():
            try:
                block = b"x" * 65536
                while True:
                    yield block
            finally:
                closed.set()
        return Response(200, body())

    async with serving(endless, limits=ServerLimits(body_timeout=0.3)) as listener:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", listener.port))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # ... and never read
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await asyncio.wait_for(closed.wait(), 5)
            assert loop.time() - start < 3
            for _ in range(50):
                if not listener._connections:
                    break
                await asyncio.sleep(0.05)
            assert not listener._connections
        finally:
            sock.close()


async def test_header_and_idle_timeouts_close_quietly():
    limits = ServerLimits(header_timeout=0.3, idle_timeout=0.4)
    async with serving(echo, limits=limits) as listener:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await raw_http(listener.port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ") == b""
        assert await raw_http(listener.port, b"") == b""
        data = await raw_http(listener.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # kept alive, then idle
        assert status_of(data) == 200
        assert loop.time() - start < 4


# responses


async def test_response_framing_rules():
    async def handler(request, conn):
        path = request.path
        if path == "/head":
            return Response(200, b"", {"Content-Length": "1234", "Content-Type": "text/plain"})
        if path == "/204":
            return Response(204, b"", {"Content-Length": "0", "X-A": "1"})
        if path == "/304":
            return Response(304, b"", {"ETag": '"x"'})
        if path == "/multi":
            headers = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("Server", "app"),
                       ("Date", "Tue, 01 Jan 2030 00:00:00 GMT"), ("Transfer-Encoding", "chunked"),
                       ("Content-Length", "99")]
            return Response(299, b"body", headers, reason="Fine Thanks")
        return Response(200, b"short body")

    async with serving(handler) as listener:
        port = listener.port
        data = await raw_http(port, b"HEAD /head HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert data.endswith(b"\r\n\r\n") and b"Content-Length: 1234\r\n" in data
        data = await raw_http(port, b"HEAD /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert data.endswith(b"\r\n\r\n") and b"Content-Length: 10\r\n" in data
        for path in (b"/204", b"/304"):
            data = await raw_http(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert data.endswith(b"\r\n\r\n")
            assert b"content-length" not in data.lower() and b"transfer-encoding" not in data.lower()
        data = await raw_http(port, b"GET /multi HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        parsed = Parsed(data)
        assert data.startswith(b"HTTP/1.1 299 Fine Thanks\r\n") and parsed.responses[0][2] == b"body"
        headers = parsed.responses[0][1]
        assert [v for k, v in headers if k == b"set-cookie"] == [b"a=1", b"b=2"]
        assert parsed.header(0, b"server") == b"app" and parsed.header(0, b"date").startswith(b"Tue, 01 Jan 2030")
        assert parsed.header(0, b"content-length") == b"4" and parsed.header(0, b"transfer-encoding") is None
        data = await raw_http(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert b"\r\nServer: mesh\r\n" in data and re.search(rb"\r\nDate: \w{3}, \d\d \w{3} \d{4} ", data)


async def test_a_header_with_cr_or_lf_gives_500_and_never_splits_the_response(caplog):
    async def handler(request, conn):
        if request.path == "/reason":
            return Response(200, b"x", reason="OK\r\nX-Injected: 1")
        return Response(200, b"x", {"X-Evil": "a\r\nX-Injected: 1"})

    async with serving(handler) as listener:
        for path in (b"/header", b"/reason"):
            with caplog.at_level(logging.ERROR, logger="mesh.server"):
                data = await raw_http(listener.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(data) == 500 and b"X-Injected" not in data


async def test_a_stream_that_breaks_or_lies_about_its_length_aborts_the_connection():
    async def handler(request, conn):
        async def body():
            yield b"x" * 100
            if request.path == "/raise":
                raise ConnectionResetError("upstream went away")
        return Response(200, body(), {"Content-Length": "1000" if request.path != "/long" else "10"})

    async with serving(handler) as listener:
        for path in (b"/raise", b"/short", b"/long"):
            data = await raw_http(listener.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _, body = data.partition(b"\r\n\r\n")
            assert status_of(head) == 200 and len(body) < int(re.search(rb"Content-Length: (\d+)", head).group(1)) \
                or path == b"/long" and len(body) <= 10


# shutdown


async def test_stop_drains_the_request_in_flight_and_closes_idle_connections():
    started = asyncio.Event()

    async def handler(request, conn):
        if request.path == "/slow":
            started.set()
            await asyncio.sleep(0.5)
        return Response(200, b"done")

    listener = Listener(handler, name="test", limits=ServerLimits(drain_timeout=5))
    await listener.start()
    port = listener.port
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
    await idle_reader.readuntil(b"done")
    slow = asyncio.create_task(raw_http(port, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"))
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(listener.stop())
    async with asyncio.timeout(2):
        assert await idle_reader.read() == b""  # the idle keep-alive connection closes at once
    data = await slow
    assert status_of(data) == 200 and data.endswith(b"done") and b"connection: close" in data.lower()
    await asyncio.wait_for(stopping, 5)
    idle_writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_stop_gives_up_on_a_request_after_the_drain_timeout():
    started = asyncio.Event()

    async def stuck(request, conn):
        started.set()
        await asyncio.sleep(60)
        return Response(200)

    listener = Listener(stuck, name="test", limits=ServerLimits(drain_timeout=0.3))
    await listener.start()
    request = asyncio.create_task(raw_http(listener.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
    await asyncio.wait_for(started.wait(), 5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await listener.stop()
    assert loop.time() - start < 3
    assert await asyncio.wait_for(request, 5) == b""


async def test_stop_serves_the_first_request_of_a_new_connection_and_waits_no_longer_for_a_silent_one():
    listener = Listener(_answer("served"), name="test", limits=ServerLimits(drain_timeout=30))
    await listener.start()
    late_reader, late_writer = await asyncio.open_connection("127.0.0.1", listener.port)
    _, silent_writer = await asyncio.open_connection("127.0.0.1", listener.port)
    try:
        await eventually(lambda: len(listener._connections) == 2, what="both connections accepted")
        loop = asyncio.get_running_loop()
        began = loop.time()
        stopping = asyncio.create_task(listener.stop())
        late_writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(10):
            answer = await late_reader.read()
        assert status_of(answer) == 200 and answer.endswith(b"served")
        await asyncio.wait_for(stopping, 20)
        assert loop.time() - began < 10  # the silent one had a moment for its head, not the drain timeout
    finally:
        late_writer.close()
        silent_writer.close()


# a socket shared with other processes (`mesh.sidecar.handoff`)


def _answer(name: str):
    async def handler(request: Request, conn) -> Response:
        return Response(200, name.encode())
    return handler


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


async def test_listeners_on_one_socket_take_over_from_each_other():
    shared = socket.create_server(("127.0.0.1", 0))  # held, as the controller holds a public socket
    port = shared.getsockname()[1]
    request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    try:
        first = Listener(_answer("first"), name="first", sock=shared.dup())
        await first.start()
        assert first.address == f"127.0.0.1:{port}"
        assert (await raw_http(port, request)).endswith(b"first")
        second = Listener(_answer("second"), name="second", sock=shared.dup())
        await second.start()
        await first.stop()  # closes its own descriptor only
        for _ in range(5):
            assert (await raw_http(port, request)).endswith(b"second")
        await second.stop()
        # No listener accepts: a connection waits in the backlog (not refused) for the next one.
        waiting = socket.create_connection(("127.0.0.1", port), timeout=5)
        with waiting:
            waiting.sendall(request)
            third = Listener(_answer("third"), name="third", sock=shared.dup())
            await third.start()
            assert (await asyncio.to_thread(_read_all, waiting)).endswith(b"third")
            await third.stop()
    finally:
        shared.close()


@pytest.mark.parametrize("rounds", range(6))
async def test_a_connection_on_a_shared_socket_survives_a_listener_stopping(rounds):
    # Whatever the stopping listener had accepted when it stopped (nothing yet, the accept but not
    # the connection, or all of it), the request is answered: by it, or by the next one.
    shared = socket.create_server(("127.0.0.1", 0))
    port = shared.getsockname()[1]
    try:
        old = Listener(_answer("old"), name="old", sock=shared.dup())
        await old.start()
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        with client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            for _ in range(rounds):
                await asyncio.sleep(0)
            await old.stop()
            new = Listener(_answer("new"), name="new", sock=shared.dup())
            await new.start()
            try:
                answer = await asyncio.to_thread(_read_all, client)
            finally:
                await new.stop()
        assert status_of(answer) == 200 and answer.endswith((b"old", b"new")), answer
    finally:
        shared.close()


# upgrades


async def test_an_upgrade_request_with_a_body_is_served_as_a_plain_request():
    # llhttp stops at the end of an Upgrade request's head; its body must still be a body, never requests.
    seen = []

    async def handler(request, conn):
        seen.append((request.target, await request.read()))
        return Response(200, b"plain")

    smuggle = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    async with serving(handler) as listener:
        data = await raw_http(listener.port,
                              b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                              b"Content-Length: %d\r\n\r\n%b" % (len(smuggle), smuggle)
                              + b"POST /b HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(smuggle), smuggle)
                              + b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert Parsed(data).statuses == [200, 200, 200]
    assert seen == [("/a", smuggle), ("/b", smuggle), ("/c", b"")]


async def test_bytes_after_a_refused_websocket_handshake_are_never_parsed():
    seen = []

    async def handler(request, conn):
        seen.append(request.target)
        return Response(403, b"no")

    key = base64.b64encode(os.urandom(16))
    async with serving(handler) as listener:
        data = await raw_http(listener.port,
                              b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                              b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
                              b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(data) == 403 and data.count(b"HTTP/1.1") == 1
        bad = await raw_http(listener.port, b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                                            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert status_of(bad) == 400  # no key
    assert seen == ["/ws"]


# WebSocket tunnels (after the 101): tests/mesh/test_websocket.py


def test_client_gone_is_answered_like_a_client_timeout():
    from mesh.chain import error_response

    assert error_response(ClientGone("left"), Request()).status == 408


# request bodies: buffered when small, a minimum rate when streamed


async def _trickle(writer: asyncio.StreamWriter, data: bytes, every: float, stop: asyncio.Event) -> None:
    """Send ``data`` a byte at a time, ``every`` seconds apart, until it is sent or ``stop`` is set."""
    for byte in data:
        if stop.is_set() or writer.is_closing():
            return
        writer.write(bytes([byte]))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):
                await stop.wait()


async def test_small_bodies_arrive_in_full_before_the_handler_runs():
    calls = []

    async def handler(request: Request, conn) -> Response:
        calls.append((request.target, request.body if isinstance(request.body, bytes) else None))
        return Response(200, b"ok")

    limits = ServerLimits(request_buffer=1024)
    async with serving(handler, limits=limits) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        # Another client is served meanwhile; the slow one's handler has not run.
        data = await raw_http(listener.port, b"GET /other HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(data) == 200
        assert calls == [("/other", b"")]
        writer.write(b"world")
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
        assert status_of(head) == 200
        assert calls[1] == ("/slow", b"helloworld")
        # A chunked body is read in full too, and Expect: 100-continue is answered first.
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(10):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"3\r\nabc\r\n0\r\n\r\n")
            data = await reader.read(-1)
        writer.close()
        assert status_of(data) == 200
        assert calls[2] == ("/c", b"abc")
        # Larger than the buffer: it streams.
        data = await raw_http(listener.port, b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n"
                                             b"Connection: close\r\n\r\n" + b"x" * 2000)
        assert status_of(data) == 200 and calls[3] == ("/big", None)


@pytest.mark.parametrize("buffer", [0, 1 << 20])
async def test_a_body_slower_than_the_minimum_rate_gets_408(buffer):
    calls = []

    async def handler(request: Request, conn) -> Response:
        calls.append(request.target)
        try:
            await request.read()
        except ClientTimeout as exc:
            return short_error(408, exc.reason, request.id)
        return Response(200, b"ok")

    limits = ServerLimits(request_buffer=buffer, request_min_rate=100, body_grace=0.5)
    async with serving(handler, limits=limits) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n")
        stop = asyncio.Event()
        trickle = asyncio.create_task(_trickle(writer, b"x" * 500, 0.1, stop))  # 10 bytes/s
        try:
            async with asyncio.timeout(30):
                data = await reader.read(-1)
        finally:
            stop.set()
            await trickle
            writer.close()
        assert status_of(data) == 408 and b"slower than 100 bytes/s" in data
        assert calls == ([] if buffer else ["/slow"])


async def test_a_body_at_the_minimum_rate_is_served():
    async def handler(request: Request, conn) -> Response:
        return Response(200, await request.read())

    limits = ServerLimits(request_min_rate=10, body_grace=2)
    async with serving(handler, limits=limits) as listener:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\nConnection: close\r\n\r\n")
        stop = asyncio.Event()
        await _trickle(writer, b"0123456789", 0.05, stop)  # far above 10 bytes/s
        async with asyncio.timeout(30):
            data = await reader.read(-1)
        writer.close()
        assert status_of(data) == 200 and data.endswith(b"0123456789")
