"""uvicorn's HTTP protocol (httptools) with the bounds it lacks, for the token service.

httptools keeps a header in memory until its end, however long, and uvicorn waits for a request's
first byte, its headers and its body without end; an attacker holds memory and connections with
one huge header or many slow ones (slowloris). Here:

- the request line and headers together are at most `max_head_bytes` (431 past it);
- they arrive within `head_timeout_s` of the connection or of the previous answer (408 after it);
- the body arrives within `body_timeout_s` of the headers (408 after it);
- uvicorn's `limit_concurrency` answers 503 to connections beyond the process's limit.

uvicorn's h11 protocol has a size bound but costs the token benchmark about a third of its
throughput; this keeps httptools' speed (one counter per read, two clock reads per request).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 32 * 1024
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 2048
LINGER_S = 1.0

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request line and headers (or waiting for the first byte)
        self._head_bytes = 0
        # The deadline of what is awaited (headers, then body), or None while the app answers.
        # One timer per connection checks it and re-arms itself only when it fires early: a
        # request costs two clock reads, not a timer armed and cancelled twice.
        self._due: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False  # answered and closing: what still comes in is read and dropped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await(self.head_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431, f"request line and headers larger than {self.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_bytes = True, 0
        if self._due is None:  # a keep-alive connection's next request
            self._await(self.head_timeout_s)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._await(self.body_timeout_s)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._due = None  # the app answers now; no deadline of ours
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._in_head, self._head_bytes = True, 0  # waiting for the next request (keep-alive's timer)

    def _await(self, seconds: float) -> None:
        self._due = self.loop.time() + seconds
        if self._timer is None:
            self._timer = self.loop.call_later(seconds, self._check)

    def _check(self) -> None:
        self._timer = None
        if self._due is None:
            return  # the next request arms it again
        left = self._due - self.loop.time()
        if left > 0:
            self._timer = self.loop.call_later(left, self._check)
            return
        what = "headers" if self._in_head else "body"
        self._refuse(408, f"the request's {what} did not arrive in time")

    def _refuse(self, status: int, message: str) -> None:
        """Answer with `status` unless a response has begun, and close the connection: after a
        moment's reading of what the client still sends (a close with unread data would reset
        the connection, and the client would lose the answer with it)."""
        self._due = None
        if self.transport.is_closing() or self._refused:
            return
        self._refused = True
        if self.cycle is None or not self.cycle.response_started:
            body = (message + "\n").encode()
            self.transport.write(
                b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                b"x-content-type-options: nosniff\r\nconnection: close\r\n\r\n%s"
                % (status, _REASONS[status], len(body), body)
            )
        if self.cycle is not None:
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
