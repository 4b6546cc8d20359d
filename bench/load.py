"""Load for the relay benchmark, lean enough not to measure itself: raw asyncio protocols that
speak just enough WebSocket (RFC 6455) to stream. Every stream sends a 3,200-byte USP audio frame
every 100 ms; each frame's round trip is timed until its answer. The frame is masked once, with a
fixed key: fine against our own servers, and it keeps per-frame client CPU near zero.

    python -m bench.load URL TOKEN COUNT SECONDS [SCRIPT]   ->  one JSON line: sent, answered, rtts (ms)

SCRIPT (bench/relay_opus.py writes it): JSON {"interval": s, "head": hex, "chunks": [hex, ...]}:
each stream sends `head` once on connecting, then the chunks in turn, one every `interval`, round
and round (the plain door's raw audio: PCM, or Opus pages after their header).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from speechgate.relay import usp

INTERVAL_S = 0.1
MASK = b"\x37\xfa\x21\x3d"


def masked_frame(payload: bytes) -> bytes:
    """One client binary frame (FIN, opcode 2), masked with MASK."""
    n = len(payload)
    head = bytes([0x82]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    mask = (MASK * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")
    return head + MASK + body


class Stream(asyncio.Protocol):
    def __init__(self, request: bytes, frames: list[bytes], stats: Stats) -> None:
        self.request, self.frames, self.stats = request, frames, stats
        self.next = 0
        self.transport: asyncio.Transport | None = None
        self.upgraded = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.sent: deque[float] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded.done():
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return
            if b" 101 " not in head.split(b"\r\n", 1)[0]:
                self.upgraded.set_exception(RuntimeError(head.split(b"\r\n", 1)[0].decode()))
                return
            self.upgraded.set_result(None)
            self.buffer = rest
        buf = self.buffer
        while len(buf) >= 2:
            size, start = buf[1] & 0x7F, 2
            if size == 126:
                if len(buf) < 4:
                    break
                size, start = struct.unpack_from(">H", buf, 2)[0], 4
            elif size == 127:
                if len(buf) < 10:
                    break
                size, start = struct.unpack_from(">Q", buf, 2)[0], 10
            if len(buf) < start + size:
                break
            if buf[0] & 0x0F in (1, 2) and self.sent:
                self.stats.rtts.append((time.perf_counter() - self.sent.popleft()) * 1000)
                self.stats.answered += 1
            buf = buf[start + size :]
        self.buffer = buf

    def send(self) -> None:
        assert self.transport is not None
        self.sent.append(time.perf_counter())
        self.transport.write(self.frames[self.next])
        self.next = (self.next + 1) % len(self.frames)
        self.stats.sent += 1


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.rtts: list[float] = []


async def main(url: str, token: str, count: int, seconds: float, plan: dict[str, Any] | None = None) -> None:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    ).encode()
    frames = [
        masked_frame(usp.encode_binary("audio", "bench", b"\x01\x00" * 1600, extra={"X-StreamId": "1"}))
    ]
    head, interval = b"", INTERVAL_S
    if plan is not None:
        frames = [masked_frame(bytes.fromhex(chunk)) for chunk in plan["chunks"]]
        head = masked_frame(bytes.fromhex(plan["head"])) if plan["head"] else b""
        interval = plan["interval"]
    loop = asyncio.get_running_loop()
    stats = Stats()
    streams: list[Stream] = []
    for _ in range(count):
        _, protocol = await loop.create_connection(
            lambda: Stream(request, frames, stats), parts.hostname or "127.0.0.1", parts.port or 80
        )
        await protocol.upgraded
        if head and protocol.transport is not None:
            protocol.transport.write(head)
        streams.append(protocol)
    start = loop.time() + 0.5
    print("streaming", file=sys.stderr, flush=True)  # all connected: the caller starts measuring
    end = start + seconds

    def tick(stream: Stream, at: float) -> None:
        if at < end:
            stream.send()
            loop.call_at(at + interval, tick, stream, at + interval)

    for i, stream in enumerate(streams):  # spread the streams over the interval
        at = start + interval * i / count
        loop.call_at(at, tick, stream, at)
    await asyncio.sleep(end - loop.time() + 2.0)  # the last answers have 2 s to arrive
    for stream in streams:
        if stream.transport is not None:
            stream.transport.close()
    print(json.dumps({"sent": stats.sent, "answered": stats.answered, "rtts": stats.rtts}))


if __name__ == "__main__":
    import uvloop

    script = json.loads(Path(sys.argv[5]).read_text()) if len(sys.argv) > 5 else None
    uvloop.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), script))
