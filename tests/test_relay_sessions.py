"""Session rules in Redis, directly: reconnects after expiry, single use, leases that run out."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import redis

from relay.sessions import RedisSessions, Stream
from token_service.claims import AccessClaims
from token_service.clients import ClientPolicy
from token_service.keyspace import Keyspace
from token_service.redisconn import connect

POLICY = ClientPolicy(client_id="app", secret_hash="x", max_streams_per_subject=1)


def claims(**changes: object) -> AccessClaims:
    now = int(time.time())
    base = AccessClaims(
        iss="i",
        aud="a",
        sub="alice",
        client_id="app",
        scope="speech:recognize",
        iat=now,
        nbf=now,
        exp=now + 300,
        jti="j1",
        max_session_s=600,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


async def test_an_expired_token_reconnects_only_into_the_session_it_opened(
    redis_url: str, prefix: str
) -> None:
    client = connect(redis_url)
    sessions = RedisSessions(client, Keyspace(prefix), lease_s=15)
    first = await sessions.admit(claims(), POLICY, "s1", may_start=True)
    assert first.admitted
    # The SDK reconnects later with the same token, now past its exp: same session, same start.
    again = await sessions.admit(claims(), POLICY, "s2", may_start=False)
    assert (again.admitted, again.reason) == (False, "subject_streams")  # s1 still holds the slot
    await sessions.release(_stream(claims(), "s1"))
    again = await sessions.admit(claims(), POLICY, "s2", may_start=False)
    assert again.admitted
    assert again.started_ms == first.started_ms
    other = await sessions.admit(claims(jti="j2"), POLICY, "s3", may_start=False)
    assert (other.admitted, other.reason) == (False, "expired")
    await client.aclose()


async def test_single_use_token_cannot_open_a_second_session(
    redis_url: str, prefix: str, sync_redis: redis.Redis
) -> None:
    client = connect(redis_url)
    keyspace = Keyspace(prefix)
    sessions = RedisSessions(client, keyspace, lease_s=15)
    token = claims(single_use=True)
    assert (await sessions.admit(token, POLICY, "s1", may_start=True)).admitted
    await sessions.release(_stream(token, "s1"))
    sync_redis.delete(keyspace.session("app", "j1"))  # its session window has passed
    refused = await sessions.admit(token, POLICY, "s2", may_start=True)
    assert (refused.admitted, refused.reason) == (False, "used")
    await client.aclose()


async def test_a_lease_nobody_renews_frees_its_slot(redis_url: str, prefix: str) -> None:
    client = connect(redis_url)
    sessions = RedisSessions(client, Keyspace(prefix), lease_s=0.2)
    assert (await sessions.admit(claims(), POLICY, "s1", may_start=True)).admitted
    refused = await sessions.admit(claims(jti="j2"), POLICY, "s2", may_start=True)
    assert refused.reason == "subject_streams"
    # A relay that died renews nothing: 0.2 s later the slot is free (lease scores are times).
    deadline = time.monotonic() + 5
    while not (await sessions.admit(claims(jti="j3"), POLICY, "s3", may_start=True)).admitted:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await client.aclose()


def _stream(token: AccessClaims, stream_id: str) -> Stream:
    return Stream(token, stream_id, 0)
