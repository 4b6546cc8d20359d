"""Two relay processes sharing one Redis: global limits, crashed relays, revocation across them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speechgate.cli.common import Deps
from speechgate.core.filestore import FileStore
from speechgate.core.settings import Settings
from tests.fakes.speech import KEY, FakeSpeech, FakeSpeechServer
from tests.support.cli import Cli
from tests.support.processes import Process, RedisServer, free_port
from tests.support.services import TokenService, prepared_store

SPEECHGATE = str(Path(sys.executable).parent / "speechgate")


@dataclass
class Cluster:
    service: TokenService
    relays: list[Process]
    ports: list[int]

    def url(self, n: int, token: str) -> str:
        return f"ws://127.0.0.1:{self.ports[n]}/v1/listen?language=en-US&access_token={token}"


@pytest.fixture
def cluster(tmp_path: Path, start_service: Any, redis_url: str, prefix: str) -> Iterator[Cluster]:
    store_dir = tmp_path / "store"
    _, hash_key = prepared_store(FileStore(store_dir))
    service: TokenService = start_service(store=FileStore(store_dir), hash_key=hash_key)
    with FakeSpeechServer(FakeSpeech()) as speech:
        ports = [free_port(), free_port()]
        env = {
            **os.environ,
            "SPEECHGATE_STORE_DIR": str(store_dir),
            "REDIS_URL": redis_url,
            "SPEECHGATE_REDIS_PREFIX": prefix,
            "SPEECHGATE_SPEECH_ENDPOINT": speech.url,
            "SPEECH_KEY": KEY,
            "SPEECHGATE_JWKS_URL": f"{service.url}/.well-known/jwks.json",
            "SPEECHGATE_LEASE_S": "1",
            "SPEECHGATE_HEARTBEAT_S": "0.25",
        }
        relays = [
            Process([SPEECHGATE, "relay", "--port", str(port)], "relay listening", env=env).start()
            for port in ports
        ]
        try:
            yield Cluster(service, relays, ports)
        finally:
            for relay in relays:
                relay.stop()


async def refused(url: str) -> int:
    try:
        async with connect(url):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_a_subject_gets_exactly_two_streams_across_both_relays(cluster: Cluster) -> None:
    client = await asyncio.to_thread(cluster.service.add_client, max_streams_per_subject=2)
    token = (await asyncio.to_thread(cluster.service.token, *client, subject="alice")).json()["access_token"]
    async with contextlib.AsyncExitStack() as streams:
        await streams.enter_async_context(connect(cluster.url(0, token)))
        await streams.enter_async_context(connect(cluster.url(1, token)))
        assert await refused(cluster.url(0, token)) == 429
        assert await refused(cluster.url(1, token)) == 429


async def test_a_killed_relay_frees_its_slots_within_the_lease(cluster: Cluster) -> None:
    client = await asyncio.to_thread(cluster.service.add_client, max_streams_per_subject=1)
    token = (await asyncio.to_thread(cluster.service.token, *client, subject="bob")).json()["access_token"]
    ws = await connect(cluster.url(0, token))
    assert await refused(cluster.url(1, token)) == 429
    proc = cluster.relays[0].proc
    assert proc is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed_at = time.monotonic()
    while await refused(cluster.url(1, token)) != 101:  # the lease is 1 s; nobody renews it now
        assert time.monotonic() - killed_at < 5, "the dead relay's slot was never freed"
        await asyncio.sleep(0.1)
    with contextlib.suppress(ConnectionClosed):
        await ws.close()


async def test_revocation_reaches_a_stream_on_the_other_relay_within_a_second(cluster: Cluster) -> None:
    client = await asyncio.to_thread(cluster.service.add_client)
    token = (await asyncio.to_thread(cluster.service.token, *client)).json()["access_token"]
    ws: ClientConnection
    async with connect(cluster.url(1, token)) as ws:
        await ws.send(b"\0" * 3200)
        started = time.monotonic()
        response = await asyncio.to_thread(
            cluster.service.http.post, "/v1/revoke", auth=client, data={"token": token}
        )
        assert response.status_code == 200
        with contextlib.suppress(ConnectionClosed):
            async for _ in ws:
                pass
        assert ws.close_code == 1008
        assert time.monotonic() - started < 1.0


async def test_relay_keeps_admitting_streams_while_redis_is_down(tmp_path: Path, stack_factory: Any) -> None:
    own = RedisServer(tmp_path)
    own.start()
    try:
        stack = await asyncio.to_thread(stack_factory, redis_url=own.url)
        client = await asyncio.to_thread(stack.service.add_client)
        token = (await asyncio.to_thread(stack.service.token, *client)).json()["access_token"]
        url = f"{stack.relay.url}/v1/listen?language=en-US&access_token={token}"
        own.stop()
        async with connect(url) as ws:  # per-process rules while Redis is away
            await ws.send(b"\0" * 3200)
            await ws.send('{"type": "end"}')
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass
            assert ws.close_code == 1000
        async with httpx.AsyncClient() as http:
            ready = f"http://127.0.0.1:{stack.relay.port}/readyz"
            assert (await http.get(ready)).json()["status"] == "degraded"
            own.start()
            deadline = time.monotonic() + 10
            while (await http.get(ready)).json()["status"] != "ready":
                assert time.monotonic() < deadline, "the relay never went back to Redis"
                await asyncio.sleep(0.1)
    finally:
        own.stop()


async def test_a_revoked_signing_key_stays_refused_while_redis_is_down(
    tmp_path: Path, stack_factory: Any
) -> None:
    """The relay remembers the revocation it heard: with Redis gone it cannot read the deny entry,
    and a token service that missed the event (here: it listens on another Redis) still publishes
    the key in its JWKS."""
    own = RedisServer(tmp_path)
    own.start()
    try:
        stack = await asyncio.to_thread(stack_factory, redis_url=own.url)
        settings = Settings(redis_url=own.url, redis_prefix=stack.service.settings.redis_prefix)
        cli = Cli(Deps(settings=settings, open_store=lambda _: stack.service.store), settings)
        client = await asyncio.to_thread(stack.service.add_client)
        token = (await asyncio.to_thread(stack.service.token, *client)).json()["access_token"]
        kid = jwt.get_unverified_header(token)["kid"]
        url = f"{stack.relay.url}/v1/listen?language=en-US&access_token={token}"
        async with connect(url) as ws:
            await ws.send(b"\0" * 3200)
            await asyncio.to_thread(cli, "keys", "revoke-signing", "--kid", kid, "--yes")
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass
            assert ws.close_code == 1008  # the relay heard the event
        own.stop()
        jwks = (await asyncio.to_thread(stack.service.http.get, "/.well-known/jwks.json")).json()
        assert kid in {k["kid"] for k in jwks["keys"]}
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url):
                pass
        assert refused.value.response.status_code == 401
        assert b"signing key revoked" in refused.value.response.body
    finally:
        own.stop()
