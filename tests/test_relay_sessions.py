"""Session rules in Redis, directly: reconnects after expiry, single use, leases that run out."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import redis

from speechgate.core.claims import AccessClaims
from speechgate.core.clients import ClientPolicy
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import connect
from speechgate.relay.sessions import REPLAY_BUDGET_S, RedisSessions, Stream

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


def test_replayed_audio_is_counted_once_and_free_replay_is_bounded_per_session() -> None:
    """The SDKs replay unconfirmed audio from an offset they name; an app naming offset 0 on every
    turn gets no more than the session's replay budget uncounted."""
    stream = Stream(claims(), "s1", 0, replay_budget_s=REPLAY_BUDGET_S)
    ten_seconds = 10 * stream.byte_rate
    stream.context(None)
    stream.add_audio(ten_seconds)
    stream.context(8.0)  # a genuine replay of the last 2 s, then 3 s of new audio
    stream.add_audio(5 * stream.byte_rate)
    assert stream.total_audio_s == pytest.approx(13.0)
    for _ in range(20):  # 200 s more, each turn claiming to replay from the start
        stream.context(0.0)
        stream.add_audio(ten_seconds)
    assert stream.total_audio_s == pytest.approx(215.0 - REPLAY_BUDGET_S)


async def test_a_reconnect_takes_over_the_mark_its_ended_connection_left_once(
    redis_url: str, prefix: str
) -> None:
    client = connect(redis_url)
    sessions = RedisSessions(client, Keyspace(prefix), lease_s=15)
    policy = replace(POLICY, max_streams_per_subject=5)
    first = await sessions.admit(claims(), policy, "s1", may_start=True)
    assert (first.resume_mark_s, first.replay_budget_s) == (0.0, REPLAY_BUDGET_S)
    ended = Stream(claims(), "s1", first.started_ms, replay_budget_s=first.replay_budget_s)
    ended.add_audio(3 * ended.byte_rate)
    await sessions.release(ended)
    await sessions.release(ended)  # a repeated write of the same end leaves nothing twice
    again = await sessions.admit(claims(), policy, "s2", may_start=False)
    assert again.resume_mark_s == pytest.approx(3.0)
    assert again.replay_budget_s == REPLAY_BUDGET_S
    parallel = await sessions.admit(claims(), policy, "s3", may_start=False)
    assert parallel.resume_mark_s == 0.0  # taken once: a parallel stream replays nothing free
    await client.aclose()
