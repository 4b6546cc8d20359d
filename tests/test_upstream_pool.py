"""The upstream pool: three fake Azure Speech resources (one throttling with 429 after N streams,
one dropping connections, one healthy) behind two relay processes on one Redis, the pool managed
with the real CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import Result
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from speechgate.cli.common import Deps
from speechgate.core.filestore import FileStore
from speechgate.core.settings import Settings
from speechgate.core.store import MemoryStore
from speechgate.core.upstreams import Upstream
from speechgate.relay.pool import Want, candidates
from tests.fakes.speech import KEY, FakeSpeech, FakeSpeechServer
from tests.support.cli import SPEECHGATE, Cli, audit_lines
from tests.support.processes import Process, free_port, frozen_speech_service
from tests.support.services import TokenService, prepared_store

OTHER_KEY = "fedcba9876543210fedcba9876543210"  # an Azure resource's second key (slot key2)
BACKOFF_S = 1.0


@dataclass
class Pool:
    service: TokenService
    cli: Cli
    fakes: dict[str, FakeSpeech]
    urls: dict[str, str]
    relays: list[Process]
    ports: list[int]
    streams: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def run(self, *args: str, input: str | None = None) -> Result:
        """The CLI (which runs its own event loop) in a thread."""
        return await asyncio.to_thread(self.cli, *args, input=input)

    async def json(self, *args: str) -> Any:
        return await asyncio.to_thread(self.cli.json, *args)

    async def add(self, name: str, limit: int, *options: str) -> None:
        args = ["--endpoint", self.urls[name], "--key-stdin", "--limit", str(limit), *options]
        await self.run("upstreams", "add", name, *args, input=KEY + "\n")

    def url(self, n: int, token: str) -> str:
        return f"ws://127.0.0.1:{self.ports[n]}/v1/listen?language=en-US&access_token={token}"

    async def token(self, client: tuple[str, str], subject: str = "user") -> str:
        response = await asyncio.to_thread(self.service.token, *client, subject=subject)
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    async def stream(self, n: int, token: str) -> ClientConnection:
        """A stream through relay `n` that has reached its upstream: its first result came."""
        ws = await self.streams.enter_async_context(connect(self.url(n, token)))
        await ws.send(b"\0" * 16000)  # half a second: the fake's first hypothesis
        try:
            event = json.loads(await asyncio.wait_for(ws.recv(), 10))
        except (TimeoutError, ConnectionClosed):
            logs = "\n".join(line for relay in self.relays for line in relay.output[-20:])
            raise AssertionError(
                f"no result on relay {n} ({ws.close_code} {ws.close_reason}):\n{logs}"
            ) from None
        assert event["type"] == "partial", event
        return ws

    def connections(self) -> dict[str, int]:
        return {name: fake.connections for name, fake in self.fakes.items()}

    async def metrics(self, n: int) -> str:
        async with httpx.AsyncClient() as http:
            return (await http.get(f"http://127.0.0.1:{self.ports[n]}/metrics")).text


@pytest.fixture
def pool(tmp_path: Path, start_service: Any, redis_url: str, prefix: str) -> Iterator[Pool]:
    store_dir = tmp_path / "store"
    _, hash_key = prepared_store(FileStore(store_dir))
    service: TokenService = start_service(store=FileStore(store_dir), hash_key=hash_key)
    settings = Settings(redis_url=redis_url, redis_prefix=prefix, store_dir=store_dir)
    cli = Cli(Deps(settings=settings), settings)
    fakes = {
        "throttled": FakeSpeech(max_streams=1),  # Azure's 429 beyond its concurrency
        "dropping": FakeSpeech(drop=True),
        "healthy": FakeSpeech(),
        "eu": FakeSpeech(),
        "us": FakeSpeech(),
    }
    with contextlib.ExitStack() as servers:
        urls = {name: servers.enter_context(FakeSpeechServer(fake)).url for name, fake in fakes.items()}
        ports = [free_port(), free_port()]
        env = {
            **os.environ,
            "SPEECHGATE_STORE_DIR": str(store_dir),
            "REDIS_URL": redis_url,
            "SPEECHGATE_REDIS_PREFIX": prefix,
            "SPEECHGATE_JWKS_URL": f"{service.url}/.well-known/jwks.json",
            "SPEECHGATE_LEASE_S": "1",
            "SPEECHGATE_HEARTBEAT_S": "0.25",
            "SPEECHGATE_UPSTREAM_BACKOFF_S": str(BACKOFF_S),
        }
        env.pop("SPEECH_KEY", None)
        relays = [
            Process([SPEECHGATE, "relay", "--port", str(port)], "relay listening", env=env).start()
            for port in ports
        ]
        try:
            yield Pool(service, cli, fakes, urls, relays, ports)
        finally:
            for relay in relays:
                relay.stop()


async def refusal(url: str) -> tuple[int, dict[str, Any], str | None]:
    try:
        async with connect(url):
            return 101, {}, None
    except InvalidStatus as exc:
        response = exc.response
        return response.status_code, json.loads(response.body or b"{}"), response.headers.get("Retry-After")


async def test_streams_spread_by_live_count_across_two_relays(pool: Pool) -> None:
    for name in ("healthy", "eu", "us"):
        await pool.add(name, 4)
    client = await asyncio.to_thread(pool.service.add_client, max_streams_per_subject=10)
    async with pool.streams:
        for n in range(6):
            await pool.stream(n % 2, await pool.token(client))
        assert {k: v for k, v in pool.connections().items() if k in ("healthy", "eu", "us")} == {
            "healthy": 2,
            "eu": 2,
            "us": 2,
        }
        listed = {row["name"]: row["live"] for row in await pool.json("upstreams", "list")}
        assert listed == {"healthy": 2, "eu": 2, "us": 2}


async def test_a_full_pool_refuses_with_429_naming_capacity_not_the_quota(pool: Pool) -> None:
    await pool.add("healthy", 1)
    await pool.add("eu", 1)
    client = await asyncio.to_thread(pool.service.add_client, max_streams_per_subject=10)
    async with pool.streams:
        await pool.stream(0, await pool.token(client))
        await pool.stream(1, await pool.token(client))
        status, body, retry = await refusal(pool.url(0, await pool.token(client)))
    assert status == 429
    assert body["error"] == "upstream_capacity"
    assert "capacity" in body["message"]
    assert "quota" not in body["message"]
    assert retry is not None
    assert int(retry) >= 1
    assert 'speechgate_relay_refusals_total{reason="upstream_capacity"} 1.0' in await pool.metrics(0)


async def test_a_throttling_upstream_is_avoided_at_once_and_used_again_after_the_backoff(pool: Pool) -> None:
    await pool.add("throttled", 10)
    await pool.add("healthy", 10)
    client = await asyncio.to_thread(pool.service.add_client, max_streams_per_subject=10)
    async with pool.streams:
        # One on each: the second goes where the first did not (ties are broken at random).
        pair = [
            await pool.stream(0, await pool.token(client)),
            await pool.stream(1, await pool.token(client)),
        ]
        assert (pool.connections()["throttled"], pool.connections()["healthy"]) == (1, 1)
        # Equal use again and again: until a stream meets the throttled one's 429 and moves on.
        for _ in range(20):
            await pool.stream(0, await pool.token(client))
            if pool.fakes["throttled"].refused:
                break
        refused_at = time.monotonic()
        assert pool.fakes["throttled"].refused == 1
        healthy = pool.connections()["healthy"]
        # Through the other relay too, within a second: the mark is shared through Redis.
        await pool.stream(1, await pool.token(client))
        assert time.monotonic() - refused_at < 1.0
        assert pool.fakes["throttled"].refused == 1  # not asked again
        assert pool.connections()["healthy"] == healthy + 1
        metrics = await pool.metrics(0)
        assert 'speechgate_upstream_refusals_total{reason="throttled",upstream="throttled"} 1.0' in metrics
        for ws in pair:  # the throttled one's stream among them
            await ws.close()
        await asyncio.sleep(BACKOFF_S - (time.monotonic() - refused_at))  # the backoff is time itself
        await pool.stream(0, await pool.token(client))
        assert pool.connections()["throttled"] == 2  # used again, and took the stream
        assert pool.fakes["throttled"].refused == 1


async def test_an_upstream_dropping_connections_is_avoided_and_the_stream_moves_on(pool: Pool) -> None:
    await pool.add("dropping", 10)
    await pool.add("healthy", 10)
    client = await asyncio.to_thread(pool.service.add_client, max_streams_per_subject=10)
    async with pool.streams:
        await pool.stream(0, await pool.token(client))
        await pool.stream(1, await pool.token(client))
        assert pool.connections()["healthy"] == 2
    # On whichever relay met it (the first stream's choice is a tie, broken at random).
    metrics = await pool.metrics(0) + await pool.metrics(1)
    assert 'speechgate_upstream_refusals_total{reason="unreachable",upstream="dropping"} 1.0' in metrics
    assert pool.fakes["dropping"].dropped == 1  # tried once; the other stream went straight to healthy


async def test_a_killed_relays_upstream_slots_come_back_within_the_lease(pool: Pool) -> None:
    await pool.add("healthy", 1)
    client = await asyncio.to_thread(pool.service.add_client, max_streams_per_subject=10)
    ws = await connect(pool.url(0, await pool.token(client)))
    await ws.send(b"\0" * 16000)
    assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "partial"
    assert (await refusal(pool.url(1, await pool.token(client))))[0] == 429
    proc = pool.relays[0].proc
    assert proc is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    killed_at = time.monotonic()
    while (await refusal(pool.url(1, await pool.token(client))))[0] != 101:  # the lease is 1 s
        assert time.monotonic() - killed_at < 5, "the dead relay's upstream slot was never freed"
        await asyncio.sleep(0.1)
    with contextlib.suppress(ConnectionClosed, OSError):
        await ws.close()


async def test_zone_restricted_clients_never_reach_another_zone(pool: Pool) -> None:
    await pool.add("eu", 1, "--zone", "eu")
    await pool.add("us", 10, "--zone", "us")
    eu_only = await asyncio.to_thread(pool.service.add_client, max_streams_per_subject=10, zones=["eu"])
    anywhere = await asyncio.to_thread(pool.service.add_client, max_streams_per_subject=10)
    async with pool.streams:
        await pool.stream(0, await pool.token(eu_only))
        status, body, _ = await refusal(pool.url(1, await pool.token(eu_only)))  # eu is full: not us
        assert (status, body["error"]) == (429, "upstream_capacity")
        assert pool.connections()["us"] == 0
        await pool.stream(1, await pool.token(anywhere))  # another client may go to us
        assert pool.connections()["us"] == 1
    pool.fakes["eu"].refuse_status = 503  # eu fails: its clients do not fail over to us
    ws = await connect(pool.url(0, await pool.token(eu_only)))
    with contextlib.suppress(ConnectionClosed):
        await ws.send(b"\0" * 3200)
        async for _ in ws:
            pass
    assert ws.close_code == 1013
    assert pool.connections()["us"] == 1


async def test_rotating_one_upstreams_key_under_load_breaks_no_stream(pool: Pool) -> None:
    await pool.add("healthy", 20)
    pool.fakes["healthy"].extra_keys.add(OTHER_KEY)  # Azure's second key: valid too
    client = await asyncio.to_thread(pool.service.add_client, max_streams_per_subject=20)
    async with pool.streams:
        before = [await pool.stream(n % 2, await pool.token(client)) for n in range(4)]
        result = await pool.run(
            "keys", "rotate-speech", "--upstream", "healthy", "--from-stdin", "--yes", input=OTHER_KEY + "\n"
        )
        assert audit_lines(result)[0]["upstream"] == "healthy"
        after = [await pool.stream(n % 2, await pool.token(client)) for n in range(4)]
        keys = [h["headers"]["Ocp-Apim-Subscription-Key"] for h in pool.fakes["healthy"].handshakes]
        assert keys == [KEY] * 4 + [OTHER_KEY] * 4
        for ws in before + after:  # every stream, old key or new, finishes its audio
            await ws.send(b"\0" * 32000)
            await ws.send('{"type": "end"}')
            events = [json.loads(m)["type"] async for m in ws]
            assert "final" in events
            assert ws.close_code == 1000


async def test_drain_sends_no_new_streams_and_lets_the_live_ones_finish(pool: Pool) -> None:
    await pool.add("healthy", 10)
    await pool.add("eu", 10)
    client = await asyncio.to_thread(pool.service.add_client, max_streams_per_subject=10)
    async with pool.streams:
        live = await pool.stream(0, await pool.token(client))  # on healthy
        result = await pool.run("upstreams", "drain", "healthy", "--yes")
        assert audit_lines(result)[0]["audit"] == "upstreams.drain"
        drained_at = time.monotonic()
        while True:  # every relay applies it within a second (the reload event)
            before = pool.connections()["healthy"]
            await pool.stream(1, await pool.token(client))
            if pool.connections()["healthy"] == before:
                break
            assert time.monotonic() - drained_at < 1.0
        await live.send(b"\0" * 32000)
        await live.send('{"type": "end"}')
        assert "final" in [json.loads(m)["type"] async for m in live]
        assert live.close_code == 1000
        ended_at = time.monotonic()
        while (shown := await pool.json("upstreams", "show", "healthy"))["live"] != 0:
            assert time.monotonic() - ended_at < 1.0, "the ended stream's slot was not given back"
        assert shown["state"] == "draining"
        await pool.run("upstreams", "enable", "healthy")
        assert (await pool.json("upstreams", "show", "healthy"))["state"] == "active"


@pytest.fixture
def cli(redis_url: str, prefix: str) -> Cli:
    store = MemoryStore()
    settings = Settings(redis_url=redis_url, redis_prefix=prefix)
    return Cli(Deps(settings=settings, open_store=lambda _: store), settings)


def test_the_cli_manages_the_pool_with_json_audit_lines_and_clear_refusals(cli: Cli) -> None:
    assert cli.json("upstreams", "list") == []
    assert "no pool" in cli("upstreams", "list").stdout
    refused = cli("upstreams", "add", "west", "--region", "westeurope", "--limit", "100", code=2)
    assert "--key-stdin" in refused.stderr  # a resource needs its key or Entra ID
    refused = cli("upstreams", "add", "west", "--region", "westeurope", "--limit", "9", "--key-stdin",
                  input="not a key\n", code=2)  # fmt: skip
    assert "Azure Speech key" in refused.stderr
    refused = cli("upstreams", "add", "west", "--endpoint", "http://x", "--key-stdin", "--limit", "9",
                  input=KEY + "\n", code=2)  # fmt: skip
    assert "wss://" in refused.stderr
    added = cli("upstreams", "add", "west", "--region", "westeurope", "--limit", "100", "--key-stdin",
                "--zone", "eu", "--label", "tier=s0", input=KEY + "\n")  # fmt: skip
    assert audit_lines(added)[0]["audit"] == "upstreams.add"
    assert KEY not in added.output  # the key is never printed or audited
    cli("upstreams", "add", "home", "--limit", "100")  # the relays' configured upstream joins
    assert "only one" in cli("upstreams", "add", "home2", "--limit", "5", code=1).stderr
    assert "exists" in cli("upstreams", "add", "west", "--region", "eastus", "--limit", "5",
                           "--key-stdin", input=KEY + "\n", code=1).stderr  # fmt: skip
    listed = cli.json("upstreams", "list")
    assert [(u["name"], u["zone"], u["labels"], u["live"]) for u in listed] == [
        ("west", "eu", {"tier": "s0"}, 0),
        ("home", None, {}, 0),
    ]
    for command, state in (("drain", "draining"), ("disable", "disabled"), ("enable", "active")):
        changed = cli("upstreams", command, "west", "--yes", "--json") if command != "enable" else None
        changed = changed or cli("upstreams", command, "west", "--json")
        assert json.loads(changed.stdout)["state"] == state
        assert audit_lines(changed)[0]["audit"] == f"upstreams.{command}"
    top = cli.json("quotas", "top", "--by", "upstream")
    assert [(row["name"], row["live"], row["healthy"]) for row in top] == [
        ("west", 0, True),
        ("home", 0, True),
    ]
    entra = cli(
        "keys", "rotate-speech", "--upstream", "home", "--from-stdin", "--yes", input=KEY + "\n", code=1
    )
    assert "no key of its own" in entra.stderr
    removed = cli("upstreams", "remove", "west", "--yes", "--json")
    assert json.loads(removed.stdout) == {"name": "west", "removed": True, "live_streams": 0}
    assert [u["name"] for u in cli.json("upstreams", "list")] == ["home"]
    assert "no upstream named west" in cli("upstreams", "show", "west", code=1).stderr


def test_a_keyless_upstream_is_removed_though_it_has_no_key_secret(cli: Cli) -> None:
    resource = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.CognitiveServices/accounts/x"
    cli(
        "upstreams",
        "add",
        "keyless",
        "--region",
        "westeurope",
        "--limit",
        "5",
        "--entra-resource-id",
        resource,
    )
    assert cli.json("upstreams", "remove", "keyless", "--yes")["removed"] is True
    assert cli.json("upstreams", "list") == []


async def test_one_upstream_configured_as_before_needs_no_pool_and_no_routing(
    stack: Any, sync_redis: Any
) -> None:
    """No pool: the configured upstream, no routing keys in Redis, no upstream series."""
    client = await asyncio.to_thread(stack.service.add_client)
    token = await asyncio.to_thread(stack.token, client)
    async with connect(f"{stack.relay.url}/v1/listen?language=en-US&access_token={token}") as ws:
        await ws.send(b"\0" * 16000)
        assert json.loads(await ws.recv())["type"] == "partial"
    prefix = stack.service.settings.redis_prefix
    assert list(sync_redis.scan_iter(match=f"{prefix}upstream:*")) == []
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"http://127.0.0.1:{stack.relay.port}/metrics")).text
    assert "speechgate_upstream_streams{" not in metrics


def test_the_candidates_are_the_active_upstreams_serving_the_service_language_and_zone() -> None:
    pool = [
        Upstream("stt-eu", 5, region="westeurope", zone="eu", services=("stt",)),
        Upstream("de-only", 5, region="germanywestcentral", zone="eu", languages=("de-DE",)),
        Upstream("us", 5, region="eastus", zone="us"),
        Upstream("resting", 5, region="northeurope", zone="eu", state="draining"),
        Upstream("nowhere", 5, region="swedencentral"),
    ]

    def names(
        service: str, language: str | None, zones: tuple[str, ...], exclude: tuple[str, ...] = ()
    ) -> list[str]:
        return [u.name for u in candidates(pool, Want(service, language, zones), exclude)]

    assert names("stt", "en-US", ()) == ["stt-eu", "us", "nowhere"]
    assert names("stt", "de-de", ("eu",)) == ["stt-eu", "de-only"]  # locales compare without case
    assert names("tts", None, ("eu",)) == ["de-only"]  # a language not known yet: any upstream's
    assert names("stt", "en-US", ("eu",), ("stt-eu",)) == []  # never another zone's
    assert names("s2s", "en-US", ("apac",)) == []


async def test_a_hung_upstreams_stream_moves_to_another_and_keeps_its_audio(pool: Pool) -> None:
    """An upstream stopped (SIGSTOP) once kept its streams for the whole hang, unanswered, and
    nothing marked it down. Its pings now go unanswered: it is marked down and the plain-door
    stream moves on (its unconfirmed audio replayed), without being closed as a flood for the
    audio that queued meanwhile."""
    with frozen_speech_service() as (hung, url):
        pool.urls["hung"] = url
        await pool.add("hung", 10)
        client = await asyncio.to_thread(pool.service.add_client, max_streams_per_subject=10)
        async with pool.streams:
            ws = await pool.stream(0, await pool.token(client))  # on "hung", the only upstream
            await pool.add("healthy", 10)
            assert hung.proc is not None
            os.kill(hung.proc.pid, signal.SIGSTOP)
            stopped = time.monotonic()
            heard = None
            while heard is None:  # the app goes on talking in real time
                assert time.monotonic() - stopped < 30, "the stream stayed on the hung upstream"
                await ws.send(b"\0" * 3200)
                with contextlib.suppress(TimeoutError):
                    heard = json.loads(await asyncio.wait_for(ws.recv(), 0.1))
            moved_after = time.monotonic() - stopped
            assert heard["type"] in ("partial", "final")
            assert pool.connections()["healthy"] == 1  # the stream's new connection
            # Pinged every 3 s, given up 3 s after an unanswered one, the close 3 s more (it answers
            # no close either), then the reconnection: about 9 s, 20 with a loaded machine's margin.
            assert moved_after < 20, moved_after
            await pool.stream(0, await pool.token(client))  # a new stream: straight to "healthy"
            assert pool.connections()["healthy"] == 2
        metrics = await pool.metrics(0)
        assert 'speechgate_upstream_refusals_total{reason="unreachable",upstream="hung"} 1.0' in metrics
