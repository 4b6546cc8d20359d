"""uvicorn's HTTP protocol (httptools) with the bounds it lacks, for the token service.

httptools keeps a header in memory until its end, however long, and uvicorn waits for a request's
first byte, its headers and its body without end; an attacker holds memory and connections with
one huge header or many slow ones (slowloris). Here:

- the request line and headers together are at most `max_head_bytes` (431 past it), counted
  across reads and, as httptools parses them, within one read;
- they arrive within `head_timeout_s` of the connection or of the previous answer (408 after it);
- the body arrives within `body_timeout_s` of the headers (408 after it);
- uvicorn's `limit_concurrency` answers 503 to connections beyond the process's limit, except the
  health probes (`PROBES`): idle connections must not make a liveness probe restart a healthy pod;
- one address holds at most `max_per_address` connections (503 and closed at once past it), but
  the proxies `forwarded_allow_ips` trusts, whose connections carry many clients.

A request that ends before its body does (a timeout, a body httptools cannot parse, a client that
hangs up) is marked on its scope (`ENDED`: 408, 400, or 499 for a client gone), so that the app
logs one line with that status instead of a server error (speechgate/token_service/app.py).

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

PROBES = frozenset({b"/healthz", b"/readyz"})
ENDED = "speechgate.ended"  # in a request's scope: the status of a request that ended early
CLIENT_GONE = 499  # as nginx logs a client that closed before the answer: nothing is sent

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class _HeadTooLarge(Exception):
    """Raised from httptools' callbacks to stop parsing a head past its bound."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S
    max_per_address = 0  # 0: no bound per address
    trusted: frozenset[str] = frozenset()  # addresses with no bound of their own (trusted proxies)
    per_address: dict[str, int]  # connections per address, one dict per server (server_options)

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
        self._parsed_head = 0  # bytes of the head httptools has handed over, in this request
        self._address: str | None = None  # counted in per_address

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await(self.head_timeout_s)
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else None
        if self.max_per_address and address is not None and address not in self.trusted:
            held = self.per_address.get(address, 0) + 1
            self.per_address[address], self._address = held, address
            if held > self.max_per_address:
                self._refuse(503, f"more than {self.max_per_address} connections from one address")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._address is not None:
            left = self.per_address.get(self._address, 1) - 1
            if left > 0:
                self.per_address[self._address] = left
            else:
                self.per_address.pop(self._address, None)
            self._address = None
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.scope.setdefault(ENDED, CLIENT_GONE)  # type: ignore[misc]
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
        self._in_head, self._head_bytes, self._parsed_head = True, 0, 0
        if self._due is None:  # a keep-alive connection's next request
            self._await(self.head_timeout_s)

    # httptools hands over the head as it parses it, within one read too: a whole request with a
    # huge header in one write is stopped here, before it reaches the app.
    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        self._parsed_head += size
        if self._parsed_head > self.max_head_bytes:
            raise _HeadTooLarge  # httptools stops; uvicorn calls send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._parsed_head > self.max_head_bytes:
            self._refuse(431, f"request line and headers larger than {self.max_head_bytes} bytes")
            return
        if self.cycle is not None:  # a body httptools could not parse: the app stops reading it
            self.cycle.scope[ENDED] = 400  # type: ignore[literal-required]
        super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._await(self.body_timeout_s)
        if self.url.partition(b"?")[0] in PROBES and self.limit_concurrency is not None:
            # Probes are answered whatever the connection count: they cost nothing, and a probe
            # refused for idle connections would have a healthy process restarted.
            limit, self.limit_concurrency = self.limit_concurrency, None
            try:
                super().on_headers_complete()
            finally:
                self.limit_concurrency = limit
            return
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
            self.cycle.scope[ENDED] = status  # type: ignore[literal-required]
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
