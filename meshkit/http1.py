"""A lean HTTP/1.1 client: keep-alive connections on asyncio protocols.

Used where a request's CPU counts: the flash-sale simulator's fans (flashsale), which share the
machine's two cores with the platform they measure, and the sandbox PSP's webhook calls
(svc_payment), made in the process that also answers them. aiohttp's client spent about 120 us
of CPU per request here (its request and response objects, the connector's bookkeeping, a
payload object per body, a timeout handle, cookie and redirect handling neither needs); this
client spends about a third of that. It speaks HTTP/1.1 (over TLS for an https origin) to one
origin, answers framed by Content-Length, chunked encoding or the end of the connection,
keep-alive unless either side says ``Connection: close``.

A pool holds up to ``limit`` connections (0: no limit) and queues the requests beyond it in
arrival order, as aiohttp's connector did. A request that fails leaves its connection closed,
never back in the pool half-read.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import ssl
from collections import deque
from typing import Any
from urllib.parse import urlencode, urlsplit

MAX_HEAD = 64 * 1024  # an answer's status line and headers
_HEAD_END = b"\r\n\r\n"


class HttpError(ConnectionError):
    """The connection failed or the answer could not be read: transient for a caller's retry."""


class Answer:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self._buf = bytearray()
        self._waiter: asyncio.Future[Answer] | None = None
        # The answer being read.
        self._status = 0
        self._headers: dict[str, str] | None = None
        self._length = -1  # bytes of body expected; -1: until the connection ends
        self._chunked = False
        self._chunks = bytearray()
        self._head_only = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is not None:
            self._parse()
        elif self._buf:  # bytes nobody asked for: the connection cannot be trusted any more
            self.reusable = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._headers is not None and self._length < 0 and not self._chunked:
            self._finish(bytes(self._buf))  # a body framed by the connection's end
        else:
            waiter.set_exception(HttpError(f"connection closed mid-answer: {exc or 'by the server'}"))

    # -- one exchange -------------------------------------------------------------------------

    async def exchange(self, request: bytes, head_only: bool) -> Answer:
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self._status, self._headers, self._length, self._chunked = 0, None, -1, False
        self._head_only = head_only
        self.transport.write(request)
        if self._buf:
            self._parse()
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.close()

    def _parse(self) -> None:
        try:
            if self._headers is None and not self._parse_head():
                return
            if self._chunked:
                self._parse_chunks()
            elif self._length >= 0 and len(self._buf) >= self._length:
                body = bytes(self._buf[:self._length])
                del self._buf[:self._length]
                self._finish(body)
        except HttpError as err:
            self.close()
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_exception(err)

    def _parse_head(self) -> bool:
        end = self._buf.find(_HEAD_END)
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                raise HttpError("answer headers too large")
            return False
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[:end + 4]
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise HttpError(f"malformed header line: {line[:80]!r}")
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        if status < 200:  # 100 Continue and friends: the real answer follows
            return self._parse_head() if self._buf.find(_HEAD_END) >= 0 else False
        self._status, self._headers = status, headers
        if "close" in headers.get("connection", "").lower() or parts[0] == "HTTP/1.0":
            self.reusable = False
        if self._head_only or status in (204, 304):
            self._length = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._chunked = True
            self._chunks = bytearray()
        elif "content-length" in headers:
            try:
                self._length = int(headers["content-length"])
            except ValueError:
                raise HttpError(f"bad content-length {headers['content-length']!r}") from None
        else:
            self.reusable = False  # the body ends with the connection
        return True

    def _parse_chunks(self) -> None:
        buf = self._buf
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            size_text = bytes(buf[:eol]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                end = buf.find(_HEAD_END, eol)  # the trailers' end (none: right after "0\r\n")
                if buf[eol:eol + 4] == _HEAD_END:
                    end = eol
                if end < 0:
                    return
                del buf[:end + 4]
                self._finish(bytes(self._chunks))
                return
            if len(buf) < eol + 2 + size + 2:
                return
            self._chunks += buf[eol + 2:eol + 2 + size]
            del buf[:eol + 2 + size + 2]

    def _finish(self, body: bytes) -> None:
        assert self._headers is not None
        if self._buf:  # more than one answer to one request
            self.reusable = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Answer(self._status, self._headers, body))


class Client:
    """Requests to one ``http(s)://host:port`` origin over a pool of keep-alive connections."""

    def __init__(self, base_url: str, *, limit: int = 100, timeout: float = 30.0,
                 connect_timeout: float = 5.0, user_agent: str = "ticketping-flashsale") -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"only http(s)://host:port origins are supported, not {base_url!r}")
        self.host = parts.hostname
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        host_header = parts.netloc
        self._fixed = f"Host: {host_header}\r\nUser-Agent: {user_agent}\r\n"
        self.limit, self.timeout, self.connect_timeout = limit, timeout, connect_timeout
        self._idle: list[_Connection] = []
        self._open = 0
        self._waiting: deque[asyncio.Future[_Connection | None]] = deque()
        self._closed = False
        self._all: set[_Connection] = set()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(HttpError("the client was closed"))

    def encode(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
        """The request's bytes: a ``json`` value serialized, or ``body`` as it is (its
        Content-Type among ``headers``)."""
        target = self._prefix + path
        if params:
            target += ("&" if "?" in target else "?") + urlencode(params)
        head = [f"{method} {target} HTTP/1.1\r\n", self._fixed]
        if json is not None:
            if body:
                raise ValueError("a request has either a json value or a body, not both")
            body = jsonlib.dumps(json, separators=(",", ":")).encode()
            head.append("Content-Type: application/json\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(body)}\r\n")
        if headers:
            for name, value in headers.items():
                if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                    raise ValueError(f"header {name!r} holds a line break")
                head.append(f"{name}: {value}\r\n")
        head.append("\r\n")
        return "".join(head).encode("latin-1") + body

    async def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                      headers: dict[str, str] | None = None, body: bytes = b"") -> Answer:
        """One request; raises HttpError (the connection failed) or TimeoutError."""
        data = self.encode(method, path, json=json, params=params, headers=headers, body=body)
        async with asyncio.timeout(self.timeout):
            conn = await self._acquire()
            try:
                answer = await conn.exchange(data, head_only=method == "HEAD")
            except BaseException:
                conn.close()
                self._release(conn)
                raise
            self._release(conn)
            return answer

    async def _acquire(self) -> _Connection:
        if self._closed:
            raise HttpError("the client is closed")
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable and not conn.closed:
                return conn
            self._drop(conn)
            self._open -= 1  # nobody waits while a connection sits idle
        if self.limit and self._open >= self.limit:
            # Wait in arrival order for a connection handed over (or a freed slot: None).
            waiter: asyncio.Future[_Connection | None] = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    given = waiter.result()  # cancelled just as its turn came: pass the turn on
                    if given is None:
                        self._free_slot()
                    else:
                        self._release(given)
                raise
            if handed is not None:
                return handed
        else:
            self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._free_slot()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self._tls)
        except OSError as err:
            raise HttpError(f"cannot connect to {self.host}:{self.port}: {err}") from err
        self._all.add(conn)
        return conn

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._all.discard(conn)

    def _free_slot(self) -> None:
        """A connection's slot is free: the first waiting request's to connect with, or nobody's."""
        if not self._hand_on(None):
            self._open -= 1

    def _release(self, conn: _Connection) -> None:
        if conn.reusable and not conn.closed and not self._closed:
            if not self._hand_on(conn):
                self._idle.append(conn)
        else:
            self._drop(conn)
            self._free_slot()

    def _hand_on(self, conn: _Connection | None) -> bool:
        """Give the first waiting request ``conn`` (None: a free slot to connect with)."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False
