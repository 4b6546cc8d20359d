"""A fake Azure Speech for the relay benchmark: answers every audio frame at once with a small
USP text message, as fast as it can. `python -m bench.echo_upstream PORT`"""

from __future__ import annotations

import asyncio
import sys

from websockets.asyncio.server import ServerConnection, serve

ANSWER = "Path:speech.hypothesis\r\nX-RequestId:bench\r\nContent-Type:application/json\r\n\r\n{}"


async def answer(ws: ServerConnection) -> None:
    async for message in ws:
        if type(message) is bytes:
            await ws.send(ANSWER)


async def main(port: int) -> None:
    async with serve(answer, "127.0.0.1", port, compression=None, max_size=2**20, ping_interval=None):
        print("echo upstream ready", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
