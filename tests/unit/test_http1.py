"""meshkit.http1 against a real socket server that answers what each test scripts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from meshkit.http1 import Client, HttpError

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # -> keep the connection open?


class Server:
    """Reads one request at a time (head and Content-Length body), hands it to ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[bytes] = []
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + (await reader.readexactly(length) if length else b"")
                self.requests.append(request)
                keep = await self.handler(request, writer)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(status: int, body: bytes, *extra: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def replying(raw: bytes, keep_open: bool) -> Handler:
    """A handler that writes ``raw`` to every request, then keeps the connection or closes it."""
    async def handler(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(raw)
        return keep_open
    return handler


async def echo(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(answer(200, request))
    return True


async def test_a_request_carries_its_method_path_query_headers_and_json_body() -> None:
    async with Server(echo) as srv, Client(srv.url + "/base/") as http:
        got = await http.request("POST", "/v1/holds", json={"seatIds": ["A-1-1"]}, params={"timeout": "20s"},
                                 headers={"authorization": "Bearer t"})
    head, _, body = got.body.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /base/v1/holds?timeout=20s HTTP/1.1"
    assert "authorization: Bearer t" in lines
    assert "Content-Type: application/json" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert json.loads(body) == {"seatIds": ["A-1-1"]}
    assert got.status == 200


async def test_connections_are_kept_alive_and_reused() -> None:
    async with Server(echo) as srv, Client(srv.url, limit=4) as http:
        for _ in range(20):
            assert (await http.request("GET", "/")).status == 200
    assert srv.connections == 1


async def test_chunked_answers_are_read_whole_and_the_connection_reused() -> None:
    async def chunked(request: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 409 Conflict\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in (b"4;ext=1\r\nabcd\r\n", b"3\r\nefg", b"\r\n0\r\n", b"\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        return True

    async with Server(chunked) as srv, Client(srv.url) as http:
        first = await http.request("GET", "/")
        second = await http.request("GET", "/")
    assert (first.status, first.body, second.body) == (409, b"abcdefg", b"abcdefg")
    assert srv.connections == 1


async def test_an_answer_framed_by_the_connections_end_is_read_and_the_connection_not_reused() -> None:
    until_close = replying(b"HTTP/1.1 200 OK\r\n\r\nall of it", keep_open=False)
    async with Server(until_close) as srv, Client(srv.url) as http:
        assert (await http.request("GET", "/")).body == b"all of it"
        assert (await http.request("GET", "/")).body == b"all of it"
    assert srv.connections == 2


async def test_connection_close_is_honoured_and_interim_answers_skipped() -> None:
    closing = replying(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(201, b"ok", "connection: close"),
                       keep_open=False)
    async with Server(closing) as srv, Client(srv.url) as http:
        got = [await http.request("POST", "/", json={}) for _ in range(3)]
    assert [(g.status, g.body) for g in got] == [(201, b"ok")] * 3
    assert srv.connections == 3


async def test_the_pool_limit_queues_requests_in_arrival_order() -> None:
    order: list[str] = []

    async def slow(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.02)
        order.append(request.split(b" ")[1].decode())
        writer.write(answer(200, b""))
        return True

    async with Server(slow) as srv, Client(srv.url, limit=2) as http:
        await asyncio.gather(*(http.request("GET", f"/{i}") for i in range(10)))
    assert srv.connections == 2
    assert order[2:] == [f"/{i}" for i in range(2, 10)]  # the first two ran side by side


async def test_a_request_cancelled_while_queued_hands_its_turn_on() -> None:
    async def slow(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(0.05)
        writer.write(answer(200, b""))
        return True

    async with Server(slow) as srv, Client(srv.url, limit=1) as http:
        first = asyncio.create_task(http.request("GET", "/a"))
        await asyncio.sleep(0.01)
        queued = asyncio.create_task(http.request("GET", "/b"))
        third = asyncio.create_task(http.request("GET", "/c"))
        await asyncio.sleep(0.01)
        queued.cancel()
        async with asyncio.timeout(5):  # a lost turn would leave the third waiting for ever
            assert (await first).status == 200 and (await third).status == 200
    assert srv.connections == 1


async def test_a_timeout_closes_the_connection_and_the_next_request_gets_a_fresh_one() -> None:
    calls = 0

    async def stall_once(request: bytes, writer: asyncio.StreamWriter) -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.5)  # answered after the client gave up: must not be read as the next
            writer.write(answer(200, b"late"))
            return True
        writer.write(answer(200, b"fresh"))
        return True

    async with Server(stall_once) as srv, Client(srv.url, limit=1, timeout=0.1) as http:
        with pytest.raises(TimeoutError):
            await http.request("GET", "/")
        assert (await http.request("GET", "/")).body == b"fresh"
    assert srv.connections == 2


async def test_garbage_and_refused_connections_are_http_errors() -> None:
    garbage = replying(b"SMTP ready\r\n\r\n", keep_open=True)
    async with Server(garbage) as srv, Client(srv.url) as http:
        url = srv.url
        with pytest.raises(HttpError, match="status line"):
            await http.request("GET", "/")
    async with Client(url, connect_timeout=1) as http:  # the server is gone
        with pytest.raises(HttpError, match="cannot connect"):
            await http.request("GET", "/")


async def test_a_server_that_drops_the_connection_mid_answer_is_an_http_error() -> None:
    truncated = replying(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly some", keep_open=False)
    async with Server(truncated) as srv, Client(srv.url) as http:
        with pytest.raises(HttpError, match="mid-answer"):
            await http.request("GET", "/")


def test_only_http_origins_and_no_header_injection() -> None:
    with pytest.raises(ValueError, match="http"):
        Client("ftp://example.test")
    assert Client("https://example.test").port == 443  # over TLS, verified by default
    with pytest.raises(ValueError, match="line break"):
        Client("http://127.0.0.1:1").encode("GET", "/", headers={"x": "a\r\nInjected: 1"})
    with pytest.raises(ValueError, match="not both"):
        Client("http://127.0.0.1:1").encode("POST", "/", json={}, body=b"{}")


async def test_a_raw_body_goes_byte_for_byte_with_the_callers_content_type() -> None:
    signed = b'{"b": 1,  "a": 2}'  # as signed: not to be re-serialized
    async with Server(echo) as srv, Client(srv.url, user_agent="ticketping-sandbox-psp") as http:
        got = await http.request("POST", "/hook", body=signed, headers={"content-type": "application/json"})
    head, _, body = got.body.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert body == signed
    assert f"Content-Length: {len(signed)}" in lines and "content-type: application/json" in lines
    assert "User-Agent: ticketping-sandbox-psp" in lines
