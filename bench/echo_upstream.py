"""A fake Azure Speech for the relay benchmark: answers every audio frame at once with a small
USP text message, as fast as it can. `python -m bench.echo_upstream PORT`

It is a raw asyncio protocol on uvloop, like the load client (bench/load.py): it shares a core with
the load, and a fake that spent more per frame than the relay would make the baseline, not the
relay, what the benchmark measures. Frames are cut with the relay's own sans-I/O `frames` module;
audio payloads are never unmasked, since only their arrival matters.
"""

from __future__ import annotations

import asyncio
import sys

from websockets.utils import accept_key

from speechgate.relay import frames

ANSWER = frames.encode(
    frames.TEXT,
    b"Path:speech.hypothesis\r\nX-RequestId:bench\r\nContent-Type:application/json\r\n\r\n{}",
    masked=False,
)
MAX_FRAME = 2**20


class Echo(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.upgraded = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buffer + data if self.buffer else data
        if not self.upgraded:
            head, sep, buf = buf.partition(b"\r\n\r\n")
            if not sep:
                self.buffer = head
                return
            key = next(
                line.split(b":", 1)[1].strip()
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")
            )
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(key.decode()).encode() + b"\r\n\r\n"
            )
            self.upgraded = True
        offset, answers = 0, 0
        while True:
            header = frames.parse_header(buf, offset, MAX_FRAME)
            if header is None or header.end > len(buf):
                break
            if header.opcode == frames.BINARY:
                answers += 1
            elif header.opcode == frames.CLOSE:
                self.transport.write(frames.encode(frames.CLOSE, frames.close_payload(1000, ""), False))
                self.transport.close()
                return
            elif header.opcode == frames.PING:
                self.transport.write(frames.encode(frames.PONG, frames.payload(buf, header), False))
            offset = header.end
        if answers:
            self.transport.write(ANSWER * answers)
        self.buffer = buf[offset:]


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port)
    print("echo upstream ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1])))
