"""The session rules hold exactly: for streams of any age, and through a Redis that freezes or dies.

Each test runs a real relay against a real redis-server (its own where it stops or freezes it) and
crosses every time limit involved (lease keys' lifetime, heartbeats during an outage).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speechgate.core.keyspace import Keyspace, day
from speechgate.relay import usp
from tests.support.processes import RedisServer, wait_until
from tests.support.relays import Stack, refusal_status

FRAME = b"\x01\x00" * 1600  # 100 ms of 16 kHz 16-bit mono


def listen_url(stack: Stack, token: str) -> str:
    return f"{stack.relay.url}/v1/listen?language=en-US&access_token={token}"


async def token_for(stack: Stack, client: tuple[str, str], **params: str) -> str:
    token: str = await asyncio.to_thread(stack.token, client, **params)
    return token


async def stream_real_time(sockets: list[ClientConnection], frames: int) -> None:
    """Send `frames` 100-ms frames on each socket at real-time pace (the audio's own clock)."""
    started = time.monotonic()
    for n in range(frames):
        for ws in sockets:
            await ws.send(FRAME)
        await asyncio.sleep(max(0.0, started + (n + 1) * 0.1 - time.monotonic()))


async def finish(ws: ClientConnection) -> int | None:
    await ws.send(json.dumps({"type": "end"}))
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            pass
    return ws.close_code


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.process.proc.pid, signal.SIGCONT)  # a test that froze it
        server.stop()


async def test_live_streams_count_however_long_they_live(stack_factory: Any) -> None:
    """The lease keys outlive their first TTL (twice the lease): two streams held for three
    leases still fill a limit of two."""
    stack: Stack = await asyncio.to_thread(stack_factory, lease_s=0.5, heartbeat_s=0.1)
    client = await asyncio.to_thread(stack.service.add_client, max_streams_per_subject=2)
    tokens = [await token_for(stack, client) for _ in range(3)]
    async with connect(listen_url(stack, tokens[0])) as a, connect(listen_url(stack, tokens[1])) as b:
        await stream_real_time([a, b], 15)  # 1.5 s: past the 1 s the keys got at admission
        with pytest.raises(InvalidStatus) as refused:
            async with connect(listen_url(stack, tokens[2])):
                pass
        assert refused.value.response.status_code == 429
        assert b"too_many_streams" in refused.value.response.body
        assert await finish(a) == 1000
        assert await finish(b) == 1000
    async with connect(listen_url(stack, tokens[2])) as c:  # the slots are free once they end
        assert await finish(c) == 1000


def audio_today(server: RedisServer, stack: Stack, client_id: str) -> float:
    keys = Keyspace(stack.service.settings.redis_prefix)
    with server.client() as client:
        return float(client.get(keys.audio_client(client_id, day())) or 0)


async def test_audio_sent_while_redis_is_frozen_is_counted_once(
    stack_factory: Any, own_redis: RedisServer
) -> None:
    """Heartbeats time out against a frozen Redis (its commands still run when it thaws): every
    second of audio is counted once, none lost, none twice."""
    stack: Stack = await asyncio.to_thread(stack_factory, redis_url=own_redis.url, heartbeat_s=0.1)
    client = await asyncio.to_thread(stack.service.add_client)
    token = await token_for(stack, client)
    assert own_redis.process is not None
    assert own_redis.process.proc is not None
    pid = own_redis.process.proc.pid
    async with connect(listen_url(stack, token)) as ws:
        await stream_real_time([ws], 10)
        os.kill(pid, signal.SIGSTOP)
        await stream_real_time([ws], 20)  # heartbeats fail meanwhile (0.5 s socket timeouts)
        os.kill(pid, signal.SIGCONT)
        await stream_real_time([ws], 10)
        assert await finish(ws) == 1000
    assert audio_today(own_redis, stack, client[0]) == pytest.approx(4.0, abs=1e-6)


async def test_streams_opened_while_redis_was_dead_are_counted_when_it_returns(
    stack_factory: Any, own_redis: RedisServer
) -> None:
    """A stream admitted by the per-process rules moves back to the shared ones: its leases and
    all its audio, the outage's included, reach Redis."""
    stack: Stack = await asyncio.to_thread(stack_factory, redis_url=own_redis.url, heartbeat_s=0.1)
    client = await asyncio.to_thread(stack.service.add_client, max_streams_per_subject=1)
    token, second = await token_for(stack, client), await token_for(stack, client)
    own_redis.stop()
    async with connect(listen_url(stack, token)) as ws:
        await stream_real_time([ws], 10)
        own_redis.start()
        await stream_real_time([ws], 20)  # the relay finds Redis within a second and moves over
        with pytest.raises(InvalidStatus) as refused:  # the shared rules see the stream
            async with connect(listen_url(stack, second)):
                pass
        assert refused.value.response.status_code == 429
        assert await finish(ws) == 1000
    assert audio_today(own_redis, stack, client[0]) == pytest.approx(3.0, abs=1e-6)


def kill_and_restart(server: RedisServer) -> None:
    """SIGKILL, as an OOM kill or a node loss would, then the same server again on its port."""
    assert server.process is not None
    assert server.process.proc is not None
    server.process.proc.kill()
    server.process.proc.wait()
    server.process = None
    server.start()


def test_shared_rate_limits_hold_within_a_second_of_redis_restarting(
    start_service: Any, own_redis: RedisServer
) -> None:
    """Pools full of connections to the killed server must not flap to per-process limits: a
    fresh client gets exactly its limit from two token services right after Redis is back."""
    first = start_service(redis_url=own_redis.url)
    second = start_service(store=first.store, hash_key=first.hash_key, redis_url=own_redis.url)
    services = [first, second]  # two services on one store and one Redis
    warm = services[0].add_client(rate_limits={"client": "", "subject": "", "ip": ""})
    fresh = services[0].add_client(rate_limits={"client": "30/minute", "subject": "", "ip": ""})

    def burst(client: tuple[str, str], count: int) -> list[int]:
        def one(n: int) -> int:
            status: int = services[n % 2].token(*client).status_code
            return status

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(one, range(count)))

    assert set(burst(warm, 64)) == {200}  # every pool holds several idle connections now
    kill_and_restart(own_redis)
    for service in services:  # what the README promises: shared limits within a second
        assert wait_until(lambda s=service: s.http.get("/readyz").json()["status"] == "ready", 1.0)
    results = burst(fresh, 80)
    assert results.count(200) == 30
    assert results.count(429) == 50


async def test_relay_admits_by_the_shared_rules_right_after_redis_restarts(
    stack_factory: Any, own_redis: RedisServer
) -> None:
    """Handshakes right after a restart go to Redis (their leases are there at once), not to the
    per-process rules because a pooled connection to the killed server failed."""
    stack: Stack = await asyncio.to_thread(stack_factory, redis_url=own_redis.url, heartbeat_s=60)
    client = await asyncio.to_thread(stack.service.add_client, max_streams_per_subject=10)
    tokens = [await token_for(stack, client) for _ in range(8)]

    async def open_all(batch: list[str]) -> list[ClientConnection]:
        return list(await asyncio.gather(*(connect(listen_url(stack, t)) for t in batch)))

    for ws in await open_all(tokens[:4]):  # the admission script's connections, pooled
        assert await finish(ws) == 1000
    keys = Keyspace(stack.service.settings.redis_prefix)
    with own_redis.client() as redis_client:  # the relay has released them: nothing is under way
        assert wait_until(lambda: redis_client.zcard(keys.lease_client(client[0])) == 0)
    await asyncio.to_thread(kill_and_restart, own_redis)
    opened = await open_all(tokens[4:])
    with own_redis.client() as redis_client:
        assert redis_client.zcard(keys.lease_client(client[0])) == 4
    for ws in opened:
        assert await finish(ws) == 1000


async def never_reading_app(stack: Stack, result_bytes: int) -> tuple[str, socket.socket]:
    """A token and a socket with a small receive buffer, to a relay whose Azure sends results of
    `result_bytes` ten times a second of audio: for an app that never reads them."""
    stack.fake.text = "x" * result_bytes
    stack.fake.phrase_every_s = 0.1
    client = await asyncio.to_thread(stack.service.add_client)
    token = await token_for(stack, client)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(("127.0.0.1", stack.relay.port))
    return token, sock


async def test_a_plain_app_that_never_reads_its_results_is_closed(
    stack_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Results it does not read pile up in the kernel, then in the relay: once its socket has
    been full for a keepalive period, the relay closes the stream instead of holding its audio.
    (The close frame waits behind megabytes the app never reads: the relay then drops the
    connection, so the app itself sees 1006; the relay's log says why.)"""
    caplog.set_level(logging.INFO)
    stack: Stack = await asyncio.to_thread(stack_factory, keepalive_s=0.5)
    token, sock = await never_reading_app(stack, 900_000)  # results of 900 kB: buffers fill in a few
    async with connect(listen_url(stack, token), sock=sock, max_queue=1, max_size=2**21) as ws:
        await stream_real_time([ws], 10)  # ~9 MB of results: more than the kernel holds

        def ended() -> list[Any]:
            return [r for r in list(caplog.records) if getattr(r, "fields", {}).get("event") == "stream"]

        # The relay gives up on the stream without the app reading anything.
        assert await asyncio.to_thread(wait_until, ended, 10.0), "the relay kept a stream nobody reads"
        # And lets go of the connection: its close frame cannot be written to a socket nobody
        # reads, so the relay aborts it once the close has had its time, rather than holding the
        # fd and its buffers until the app leaves. The gauge follows the stream.
        assert await asyncio.to_thread(wait_until, lambda: not stack.relay.server.connections, 15.0)
        assert stack.relay.relay.metrics.active.labels("plain")._value.get() == 0
    (record,) = ended()
    assert record.fields["close_code"] == 1008
    assert record.fields["outcome"] == "the app is not reading its results"


async def test_the_plain_door_stops_reconnecting_to_an_azure_that_makes_no_headway(stack: Stack) -> None:
    """Azure closes every connection after partial results but before any final: partials are no
    progress (each new connection replays the same audio and gets them again), so the relay gives
    up after a few tries with backoff instead of reconnecting without end."""
    stack.fake.close_after_s = 0.3
    stack.fake.phrase_every_s = 60.0  # partials every half second of audio, never a final
    client = await asyncio.to_thread(stack.service.add_client)
    token = await token_for(stack, client)
    async with connect(listen_url(stack, token)) as ws:
        with contextlib.suppress(ConnectionClosed):
            await stream_real_time([ws], 40)
        await asyncio.wait_for(ws.wait_closed(), 10)  # the relay has given up by now
    assert ws.close_code == 1011
    assert stack.fake.connections <= 4  # the first, and three fruitless tries at most


def relay_ready(stack: Stack) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"http://127.0.0.1:{stack.relay.port}/readyz").json()
    return answer


@pytest.mark.parametrize("fault", ["killed", "restarted", "frozen"])
async def test_a_subject_at_its_limit_gets_no_stream_more_during_or_right_after_an_outage(
    stack_factory: Any, own_redis: RedisServer, fault: str
) -> None:
    """Once, during an outage a relay counted only the streams it had admitted itself (a subject
    limited to 2 got 4 on one relay), and right after Redis came back the live streams' leases
    were not there yet (1-9 admissions over the limit per outage). The heartbeat is slow here, as
    in production (2 s): its next beat must not be what restores the limit. A frozen Redis hangs
    past the lease (here 2 s): when it thaws, the leases it holds have lapsed."""
    lease_s = 2.0 if fault == "frozen" else 15.0
    stack: Stack = await asyncio.to_thread(
        stack_factory, redis_url=own_redis.url, heartbeat_s=5.0, lease_s=lease_s
    )
    client = await asyncio.to_thread(stack.service.add_client, max_streams_per_subject=2)
    tokens = [await token_for(stack, client, subject="alice") for _ in range(6)]
    assert own_redis.process is not None
    assert own_redis.process.proc is not None
    pid = own_redis.process.proc.pid
    held = [await connect(listen_url(stack, t)) for t in tokens[:2]]
    try:
        assert await refusal_status(listen_url(stack, tokens[2])) == 429  # the limit, through Redis
        frozen_at = time.monotonic()
        if fault == "frozen":
            os.kill(pid, signal.SIGSTOP)  # a hang: commands time out (0.5 s) into the fallback
        else:
            own_redis.process.proc.kill()  # SIGKILL: no goodbye to any client
            own_redis.process.proc.wait()
            own_redis.process = None
        # During the outage: the two live streams count in this relay's own rules.
        assert await refusal_status(listen_url(stack, tokens[3])) == 429
        assert relay_ready(stack)["checks"]["redis"] != "ok"  # the refusal came from the fallback
        assert await refusal_status(listen_url(stack, tokens[4])) == 429
        if fault != "killed":
            if fault == "restarted":
                await asyncio.to_thread(own_redis.start)  # empty: no lease survived
            else:
                # The hang's length is the fault itself: past the lease, and past the admissions
                # sent into the hang, which the server runs when it thaws.
                await asyncio.sleep(max(0.0, frozen_at + 2.5 * lease_s - time.monotonic()))
                os.kill(pid, signal.SIGCONT)
            assert await asyncio.to_thread(wait_until, lambda: relay_ready(stack)["checks"]["redis"] == "ok")
            # The very first admission after Redis is back holds the limit.
            assert await refusal_status(listen_url(stack, tokens[5])) == 429
            keys = Keyspace(stack.service.settings.redis_prefix)
            with own_redis.client() as redis_client:
                now_ms = time.time() * 1000
                live = redis_client.zcount(keys.lease_subject(client[0], "alice"), now_ms, "+inf")
                assert live == 2
    finally:
        for ws in held:
            await ws.close()


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "message-path"])
async def test_an_azure_door_app_that_never_reads_its_results_is_closed(
    stack_factory: Any, caplog: pytest.LogCaptureFixture, splice: bool
) -> None:
    """The plain door's rule on the Azure door too: an app that sends audio and never reads once
    held its slot until its session's end (the splice answers the app's pings itself, so nothing
    else ended it). Its socket full for a keepalive period, the stream ends, and the relay lets go
    of the connection."""
    caplog.set_level(logging.INFO)
    stack: Stack = await asyncio.to_thread(stack_factory, keepalive_s=0.5, splice=splice)
    token, sock = await never_reading_app(stack, 60_000)  # within a frame's bound: 600 kB a second
    url = f"{stack.relay.url}/speech/recognition/conversation/cognitiveservices/v1?language=en-US"
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(url, sock=sock, additional_headers=headers, max_queue=1, max_size=2**21) as ws:
        request_id = usp.new_request_id()
        await ws.send(usp.encode_text("speech.context", request_id, {}))
        await ws.send(usp.encode_binary("audio", request_id, usp.riff_header()))

        def ended() -> list[Any]:
            return [r for r in list(caplog.records) if getattr(r, "fields", {}).get("event") == "stream"]

        started = time.monotonic()
        with contextlib.suppress(ConnectionClosed):
            while not ended() and time.monotonic() - started < 20:  # real time, ~9 MB of results
                await ws.send(usp.encode_binary("audio", request_id, FRAME))
                await asyncio.sleep(0.1)
        assert ended(), "the relay kept a stream nobody reads"
        assert await asyncio.to_thread(wait_until, lambda: not stack.relay.server.connections, 15.0)
    (record,) = ended()
    if splice:  # the splice answers pings itself: its own rule ends the stream, with the reason
        assert record.fields["close_code"] == 4000
        assert record.fields["outcome"] == "the app is not reading its results"
    # On the message path websockets' keepalive may come first: its ping goes unanswered too.
