"""The Azure-compatible door: the official SDKs' frames, verbatim, to Azure and back (the splice,
or this message pump when the splice is off)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from speechgate.relay import usp
from speechgate.relay.doors import connect, path_of, resume, stop, timed
from speechgate.relay.endpoints import upstream_path
from speechgate.relay.live import NOT_READING, Context, Live, Pending, upstream_hung
from speechgate.relay.splice import SAMPLE_MASK, Splice, azure_closed, can_take_over
from speechgate.relay.upstream import UpstreamError, hung


async def serve(relay: Context, live: Live, pending: Pending) -> None:
    request = live.connection.request
    assert request is not None
    extra = {k: v for k, v in request.headers.raw_items() if k.lower() in ("x-connectionid", "user-agent")}
    try:
        upstream = await connect(
            relay,
            live,
            pending.endpoint.service,
            lambda custom: upstream_path(pending.endpoint, pending.path, custom),
            pending.query,
            extra,
        )
    except UpstreamError as exc:
        resume(live.connection)
        live.end(4000, 1013, f"{relay.upstream_name} unavailable: {exc}")
        return
    live.upstream = upstream
    client = live.connection
    if relay.settings.splice and can_take_over(client) and can_take_over(upstream):
        # No await from the check to the takeover: no data can slip in between.
        live.splice = Splice(relay, live, client, upstream)
        live.splice.start()
        try:
            await live.splice.done
        finally:
            live.ended.set()
        return
    resume(client)

    async def app_to_azure() -> None:
        count = 0
        async for message in client:
            if isinstance(message, bytes):
                if not live.app_binary(len(message), functools.partial(_read, message), True):
                    return
                telemetry = False
            else:
                read = live.app_text(message.encode())
                if read is None:
                    return
                telemetry = read.path.lower() == "telemetry"
            count += 1
            if count & SAMPLE_MASK:
                await upstream.send(message)
            else:
                await timed(relay, "up", upstream.send(message))
            if live.drain_timer is not None and telemetry:
                live.drained()  # the app's last word on its turn has gone to Azure

    async def azure_to_app() -> None:
        async for message in upstream:
            try:  # an app that sends audio and never reads must not hold its slot
                async with asyncio.timeout(relay.settings.keepalive_s):
                    await client.send(message)
            except TimeoutError:
                live.end(4000, 1008, NOT_READING)
                return
            if type(message) is str:
                path = path_of(message)
                if live.turn_audio_at is not None and path in usp.RESULTS:
                    relay.metrics.first_result.labels("azure").observe(
                        time.perf_counter() - live.turn_audio_at
                    )
                    live.turn_audio_at = None
                if path == usp.TURN_END_BYTES:
                    live.turn_ended()

    await _pump(relay, live, app_to_azure(), azure_to_app(), upstream)


def _read(message: bytes, at: int, count: int) -> bytes:
    return message[at : at + count]


async def _pump(relay: Context, live: Live, outgoing: Any, incoming: Any, upstream: ClientConnection) -> None:
    tasks = [asyncio.ensure_future(outgoing), asyncio.ensure_future(incoming)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if live.stream.closing_reason is None:
            if tasks[1] in done and hung(upstream):
                await upstream_hung(relay, live)
            if tasks[1] in done and live.connection.close_code is None:
                code, reason = azure_closed(
                    upstream.close_code or 1006,
                    upstream.close_reason or "",
                    live.in_turn,
                    relay.upstream_name,
                )
                live.code = code
                with contextlib.suppress(ConnectionClosed):
                    await live.connection.close(code, reason)
            else:
                with contextlib.suppress(ConnectionClosed):
                    await upstream.close(1000, "client done")
    finally:
        await stop(live, tasks, upstream)
