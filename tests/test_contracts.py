"""One set of cases for each rule kept twice: in Redis (shared by every replica) and in this process
(the fallback while Redis is down, and `speechgate dev` without it). Each case runs against both,
so the two cannot drift apart: session rules (relay.sessions), the token rate limiter
(token_service.ratelimit) and revocations (core.revocation). Also the one rule both session stores
leave to the stream itself: how replayed audio is counted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from speechgate.core.clients import ClientPolicy
from speechgate.core.keyspace import Keyspace, day
from speechgate.core.redisconn import RedisHealth, connect
from speechgate.core.revocation import MemoryRevocations, RedisRevocations, Revocations
from speechgate.core.settings import Settings
from speechgate.core.store import MemoryStore
from speechgate.core.upstreams import Upstream, save_pool
from speechgate.relay.metrics import RelayMetrics
from speechgate.relay.pool import NoUpstream, Pool, Want
from speechgate.relay.sessions import (
    REPLAY_BUDGET_S,
    MemorySessions,
    RedisSessions,
    Sessions,
    Stream,
    new_stream_id,
)
from speechgate.relay.upstream import KeyCredentials
from speechgate.token_service.ratelimit import Limiter, LocalLimiter, RedisLimiter, checks_for
from tests.support.claims import access_claims

POLICY = ClientPolicy(client_id="app", secret_hash="x", max_streams_per_subject=1)
BACKENDS = ["memory", "redis"]


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, redis_url: str, prefix: str) -> AsyncIterator[str]:
    """Which implementation; the Redis one on the suite's real server, under the test's prefix."""
    request.node.redis = connect(redis_url) if request.param == "redis" else None
    yield request.param
    if request.node.redis is not None:
        await request.node.redis.aclose()


@pytest.fixture
def make_sessions(backend: str, request: pytest.FixtureRequest, prefix: str) -> Callable[[float], Sessions]:
    def make(lease_s: float) -> Sessions:
        if backend == "memory":
            return MemorySessions(lease_s)
        return RedisSessions(request.node.redis, Keyspace(prefix), lease_s)

    return make


@pytest.fixture
def limiter(backend: str, request: pytest.FixtureRequest, prefix: str) -> Limiter:
    return LocalLimiter() if backend == "memory" else RedisLimiter(request.node.redis, Keyspace(prefix))


@pytest.fixture
def revocations(backend: str, request: pytest.FixtureRequest, prefix: str) -> Revocations:
    return (
        MemoryRevocations() if backend == "memory" else RedisRevocations(request.node.redis, Keyspace(prefix))
    )


# --- sessions --------------------------------------------------------------------------------


async def test_an_expired_token_reconnects_only_into_the_session_it_opened(
    make_sessions: Callable[[float], Sessions],
) -> None:
    sessions = make_sessions(15)
    first = await sessions.admit(access_claims(), POLICY, "s1", may_start=True)
    assert first.admitted
    # The SDK reconnects later with the same token, now past its exp: same session, same start.
    again = await sessions.admit(access_claims(), POLICY, "s2", may_start=False)
    assert (again.admitted, again.reason) == (False, "subject_streams")  # s1 still holds the slot
    await sessions.release(Stream(access_claims(), "s1", 0))
    again = await sessions.admit(access_claims(), POLICY, "s2", may_start=False)
    assert again.admitted
    assert again.started_ms == first.started_ms
    other = await sessions.admit(access_claims(jti="j2"), POLICY, "s3", may_start=False)
    assert (other.admitted, other.reason) == (False, "expired")


async def test_a_single_use_token_holds_one_stream_and_opens_one_session(
    make_sessions: Callable[[float], Sessions],
) -> None:
    sessions = make_sessions(15)
    policy = replace(POLICY, max_streams_per_subject=5)
    token = access_claims(single_use=True, jti="once")
    first, second, third = (new_stream_id(token) for _ in range(3))
    assert (await sessions.admit(token, policy, first, may_start=True)).admitted
    parallel = await sessions.admit(token, policy, second, may_start=True)
    assert (parallel.admitted, parallel.reason) == (False, "in_use")
    await sessions.release(Stream(token, first, 0))
    # Its session over (the token's sessions last 1 s): a single-use token starts no second one.
    over = replace(token, max_session_s=1)
    deadline = time.monotonic() + 5
    while (refused := await sessions.admit(over, policy, third, may_start=True)).reason == "ok":
        await sessions.release(Stream(over, third, 0))  # within the second: still its one session
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert (refused.admitted, refused.reason) == (False, "used")
    late = await sessions.admit(over, policy, new_stream_id(token), may_start=False)
    assert (late.admitted, late.reason) == (False, "session_over")


async def test_a_lease_nobody_renews_frees_its_slot(make_sessions: Callable[[float], Sessions]) -> None:
    sessions = make_sessions(0.2)
    assert (await sessions.admit(access_claims(), POLICY, "s1", may_start=True)).admitted
    refused = await sessions.admit(access_claims(jti="j2"), POLICY, "s2", may_start=True)
    assert refused.reason == "subject_streams"
    assert refused.retry_after_s == 1  # the lease's end, rounded up to whole seconds
    # A relay that died renews nothing: 0.2 s later the slot is free (leases are end times).
    deadline = time.monotonic() + 5
    while not (await sessions.admit(access_claims(jti="j3"), POLICY, "s3", may_start=True)).admitted:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_a_reconnect_takes_over_the_mark_its_ended_connection_left_once(
    make_sessions: Callable[[float], Sessions],
) -> None:
    sessions = make_sessions(15)
    policy = replace(POLICY, max_streams_per_subject=5)
    first = await sessions.admit(access_claims(), policy, "s1", may_start=True)
    assert (first.resume_mark_s, first.replay_budget_s) == (0.0, REPLAY_BUDGET_S)
    ended = Stream(access_claims(), "s1", first.started_ms, replay_budget_s=first.replay_budget_s)
    ended.add_audio(3 * ended.byte_rate)
    await sessions.release(ended)
    await sessions.release(ended)  # a repeated write of the same end leaves nothing twice
    again = await sessions.admit(access_claims(), policy, "s2", may_start=False)
    assert again.resume_mark_s == pytest.approx(3.0)
    assert again.replay_budget_s == REPLAY_BUDGET_S
    parallel = await sessions.admit(access_claims(), policy, "s3", may_start=False)
    assert parallel.resume_mark_s == 0.0  # taken once: a parallel stream replays nothing free


async def test_daily_audio_counts_across_streams_and_refuses_the_next_when_used_up(
    make_sessions: Callable[[float], Sessions],
) -> None:
    sessions = make_sessions(15)
    policy = replace(POLICY, max_streams_per_subject=5, audio_s_per_day_subject=10)
    token = access_claims(jti="audio")
    streams = []
    for n in range(2):
        admitted = await sessions.admit(token, policy, f"audio.{n}", may_start=True)
        assert admitted.admitted
        streams.append(Stream(token, f"audio.{n}", admitted.started_ms))
    streams[0].add_audio(4 * streams[0].byte_rate)
    streams[1].add_audio(4 * streams[1].byte_rate)
    beat = await sessions.heartbeat(streams, {"app": policy})
    assert beat.over == []
    assert beat.audio_use["app"] == pytest.approx(8 / policy.audio_s_per_day_client)
    streams[1].add_audio(2 * streams[1].byte_rate)
    beat = await sessions.heartbeat(streams, {"app": policy})
    assert [(s.stream_id, why) for s, why in beat.over] == [
        ("audio.0", "daily audio quota used up"),
        ("audio.1", "daily audio quota used up"),
    ]
    refused = await sessions.admit(access_claims(jti="audio2"), policy, "audio2.0", may_start=True)
    assert (refused.admitted, refused.reason) == (False, "subject_audio")


def test_replayed_audio_is_counted_once_and_free_replay_is_bounded_per_session() -> None:
    """The SDKs replay unconfirmed audio from an offset they name; an app naming offset 0 on every
    turn gets no more than the session's replay budget uncounted."""
    stream = Stream(access_claims(), "s1", 0, replay_budget_s=REPLAY_BUDGET_S)
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


# --- the token rate limiter ------------------------------------------------------------------


async def test_a_limit_counts_exactly_and_says_what_is_left(limiter: Limiter) -> None:
    checks = checks_for("app", "alice", "10.0.0.1", "3/minute", "", "")
    decisions = [await limiter.hit("app", "alice", checks) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [(2,), (1,), (0,), (0,)]
    assert 1 <= decisions[-1].retry_after_s <= 61
    assert all(0 < d.reset_s[0] <= 60 for d in decisions)


async def test_a_refused_request_uses_up_no_other_limit(limiter: Limiter) -> None:
    for _ in range(2):
        assert (
            await limiter.hit("app", "alice", checks_for("app", "alice", "ip", "5/minute", "2/minute", ""))
        ).allowed
    refused = await limiter.hit("app", "alice", checks_for("app", "alice", "ip", "5/minute", "2/minute", ""))
    assert not refused.allowed
    # alice's refusal took nothing of the client's 5: bob gets the 3 left
    bob = [
        (await limiter.hit("app", "bob", checks_for("app", "bob", "ip", "5/minute", "2/minute", ""))).allowed
        for _ in range(2)
    ]
    assert bob == [True, True]
    carol = await limiter.hit("app", "carol", checks_for("app", "carol", "ip", "5/minute", "2/minute", ""))
    assert (carol.allowed, carol.remaining) == (True, (0, 1))
    dave = await limiter.hit("app", "dave", checks_for("app", "dave", "ip", "5/minute", "2/minute", ""))
    assert not dave.allowed


async def test_limits_are_counted_per_client(limiter: Limiter) -> None:
    for _ in range(2):
        assert (await limiter.hit("one", "x", checks_for("one", "x", "ip", "2/minute", "", ""))).allowed
    assert not (await limiter.hit("one", "x", checks_for("one", "x", "ip", "2/minute", "", ""))).allowed
    assert (await limiter.hit("two", "x", checks_for("two", "x", "ip", "2/minute", "", ""))).allowed


# --- revocations -----------------------------------------------------------------------------


async def test_a_revoked_token_is_refused_and_no_other(revocations: Revocations) -> None:
    now = int(time.time())
    assert await revocations.revoked(access_claims(jti="r1"), "kid") is None
    await revocations.revoke_jti("r1", now + 60)
    assert await revocations.revoked(access_claims(jti="r1"), "kid") == "token revoked"
    assert await revocations.revoked(access_claims(jti="r2"), "kid") is None


async def test_a_revocation_lasts_until_the_token_could_no_longer_be_used(revocations: Revocations) -> None:
    """Kept as long as the token is usable, not longer: once `until` has passed it holds nothing."""
    await revocations.revoke_jti("gone", int(time.time()) - 1)
    assert await revocations.revoked(access_claims(jti="gone"), "kid") is None


# --- the upstream pool (relay.pool): route.lua against the per-process counts ----------------


@pytest.fixture
async def pool(backend: str, request: pytest.FixtureRequest, prefix: str) -> AsyncIterator[Pool]:
    """Two upstreams of limit 2 ("a", zone eu; "b", zone us) and one draining ("c")."""
    store = MemoryStore()
    await save_pool(
        store,
        [
            Upstream("a", 2, region="westeurope", zone="eu"),
            Upstream("b", 2, region="eastus", zone="us"),
            Upstream("c", 9, region="northeurope", zone="eu", state="draining"),
        ],
        "test",
    )
    redis = request.node.redis
    settings = Settings(lease_s=1.0)
    made = Pool(
        settings, store, redis, Keyspace(prefix), RedisHealth(redis), KeyCredentials(store, "k" * 32),
        RelayMetrics(CollectorRegistry()), backoff_s=0.5,
    )  # fmt: skip
    await made.load()
    yield made
    await made.aclose()


ANY = Want("stt", "en-US", ())


async def test_pool_spreads_by_use_then_refuses_when_full_and_frees_on_release(pool: Pool) -> None:
    placed = [await pool.assign(new_stream_id(access_claims()), ANY) for _ in range(4)]
    names = [p.upstream.name for p in placed]
    assert sorted(names[:2]) == sorted(names[2:]) == ["a", "b"]  # by use; never "c": it drains
    with pytest.raises(NoUpstream) as full:
        await pool.assign(new_stream_id(access_claims()), ANY)
    assert full.value.why == "full"
    await pool.release(placed[1])
    again = await pool.assign(new_stream_id(access_claims()), ANY)
    assert again.upstream.name == names[1]


async def test_pool_ties_go_to_any_upstream_not_always_the_first(pool: Pool) -> None:
    """Equal use once always chose the pool's first upstream: every relay's first stream went to
    the same resource."""
    firsts = set()
    for _ in range(40):
        placement = await pool.assign(new_stream_id(access_claims()), ANY)
        firsts.add(placement.upstream.name)
        await pool.release(placement)
    assert firsts == {"a", "b"}  # all 40 on one: a chance of 2 in a trillion


async def test_pool_keeps_to_the_zones_and_skips_an_upstream_marked_down(pool: Pool) -> None:
    eu = Want("stt", None, ("eu",))
    assert (await pool.assign(new_stream_id(access_claims()), eu)).upstream.name == "a"
    await pool.mark_down("a")
    with pytest.raises(NoUpstream) as down:  # eu has no other active upstream: never "b" of us
        await pool.assign(new_stream_id(access_claims()), eu)
    assert down.value.why == "down"
    assert (await pool.assign(new_stream_id(access_claims()), ANY)).upstream.name == "b"
    await asyncio.sleep(0.5)  # the backoff is time itself
    assert (await pool.assign(new_stream_id(access_claims()), eu)).upstream.name == "a"
    with pytest.raises(NoUpstream) as none:
        await pool.assign(new_stream_id(access_claims()), Want("stt", None, ("apac",)))
    assert none.value.why == "none"


async def test_pool_slots_lapse_with_their_lease_unless_renewed(pool: Pool) -> None:
    kept = await pool.assign(new_stream_id(access_claims()), ANY)
    lapsing = await pool.assign(new_stream_id(access_claims()), ANY)  # the other: nobody renews it
    await asyncio.sleep(0.6)
    await pool.renew([kept])
    await asyncio.sleep(0.6)  # the other's lease (1 s) ran out; the kept one's was renewed
    placed = [await pool.assign(new_stream_id(access_claims()), ANY) for _ in range(3)]
    names = [kept.upstream.name, lapsing.upstream.name, lapsing.upstream.name]
    assert sorted(p.upstream.name for p in placed) == sorted(names)


async def test_a_token_revoked_again_is_acknowledged_with_no_second_event(
    revocations: Revocations, backend: str, request: pytest.FixtureRequest, prefix: str
) -> None:
    """One token revoked 20,000 times once made every relay handle 20,000 events."""
    heard: list[dict[str, Any]] = []
    now = int(time.time())
    if isinstance(revocations, MemoryRevocations):

        async def handler(event: dict[str, Any]) -> None:
            heard.append(event)

        revocations.subscribe(handler)
        results = [await revocations.revoke_jti("twice", now + 60) for _ in range(3)]
    else:
        channel = Keyspace(prefix).events
        pubsub = request.node.redis.pubsub()
        await pubsub.subscribe(channel)
        results = [await revocations.revoke_jti("twice", now + 60) for _ in range(3)]
        await request.node.redis.publish(channel, "end")  # what came before it has been delivered
        async for message in pubsub.listen():
            if message["type"] == "message":
                if message["data"] in (b"end", "end"):
                    break
                heard.append(json.loads(message["data"]))
        await pubsub.aclose()
    assert results == [True, False, False]
    assert heard == [{"type": "revoke", "jti": "twice"}]
    assert await revocations.revoked(access_claims(jti="twice"), "kid") == "token revoked"


async def test_a_beat_in_chunks_counts_and_leases_as_one_script_would(redis_url: str, prefix: str) -> None:
    """A beat's streams of one client go in chunks (no one script holds Redis long for everyone
    else): the leases, the day's counters and the quota decisions are those of a single call."""
    client = connect(redis_url)
    policy = replace(
        POLICY, max_streams_per_subject=10, audio_s_per_day_subject=9, audio_s_per_day_client=100
    )
    found = []
    try:
        for chunk in (2, 1000):
            keys = Keyspace(f"{prefix}{chunk}:")
            sessions = RedisSessions(client, keys, 15, chunk=chunk)
            streams = []
            for n in range(7):
                token = access_claims(sub=f"user{n % 3}", jti=f"beat{n}")
                admitted = await sessions.admit(token, policy, f"beat{n}.0", may_start=True)
                assert admitted.admitted
                streams.append(Stream(token, f"beat{n}.0", admitted.started_ms))
            for n, stream in enumerate(streams):
                stream.add_audio((n + 1) * stream.byte_rate)  # 1 s to 7 s
            beat = await sessions.heartbeat(streams, {"app": policy})
            today = day()
            counters = [await client.get(keys.audio_client("app", today))]
            counters += [await client.get(keys.audio_subject("app", today, f"user{n}")) for n in range(3)]
            leases = await client.zcard(keys.lease_client("app"))
            found.append(([s.stream_id for s, _ in beat.over], beat.audio_use, counters, leases))
            for key in [k async for k in client.scan_iter(match=f"{prefix}{chunk}:*")]:
                await client.delete(key)
    finally:
        await client.aclose()
    chunked, single = found
    assert chunked == single
    # user0: 1+4+7 = 12 s, over its 9; user1: 2+5 = 7; user2: 3+6 = 9, at it: over
    assert sorted(single[0]) == ["beat0.0", "beat2.0", "beat3.0", "beat5.0", "beat6.0"]
    assert single[3] == 7
