"""The forward-only prototype, as a baseline for the relay benchmark: a relay on the `websockets`
library that does nothing but forward messages both ways (no authentication, no metering, no
quotas), on uvloop like the relay. `python -m bench.forwarder PORT UPSTREAM_URL`

The issue's latency goals were set just above what this reached on a quiet day here; measured in
the same run as the relay, it says how much of a run's p99 is the machine's rather than the relay's.
"""

from __future__ import annotations

import asyncio
import sys

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve


async def pump(
    source: ServerConnection | ClientConnection, sink: ServerConnection | ClientConnection
) -> None:
    async for message in source:
        await sink.send(message)


async def main(port: int, upstream: str) -> None:
    async def handler(app: ServerConnection) -> None:
        assert app.request is not None
        async with connect(upstream + app.request.path, compression=None, ping_interval=None) as azure:
            _, pending = await asyncio.wait(
                [asyncio.create_task(pump(app, azure)), asyncio.create_task(pump(azure, app))],
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()

    async with serve(handler, "127.0.0.1", port, compression=None, max_size=2**20, ping_interval=None):
        print("forwarder ready", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1]), sys.argv[2]))
