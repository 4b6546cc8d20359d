"""`speechgate quotas` over the live Redis state that real token requests and relay streams leave."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.sync.client import ClientConnection, connect

from speechgate.cli.common import Deps
from speechgate.core.clients import save_client
from speechgate.core.filestore import FileStore
from speechgate.core.keyspace import Keyspace, day, seconds_to_midnight
from speechgate.core.settings import Settings
from tests.support.cli import SPEECHGATE, Cli, audit_lines
from tests.support.processes import free_port, token_service_process, wait_until
from tests.support.relays import Stack
from tests.support.services import new_client, prepared_store

LISTEN = "/v1/listen?language=en-US"


@pytest.fixture
def live(stack: Stack, sync_redis: redis.Redis) -> Iterator[tuple[Stack, Cli, ClientConnection]]:
    """Client `shop` with traffic: tokens for alice (one refused by her 2/minute) and bob, and one
    live stream of alice's with a second of audio metered; client `idle` with none."""
    settings = Settings(
        redis_url=stack.service.settings.redis_url, redis_prefix=stack.service.settings.redis_prefix
    )
    cli = Cli(Deps(settings=settings, open_store=lambda _: stack.service.store), settings)
    shop = stack.service.add_client(
        "shop", rate_limits={"subject": "2/minute"}, audio_s_per_day_client=100, max_streams_per_client=4
    )
    stack.service.add_client("idle")
    alice = stack.token(shop, subject="alice")
    stack.token(shop, subject="alice")
    assert stack.service.token(*shop, subject="alice").status_code == 429
    stack.token(shop, subject="bob")
    keys = Keyspace(settings.redis_prefix)
    with connect(stack.relay.url + LISTEN, additional_headers={"Authorization": f"Bearer {alice}"}) as ws:
        for _ in range(10):
            ws.send(b"\0" * 3200)
        assert wait_until(lambda: float(sync_redis.get(keys.audio_client("shop", day())) or 0) >= 0.999)
        yield stack, cli, ws


def test_top_ranks_clients_by_use_with_streams_audio_and_tokens(live: Any) -> None:
    _, cli, _ = live
    rows = cli.json("quotas", "top")
    assert [r["client_id"] for r in rows] == ["shop", "idle"]  # shop uses 1% of its audio, idle nothing
    shop, idle = rows
    assert shop["streams"] == 1
    assert shop["streams_limit"] == 4
    assert shop["audio_s"] == 1.0
    assert shop["audio_limit_s"] == 100
    assert (shop["issued_1m"], shop["refused_1m"]) == (3, 1)
    assert shop["ratio"] == 0.25  # the fuller quota: 1 of 4 streams
    assert (idle["streams"], idle["audio_s"], idle["issued_1m"]) == (0, 0.0, 0)
    table = cli("quotas", "top").stdout
    assert "shop" in table
    assert "1 / 4" in table
    assert "0m01s / 1m40s" in table


def test_top_by_subject(live: Any) -> None:
    _, cli, _ = live
    rows = {r["subject"]: r for r in cli.json("quotas", "top", "--by", "subject")}
    assert set(rows) == {"alice", "bob"}
    assert (rows["alice"]["streams"], rows["alice"]["issued_1m"], rows["alice"]["refused_1m"]) == (1, 2, 1)
    assert rows["alice"]["audio_s"] == 1.0
    assert (rows["bob"]["streams"], rows["bob"]["issued_1m"], rows["bob"]["audio_s"]) == (0, 1, 0.0)


def test_show_gives_every_counter_and_lease_with_limit_and_reset(live: Any) -> None:
    _, cli, _ = live
    shop = cli.json("quotas", "show", "shop")
    assert shop["streams"] == 1
    (lease,) = shop["leases"]
    assert 0 < lease["lease_left_s"] <= 15
    assert 0 < shop["audio_reset_s"] <= 86400
    (window,) = shop["windows"]
    assert (window["limit"], window["used"], window["amount"]) == ("client 600 per 1 minute", 3, 600)
    alice = cli.json("quotas", "show", "shop", "--subject", "alice")
    assert [(w["limit"], w["used"], w["amount"]) for w in alice["windows"]] == [
        ("client 600 per 1 minute", 3, 600),
        ("subject 2 per 1 minute", 2, 2),
    ]
    assert 0 < alice["windows"][1]["reset_s"] <= 60
    text = cli("quotas", "show", "shop", "--subject", "alice").stdout
    assert "subject 2 per 1 minute: 2 of 2" in text
    assert "streams      1 of 2" in text
    cli("quotas", "show", "nobody", code=3)


def test_a_lease_renewed_while_show_reads_never_shows_more_than_a_lease_left(
    redis_url: str, prefix: str
) -> None:
    """`quotas show` once took its clock before reading, so a relay's renewal landing in between
    showed 15.2 s left of a 15-s lease (a flaky test, and a wrong figure). Here the renewal is
    written half a second after the command's first reading of the clock, before its read."""
    from speechgate.core.clients import ClientPolicy
    from speechgate.core.redisconn import connect as redis_connect
    from speechgate.token_service import usage

    keys = Keyspace(prefix)
    policy = ClientPolicy(client_id="renewing")

    async def run() -> list[dict[str, Any]]:
        client = redis_connect(redis_url)
        started = time.time()
        readings = iter([started - 0.5, started])  # before the renewal, then after the read
        try:
            await client.zadd(keys.lease_client(policy.client_id), {"s1": int(started * 1000) + 15_000})
            found = await usage.detail(client, keys, policy, None, clock=lambda: next(readings))
        finally:
            await client.delete(keys.lease_client(policy.client_id))
            await client.aclose()
        return found.leases

    (lease,) = asyncio.run(run())
    assert lease["lease_left_s"] == 15.0


def test_reset_a_subject_lets_it_in_again_and_is_audited(live: Any) -> None:
    _, cli, _ = live
    cli("quotas", "reset", "shop", "--subject", "alice", code=4)  # no terminal, no --yes
    result = cli("quotas", "reset", "shop", "--subject", "alice", "--yes")
    (line,) = audit_lines(result)
    assert (line["audit"], line["client_id"], line["subject"]) == ("quotas.reset", "shop", "alice")
    alice = cli.json("quotas", "show", "shop", "--subject", "alice")
    assert alice["audio_s"] == 0.0
    assert alice["windows"][1]["used"] == 0
    assert alice["streams"] == 1  # a live stream keeps its slot
    assert cli.json("quotas", "show", "shop")["audio_s"] == 1.0  # the client's own total is untouched


def test_set_changes_limits_on_a_running_token_service_within_a_second(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    store, hash_key = prepared_store(FileStore(tmp_path / "store"))
    policy, secret = new_client(hash_key, "kiosk", rate_limits={"client": "2/minute"})
    asyncio.run(save_client(store, policy))
    settings = Settings(store_dir=tmp_path / "store", redis_url=redis_url, redis_prefix=prefix)
    cli = Cli(Deps(settings=settings), settings)
    port = free_port()
    env = {
        "SPEECHGATE_STORE_DIR": str(tmp_path / "store"),
        "REDIS_URL": redis_url,
        "SPEECHGATE_REDIS_PREFIX": prefix,
        "SPEECHGATE_CLIENT_CACHE_S": "3600",  # only the reload event can make it re-read in time
    }
    with token_service_process(port, env):

        def token() -> int:
            return httpx.post(
                f"http://127.0.0.1:{port}/v1/token",
                auth=("kiosk", secret),
                data={"grant_type": "client_credentials"},
            ).status_code

        assert [token(), token(), token()] == [200, 200, 429]
        result = cli("quotas", "set", "kiosk", "--tokens-per-minute", "5", "--streams", "7", "--json")
        assert json.loads(result.stdout)["limits"]["rate_client"] == "5/minute"
        (line,) = audit_lines(result)
        assert line["changes"] == {"max_streams_per_client": 7, "rate_client": "5/minute"}
        assert wait_until(lambda: token() == 200, timeout=1.0)
    assert cli.json("clients", "show", "kiosk")["max_streams_per_client"] == 7
    bad = cli("quotas", "set", "kiosk", "--rate-subject", "lots", code=2)  # bad usage, as in `clients add`
    assert "lots" in bad.output
    cli("quotas", "set", "kiosk", code=2)  # nothing to change


def test_quotas_without_redis_say_so(tmp_path: Path) -> None:
    settings = Settings(store_dir=tmp_path / "store", redis_url=None)
    cli = Cli(Deps(settings=settings), settings)
    result = cli("quotas", "top", code=1)
    assert "quotas live in Redis: set REDIS_URL" in result.output


def test_top_watch_refreshes_until_interrupted(tmp_path: Path, redis_url: str, prefix: str) -> None:
    store, hash_key = prepared_store(FileStore(tmp_path / "store"))
    asyncio.run(save_client(store, new_client(hash_key, "kiosk")[0]))
    env = {
        **os.environ,
        "SPEECHGATE_STORE_DIR": str(tmp_path / "store"),
        "REDIS_URL": redis_url,
        "SPEECHGATE_REDIS_PREFIX": prefix,
    }
    args = [SPEECHGATE, "quotas", "top", "--watch", "--json", "--interval", "0.1"]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None
        frames = [json.loads(proc.stdout.readline()) for _ in range(3)]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
    assert all([row["client_id"] for row in frame] == ["kiosk"] for frame in frames)


def test_top_prints_subjects_escaped(live: Any, sync_redis: redis.Redis) -> None:
    """A subject with control characters (from a token issued before they were refused) reaches
    the SRE's terminal escaped, never as escape sequences."""
    stack, cli, _ = live
    keys = Keyspace(stack.service.settings.redis_prefix)
    sync_redis.set(keys.audio_subject("shop", day(), "eve\x1b[2J\n"), 5)
    table = cli("quotas", "top", "--by", "subject").stdout
    assert "\x1b" not in table
    assert "eve\\x1b[2J" in table  # the cell is cut to fit; what shows is the escape


@pytest.mark.parametrize(
    ("now", "left"),
    [(86400 * 5, 86400), (86400 * 5 + 86399.5, 1), (86400 * 5 + 86399, 1), (86400 * 5 + 0.2, 86400)],
)
def test_seconds_to_midnight_never_says_the_day_is_over_before_it_is(now: float, left: int) -> None:
    assert seconds_to_midnight(now) == left
