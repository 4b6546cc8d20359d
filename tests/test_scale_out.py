"""Scale-out on one machine: two token-service processes and two relay processes on one Redis,
under concurrent load. Every global limit holds exactly, whichever replica a request reaches."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speechgate.core.clients import save_client
from speechgate.core.filestore import FileStore
from speechgate.core.keyspace import Keyspace, day
from speechgate.core.store import SecretStore
from tests.fakes.speech import KEY, FakeSpeech, FakeSpeechServer
from tests.support.cli import SPEECHGATE
from tests.support.processes import Process, free_port, token_service_process
from tests.support.services import new_client, prepared_store


@dataclass
class Fleet:
    store: SecretStore
    hash_key: bytes
    token_urls: list[str]
    relay_urls: list[str]

    async def add_client(self, **fields: Any) -> tuple[str, str]:
        policy, secret = new_client(self.hash_key, **fields)
        await save_client(self.store, policy)
        return policy.client_id, secret


@pytest.fixture
def fleet(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[Fleet]:
    store_dir = tmp_path / "store"
    store, hash_key = prepared_store(FileStore(store_dir))
    env = {
        "SPEECHGATE_STORE_DIR": str(store_dir),
        "REDIS_URL": redis_url,
        "SPEECHGATE_REDIS_PREFIX": prefix,
    }
    token_ports = [free_port(), free_port()]
    relay_ports = [free_port(), free_port()]
    with contextlib.ExitStack() as running:
        speech = running.enter_context(FakeSpeechServer(FakeSpeech()))
        for port in token_ports:
            running.enter_context(token_service_process(port, env))
        relay_env = {
            **os.environ,
            **env,
            "SPEECHGATE_SPEECH_ENDPOINT": speech.url,
            "SPEECH_KEY": KEY,
            "SPEECHGATE_JWKS_URL": f"http://127.0.0.1:{token_ports[0]}/.well-known/jwks.json",
            "SPEECHGATE_HEARTBEAT_S": "0.2",
        }
        for port in relay_ports:
            running.enter_context(
                Process([SPEECHGATE, "relay", "--port", str(port)], "relay listening", env=relay_env)
            )
        yield Fleet(
            store,
            hash_key,
            [f"http://127.0.0.1:{p}" for p in token_ports],
            [f"ws://127.0.0.1:{p}/v1/listen?language=en-US" for p in relay_ports],
        )


async def tokens(fleet: Fleet, client: tuple[str, str], subjects: list[str]) -> list[httpx.Response]:
    """One token request per subject, all at once, alternating between the two token services."""
    async with httpx.AsyncClient(timeout=30) as http:
        return await asyncio.gather(
            *(
                http.post(
                    f"{fleet.token_urls[n % 2]}/v1/token",
                    auth=client,
                    data={"grant_type": "client_credentials", "subject": subject},
                )
                for n, subject in enumerate(subjects)
            )
        )


async def open_all(fleet: Fleet, access_tokens: list[str], streams: contextlib.AsyncExitStack) -> list[Any]:
    """Handshakes all at once, alternating between the relays: a connection or the refusal status."""

    async def one(n: int, token: str) -> ClientConnection | int:
        try:
            return await connect(
                fleet.relay_urls[n % 2], additional_headers={"Authorization": f"Bearer {token}"}
            )
        except InvalidStatus as exc:
            return exc.response.status_code

    results = await asyncio.gather(*(one(n, t) for n, t in enumerate(access_tokens)))
    for result in results:
        if isinstance(result, ClientConnection):
            streams.push_async_callback(result.close)
    return results


async def test_token_rate_limit_holds_exactly_across_two_token_services(fleet: Fleet) -> None:
    client = await fleet.add_client(rate_limits={"client": "30/minute", "subject": "", "ip": ""})
    answers = await tokens(fleet, client, [f"user-{n}" for n in range(80)])
    assert Counter(a.status_code for a in answers) == {200: 30, 429: 50}
    assert all(int(a.headers["Retry-After"]) >= 1 for a in answers if a.status_code == 429)


async def test_stream_limits_hold_exactly_across_two_relays(fleet: Fleet) -> None:
    client = await fleet.add_client(max_streams_per_client=5, max_streams_per_subject=2)
    issued = await tokens(fleet, client, [f"user-{n}" for n in range(12)] + ["sam"] * 6)
    access = [a.json()["access_token"] for a in issued]
    async with contextlib.AsyncExitStack() as streams:
        # Six handshakes of one subject at once over both relays: two get in.
        sam = await open_all(fleet, access[12:], streams)
        assert sum(isinstance(r, ClientConnection) for r in sam) == 2
        assert sorted(r for r in sam if isinstance(r, int)) == [429] * 4
        # Twelve other users at once: the client's five streams are two used, three left.
        others = await open_all(fleet, access[:12], streams)
        assert sum(isinstance(r, ClientConnection) for r in others) == 3
        assert [r for r in others if isinstance(r, int)] == [429] * 9


async def test_daily_audio_quota_holds_across_two_relays(fleet: Fleet, redis_url: str, prefix: str) -> None:
    client = await fleet.add_client(audio_s_per_day_client=3, max_streams_per_subject=5)
    access = [a.json()["access_token"] for a in await tokens(fleet, client, ["a", "b", "c", "d"])]
    keys, second = Keyspace(prefix), b"\0" * 32000

    async def stream(n: int) -> int | None:
        """Send 2 s of audio in 100 ms frames, then wait for the relay to close the stream."""
        async with connect(
            fleet.relay_urls[n % 2], additional_headers={"Authorization": f"Bearer {access[n]}"}
        ) as ws:
            with contextlib.suppress(ConnectionClosed):
                for offset in range(0, 2 * len(second), 3200):
                    await ws.send(second[offset % 32000 : offset % 32000 + 3200])
                async for _ in ws:
                    pass
            return ws.close_code

    # Two streams, one per relay, 4 s of audio against a 3 s quota: both are closed for it.
    assert list(await asyncio.wait_for(asyncio.gather(stream(0), stream(1)), 30)) == [4429, 4429]
    used = float(redis.Redis.from_url(redis_url).get(keys.audio_client(client[0], day())) or 0)
    assert used == pytest.approx(4.0)  # every forwarded second is counted, on whichever relay it passed
    async with contextlib.AsyncExitStack() as streams:  # and both relays now refuse the client
        assert await open_all(fleet, access[2:], streams) == [429, 429]
