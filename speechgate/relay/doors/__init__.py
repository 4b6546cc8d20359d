"""The two front doors (one module each: azure.py, plain.py): what flows between an app and
Azure once a stream is admitted; here, what both use.

Close codes are chosen for how the clients react (docs/relay.md, the close codes table):
- Azure-compatible door: a turn that cannot finish ends with 4000 and a reason (both SDKs cancel
  at once and show it); never 1000 in the middle of a turn (the SDKs hang); 1001 when draining;
  an upstream that closes mid-turn becomes 1011, which the SDK answers by reconnecting and
  replaying the turn's audio, except Azure's own 1007 (it refused the request), passed on with
  its reason (splice.azure_closed).
- Plain door: 1000 done, 1001 draining, 1003/1007 a message it cannot use, 1008 revoked or too
  fast, 1009 frame too large, 1011 upstream failure (with Azure's reason when it refused),
  1013 upstream unavailable, 4000 session time limit, 4429 quota used up.

The Azure door's data phase normally runs on a splice of the two sockets (speechgate/relay/splice.py, the
same rules); the message-level pump here is its fallback and `SPEECHGATE_SPLICE=0`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from speechgate.relay import usp
from speechgate.relay.live import Context, Live
from speechgate.relay.splice import PATH_WINDOW
from speechgate.relay.upstream import UpstreamError, open_upstream, upstream_url


def resume(connection: ServerConnection) -> None:
    """Reading was paused at the handshake, for the splice; this stream goes another way."""
    if connection.transport is not None:
        connection.transport.resume_reading()


async def connect(
    relay: Context,
    live: Live,
    service: str,
    path_for: Callable[[bool], str],
    query: str,
    extra: dict[str, str],
) -> ClientConnection:
    """Azure's connection for a stream: on its upstream of the pool (moving to another of its zones
    when that one refuses: relay/pool.py), or on the configured one. `path_for(custom_endpoint)`."""
    started = time.perf_counter()
    try:
        placement = live.placement
        if placement is None:
            url = upstream_url(relay.settings, service, path_for(bool(relay.settings.speech_endpoint)), query)
            return await open_upstream(
                url,
                relay.credentials,
                extra,
                relay.settings.upstream_connect_attempts,
                max_size=2**20,
                ping_s=relay.settings.upstream_ping_s,
            )
        while True:
            # Once each where another upstream may take the stream (the better retry); else the
            # configured number of tries before the only one is marked down.
            alone = not relay.pool.alternatives(placement)
            try:
                return await open_upstream(
                    placement.url(relay.settings, path_for, query),
                    placement.credentials,
                    extra,
                    relay.settings.upstream_connect_attempts if alone else 1,
                    max_size=2**20,
                    ping_s=relay.settings.upstream_ping_s,
                )
            except UpstreamError as exc:
                moved = await relay.pool.failed(placement, exc)
                if moved is None:
                    raise
                relay.metrics.upstream_failures.inc()
                live.placement = placement = moved
    except UpstreamError:
        relay.metrics.upstream_failures.inc()
        raise
    finally:
        relay.metrics.upstream_connect.observe(time.perf_counter() - started)


async def stop(live: Live, tasks: Sequence[asyncio.Future[None]], upstream: ClientConnection | None) -> None:
    """End both directions of a stream and its Azure connection; the stream is over."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await task
    if upstream is not None:
        with contextlib.suppress(ConnectionClosed):
            await upstream.close()
    live.ended.set()


async def timed(relay: Context, direction: str, send: Awaitable[None]) -> None:
    started = time.perf_counter()
    await send
    relay.metrics.forward.labels(direction).observe(time.perf_counter() - started)


def path_of(message: str) -> bytes | bytearray:
    return usp.peek_path(message[:PATH_WINDOW].encode())
