"""Rate limits: exact counts per client, subject and address, shared through Redis."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from speechgate.core.filestore import FileStore
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import connect
from speechgate.token_service.ratelimit import Check, LocalLimiter, RedisLimiter, checks_for, parse
from tests.support.processes import RedisServer, free_port, token_service_process, wait_until
from tests.support.services import TokenService, add_client, prepared_store


def statuses(service: TokenService, client_id: str, secret: str, n: int, **params: str) -> list[int]:
    return [service.token(client_id, secret, **params).status_code for _ in range(n)]


def test_refusal_is_429_with_retry_after_and_ratelimit_headers(service: TokenService) -> None:
    client_id, secret = service.add_client(rate_limits={"client": "3/minute", "subject": "", "ip": ""})
    ok = service.token(client_id, secret)
    assert ok.headers["ratelimit-policy"] == '"client-60s";q=3;w=60'
    assert re.fullmatch(r'"client-60s";r=2;t=\d+', ok.headers["ratelimit"])
    assert statuses(service, client_id, secret, 2) == [200, 200]
    refused = service.token(client_id, secret)
    assert refused.status_code == 429
    assert refused.json()["error"] == "slow_down"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit-policy"] == '"client-60s";q=3;w=60'
    assert re.fullmatch(r'"client-60s";r=0;t=\d+', refused.headers["ratelimit"])


def test_subject_limit_counts_each_user_apart(service: TokenService) -> None:
    client_id, secret = service.add_client(
        rate_limits={"client": "100/minute", "subject": "2/minute", "ip": ""}
    )
    assert statuses(service, client_id, secret, 3, subject="alice") == [200, 200, 429]
    assert statuses(service, client_id, secret, 2, subject="bob") == [200, 200]


def test_address_limit_counts_every_subject_from_one_address(service: TokenService) -> None:
    client_id, secret = service.add_client(rate_limits={"client": "", "subject": "", "ip": "3/minute"})
    results = [service.token(client_id, secret, subject=f"user-{n}").status_code for n in range(4)]
    assert results == [200, 200, 200, 429]


def test_a_refused_request_uses_up_no_other_limit(service: TokenService) -> None:
    client_id, secret = service.add_client(
        rate_limits={"client": "5/minute", "subject": "1/minute", "ip": ""}
    )
    assert statuses(service, client_id, secret, 4, subject="alice") == [200, 429, 429, 429]
    # The three refusals did not count against the client: four more users still fit in its 5.
    assert [service.token(client_id, secret, subject=f"u{n}").status_code for n in range(5)] == [200] * 4 + [
        429
    ]


def test_every_window_of_a_limit_is_enforced(service: TokenService) -> None:
    client_id, secret = service.add_client(
        rate_limits={"client": "10/minute;3/hour", "subject": "", "ip": ""}
    )
    assert statuses(service, client_id, secret, 4) == [200, 200, 200, 429]
    assert service.token(client_id, secret).headers["ratelimit-policy"] == (
        '"client-60s";q=10;w=60, "client-3600s";q=3;w=3600'
    )


def test_limits_are_per_client(service: TokenService) -> None:
    limits = {"client": "1/minute", "subject": "", "ip": ""}
    first, second = service.add_client(rate_limits=limits), service.add_client(rate_limits=limits)
    assert statuses(service, *first, 2) == [200, 429]
    assert statuses(service, *second, 1) == [200]


def test_sliding_window_lets_the_previous_window_decay(
    redis_url: str, prefix: str, sync_redis: redis.Redis
) -> None:
    keyspace = Keyspace(prefix)
    checks = [Check("client", "c1", parse("10/minute")[0])]

    async def run() -> tuple[list[bool], int, list[bool]]:
        client = connect(redis_url)
        limiter = RedisLimiter(client, keyspace)
        first = [(await limiter.hit("c1", "someone", checks)).allowed for _ in range(11)]
        refused = await limiter.hit("c1", "someone", checks)
        # Windows are timed by key TTLs: 30.5 s left of the 120 s TTL means the window ended
        # 29.5 s ago, so the previous window's 10 hits now weigh floor(10 * 30.5 / 60) = 5.
        sync_redis.pexpire(keyspace.rate("c1", "client", "c1", 10, 60), 30_500)
        after = [(await limiter.hit("c1", "someone", checks)).allowed for _ in range(6)]
        await client.aclose()
        return first, refused.retry_after_s, after

    first, retry_after, after = asyncio.run(run())
    assert first == [True] * 10 + [False]
    assert 55 <= retry_after <= 61
    assert after == [True] * 5 + [False]


def test_peek_reads_the_count_hit_compares_and_counts_nothing(
    redis_url: str, prefix: str, sync_redis: redis.Redis
) -> None:
    """`quotas show` reads windows with rate_read.lua; `hit` counts with rate_hit.lua. After any
    hits, and after a window has ended (the previous one decaying), the two agree: the next hit's
    `remaining` is the limit less the peeked count less itself; and peeking leaves Redis as it was."""
    keyspace = Keyspace(prefix)
    check = Check("client", "c1", parse("10/minute")[0])
    current = keyspace.rate("c1", "client", "c1", 10, 60)

    async def run() -> list[tuple[int, int]]:
        client = connect(redis_url)
        limiter = RedisLimiter(client, keyspace)
        pairs = []
        try:
            for hits, ttl_ms in ((0, None), (4, None), (3, 30_500), (2, None), (0, 9_000)):
                for _ in range(hits):
                    await limiter.hit("c1", "someone", [check])
                if ttl_ms is not None:  # the window ended (120 s TTL) - ttl_ms ago, as time would
                    sync_redis.pexpire(current, ttl_ms)
                windows = sorted(sync_redis.scan_iter(f"{prefix}rl:*"))
                before = [(k, sync_redis.get(k)) for k in windows]
                used, _ = await limiter.peek("c1", check)
                assert [
                    (k, sync_redis.get(k)) for k in sorted(sync_redis.scan_iter(f"{prefix}rl:*"))
                ] == before
                decision = await limiter.hit("c1", "someone", [check])
                pairs.append((used, decision.remaining[0]))
        finally:
            await limiter.aclose()
            await client.aclose()
        return pairs

    pairs = asyncio.run(run())
    assert [remaining for used, remaining in pairs] == [max(10 - used - 1, 0) for used, _ in pairs]
    assert pairs[0] == (0, 9)
    assert pairs[1] == (5, 4)  # 1 + 4 hits
    # 30.5 s of 60 left on the ended window: its 9 hits weigh 4, and the new one is empty
    assert pairs[2][0] == 4


def test_local_limiter_counts_exactly_too() -> None:
    async def run() -> list[bool]:
        limiter = LocalLimiter()
        checks = checks_for("c", "alice", "10.0.0.1", "3/minute", "2/minute", "")
        return [(await limiter.hit("c", "someone", checks)).allowed for _ in range(3)]

    assert asyncio.run(run()) == [True, True, False]


def test_limit_holds_across_two_processes_sharing_redis(tmp_path: Path, redis_url: str, prefix: str) -> None:
    store, hash_key = prepared_store(FileStore(tmp_path / "store"))
    client_id, secret = add_client(
        store, hash_key, rate_limits={"client": "10/minute", "subject": "", "ip": ""}
    )
    env = {
        "SPEECHGATE_STORE_DIR": str(tmp_path / "store"),
        "REDIS_URL": redis_url,
        "SPEECHGATE_REDIS_PREFIX": prefix,
    }
    ports = [free_port(), free_port()]
    with token_service_process(ports[0], env), token_service_process(ports[1], env):

        def request(n: int) -> int:
            response = httpx.post(
                f"http://127.0.0.1:{ports[n % 2]}/v1/token",
                auth=(client_id, secret),
                data={"grant_type": "client_credentials"},
            )
            return response.status_code

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(request, range(30)))
    assert results.count(200) == 10
    assert results.count(429) == 20


def test_service_keeps_answering_while_redis_is_down_and_recovers(tmp_path: Path, start_service: Any) -> None:
    own = RedisServer(tmp_path)
    own.start()
    try:
        service = start_service(redis_url=own.url)
        client_id, secret = service.add_client(rate_limits={"client": "100/minute", "subject": "", "ip": ""})
        assert service.token(client_id, secret).status_code == 200
        assert service.http.get("/readyz").json()["status"] == "ready"

        own.stop()
        assert statuses(service, client_id, secret, 3) == [200, 200, 200]
        ready = service.http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["redis"].startswith("unreachable")
        assert "speechgate_redis_up 0.0" in service.http.get("/metrics").text

        own.start()
        assert wait_until(lambda: service.http.get("/readyz").json()["status"] == "ready")
        assert "speechgate_redis_up 1.0" in service.http.get("/metrics").text
        assert service.token(client_id, secret).status_code == 200
        with own.client() as client:
            assert client.keys(f"{service.settings.redis_prefix}rl:*")  # counting in Redis again
    finally:
        own.stop()


def test_per_process_limits_apply_while_redis_is_down(tmp_path: Path, start_service: Any) -> None:
    own = RedisServer(tmp_path)
    own.start()
    try:
        service = start_service(redis_url=own.url)
        client_id, secret = service.add_client(rate_limits={"client": "2/minute", "subject": "", "ip": ""})
        own.stop()
        assert statuses(service, client_id, secret, 3) == [200, 200, 429]
    finally:
        own.stop()


@pytest.mark.parametrize(
    ("uri", "kind", "where"),
    [
        ("redis+sentinel://127.0.0.1:26379/mymaster", "Redis", None),  # the master, found through sentinels
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", "RedisCluster", None),
        ("async+redis://127.0.0.1:6379/3", "Redis", ("127.0.0.1", 6379, 3)),
        ("rediss://127.0.0.1:6380/0", "Redis", ("127.0.0.1", 6380, 0)),
    ],
)
def test_limits_style_redis_uris_are_understood(
    uri: str, kind: str, where: tuple[str, int, int] | None
) -> None:
    client = connect(uri)  # makes no connection yet
    assert type(client).__name__ == kind
    if where is not None:
        options = client.connection_pool.connection_kwargs  # type: ignore[union-attr]
        assert (options["host"], options["port"], options["db"]) == where
        assert options["socket_timeout"] == 0.5  # a slow Redis becomes the fallback, not slow requests


def test_unknown_redis_uri_scheme_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unsupported Redis URI scheme 'memcached'"):
        connect("memcached://127.0.0.1:11211")


def test_tls_through_sentinel_is_refused_not_downgraded_to_plain_text() -> None:
    """It was accepted, and both the Sentinel and the master were then reached without TLS."""
    with pytest.raises(ValueError, match=r"rediss\+sentinel:// is not supported: .*TLS"):
        connect("rediss+sentinel://:pw@127.0.0.1:26379/speechgate")


def test_limits_survive_a_flushed_script_cache(tmp_path: Path) -> None:
    own = RedisServer(tmp_path)
    own.start()
    checks = checks_for("c", "s", "a", "3/minute", "", "")

    async def run() -> list[bool]:
        client = connect(own.url)
        limiter = RedisLimiter(client, Keyspace("sg:"))
        results = [(await limiter.hit("c", "someone", checks)).allowed]
        await client.script_flush()  # as after a Redis restart or failover
        results += [(await limiter.hit("c", "someone", checks)).allowed for _ in range(3)]
        await limiter.aclose()
        await client.aclose()
        return results

    try:
        assert asyncio.run(run()) == [True, True, True, False]
    finally:
        own.stop()
