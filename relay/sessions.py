"""Session rules enforced in Redis, so that they hold across any number of relay processes.

- concurrent streams per subject and per client: leases in sorted sets, renewed by a heartbeat;
  a relay that dies stops renewing and its slots free themselves within the lease time;
- audio seconds per day per subject and per client, metered from the audio actually forwarded;
- single-use tokens open one session; a session may reconnect (the SDK does, after Azure closes
  a connection or the network drops) with the same token, expired or not, while it is within its
  `max_session_s`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from token_service.claims import AccessClaims
from token_service.clients import ClientPolicy
from token_service.keyspace import Keyspace, day
from token_service.redisconn import Redis, ScriptRunner

# Audio may arrive faster than real time for a while (the SDK sends ~5 s of a file at once, then
# twice real time); beyond this, a client is flooding.
BURST_S = 10.0
MAX_SPEEDUP = 4.0


@dataclass
class Stream:
    """One live stream, as the session rules see it."""

    claims: AccessClaims
    stream_id: str
    started_ms: int  # when its session started (reconnects keep the first start)
    audio_s: float = 0.0  # metered since the last heartbeat
    total_audio_s: float = 0.0
    in_metrics_s: float = 0.0  # how much of total_audio_s the Prometheus counter has
    byte_rate: int = 32000
    closing_reason: str | None = field(default=None)
    backend: Any = None  # the Sessions that admitted it, and so release it

    def add_audio(self, payload_bytes: int) -> None:
        seconds = payload_bytes / self.byte_rate
        self.audio_s += seconds
        self.total_audio_s += seconds

    def flooding(self, opened: float) -> bool:
        """Far ahead of real time since `opened` (monotonic): more than a burst, then 4x."""
        return self.total_audio_s > BURST_S and self.total_audio_s > BURST_S + MAX_SPEEDUP * (
            time.monotonic() - opened
        )

    @property
    def session_deadline(self) -> float:
        return self.started_ms / 1000 + self.claims.max_session_s


class Sessions(Protocol):
    async def admit(
        self, claims: AccessClaims, policy: ClientPolicy, stream_id: str, may_start: bool
    ) -> Admission: ...

    async def heartbeat(self, streams: Sequence[Stream], policies: dict[str, ClientPolicy]) -> Beat: ...

    async def release(self, stream: Stream) -> None: ...


@dataclass
class Beat:
    """What a heartbeat found: the streams over a quota, and each client's share of its daily audio."""

    over: list[tuple[Stream, str]] = field(default_factory=list)
    audio_use: dict[str, float] = field(default_factory=dict)

    def add(self, stream: Stream, policy: ClientPolicy | None, subject_s: float, client_s: float) -> None:
        if policy is None:
            return
        self.audio_use[policy.client_id] = client_s / max(policy.audio_s_per_day_client, 1)
        if subject_s >= policy.audio_s_per_day_subject or client_s >= policy.audio_s_per_day_client:
            self.over.append((stream, "daily audio quota used up"))


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: (
        str  # "ok", "expired", "used", "subject_streams", "client_streams", "subject_audio", "client_audio"
    )
    retry_after_s: int = 0
    started_ms: int = 0


# KEYS: lease_sub, lease_client, session, used, audio_sub, audio_client
# ARGV: now_ms, lease_ms, max_sub, max_client, stream_id, single_use, session_s, audio_sub_limit,
#       audio_client_limit, may_start
_ADMIT = """
local now = tonumber(ARGV[1])
local started = redis.call('get', KEYS[3])
if not started and ARGV[10] ~= '1' then return {0, 'expired', 0, 0} end
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
redis.call('zremrangebyscore', KEYS[2], '-inf', now)
for i, limit in ipairs({ARGV[3], ARGV[4]}) do
  if redis.call('zcard', KEYS[i]) >= tonumber(limit) then
    local first = redis.call('zrange', KEYS[i], 0, 0, 'WITHSCORES')
    local wait = first[2] and math.ceil((tonumber(first[2]) - now) / 1000) or 1
    return {0, i == 1 and 'subject_streams' or 'client_streams', math.max(wait, 1), 0}
  end
end
if (tonumber(redis.call('get', KEYS[5])) or 0) >= tonumber(ARGV[8]) then return {0, 'subject_audio', 0, 0} end
if (tonumber(redis.call('get', KEYS[6])) or 0) >= tonumber(ARGV[9]) then return {0, 'client_audio', 0, 0} end
if not started and ARGV[6] == '1' then
  if not redis.call('set', KEYS[4], '1', 'NX', 'EX', ARGV[7]) then return {0, 'used', 0, 0} end
end
local until_ms = now + tonumber(ARGV[2])
for i = 1, 2 do
  redis.call('zadd', KEYS[i], until_ms, ARGV[5])
  redis.call('pexpire', KEYS[i], tonumber(ARGV[2]) * 2)
end
if not started then
  started = now
  redis.call('set', KEYS[3], started, 'EX', ARGV[7])
end
return {1, 'ok', 0, tonumber(started)}
"""


class RedisSessions:
    def __init__(self, redis: Redis, keyspace: Keyspace, lease_s: float) -> None:
        self.redis = redis
        self.keys = keyspace
        self.lease_ms = int(lease_s * 1000)
        self._admit = ScriptRunner(redis, _ADMIT)

    async def admit(
        self, claims: AccessClaims, policy: ClientPolicy, stream_id: str, may_start: bool
    ) -> Admission:
        k, c = self.keys, claims.client_id
        today = day()
        keys = [
            k.lease_subject(c, claims.sub),
            k.lease_client(c),
            k.session(c, claims.jti),
            k.used_jti(c, claims.jti),
            k.audio_subject(c, today, claims.sub),
            k.audio_client(c, today),
        ]
        args: list[int | str] = [
            int(time.time() * 1000),
            self.lease_ms,
            policy.max_streams_per_subject,
            policy.max_streams_per_client,
            stream_id,
            int(claims.single_use),
            claims.max_session_s,
            policy.audio_s_per_day_subject,
            policy.audio_s_per_day_client,
            int(may_start),
        ]
        admitted, reason, retry, started = await self._admit(keys, args)
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        return Admission(bool(admitted), reason, int(retry), int(started))

    async def heartbeat(self, streams: Sequence[Stream], policies: dict[str, ClientPolicy]) -> Beat:
        """Renew every lease, add the audio metered since last time; the streams over a quota.

        One command per key, not per stream: a relay with a thousand streams of a few users
        sends a few commands, not thousands (the beat runs on the event loop that forwards
        audio, and a long one shows as latency in every stream).
        """
        beat = Beat()
        if not streams:
            return beat
        k, today = self.keys, day()
        until_ms = int(time.time() * 1000) + self.lease_ms
        groups: dict[tuple[str, str], list[Stream]] = {}
        for s in streams:
            groups.setdefault((s.claims.client_id, s.claims.sub), []).append(s)
        leases: dict[str, dict[str, int]] = {}
        audio: dict[str, float] = {}
        for (c, sub), members in groups.items():
            ids = {s.stream_id: until_ms for s in members}
            leases[k.lease_subject(c, sub)] = ids
            leases.setdefault(k.lease_client(c), {}).update(ids)
            seconds = 0.0
            for s in members:
                seconds, s.audio_s = seconds + s.audio_s, 0.0
            audio[k.audio_subject(c, today, sub)] = seconds
            client_key = k.audio_client(c, today)
            audio[client_key] = audio.get(client_key, 0.0) + seconds
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, ids in leases.items():
                pipe.zadd(key, ids, xx=True)  # xx: a lease released meanwhile stays released
            for key, seconds in audio.items():
                pipe.incrbyfloat(key, seconds)
                pipe.expire(key, 2 * 86400)
            results = await pipe.execute()
        totals = {key: float(results[len(leases) + 2 * n]) for n, key in enumerate(audio)}
        for (c, sub), members in groups.items():
            subject_s, client_s = totals[k.audio_subject(c, today, sub)], totals[k.audio_client(c, today)]
            for s in members:
                beat.add(s, policies.get(c), subject_s, client_s)
        return beat

    async def release(self, stream: Stream) -> None:
        k, c = self.keys, stream.claims.client_id
        today = day()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(k.lease_subject(c, stream.claims.sub), stream.stream_id)
            pipe.zrem(k.lease_client(c), stream.stream_id)
            if stream.audio_s:
                pipe.incrbyfloat(k.audio_subject(c, today, stream.claims.sub), stream.audio_s)
                pipe.incrbyfloat(k.audio_client(c, today), stream.audio_s)
            await pipe.execute()
        stream.audio_s = 0.0

    async def aclose(self) -> None:
        await self._admit.aclose()


def retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class MemorySessions:
    """The same rules for one process without Redis (`speechgate dev`)."""

    def __init__(self, lease_s: float) -> None:
        self.lease_s = lease_s
        self._leases: dict[str, dict[str, float]] = {}  # key -> stream id -> lease end
        self._sessions: dict[str, float] = {}  # client:jti -> started (s)
        self._used: set[str] = set()
        self._audio: dict[str, float] = {}

    def _live(self, key: str, now: float) -> dict[str, float]:
        leases = {sid: until for sid, until in self._leases.get(key, {}).items() if until > now}
        self._leases[key] = leases
        return leases

    async def admit(
        self, claims: AccessClaims, policy: ClientPolicy, stream_id: str, may_start: bool
    ) -> Admission:
        now, c = time.time(), claims.client_id
        session_key = f"{c}:{claims.jti}"
        started = self._sessions.get(session_key)
        if started is not None and now >= started + claims.max_session_s:
            started = None
        if started is None and not may_start:
            return Admission(False, "expired")
        leases = [self._live(f"{c}:sub:{claims.sub}", now), self._live(f"{c}:all", now)]
        for leases_of, limit, reason in zip(
            leases,
            (policy.max_streams_per_subject, policy.max_streams_per_client),
            ("subject_streams", "client_streams"),
            strict=True,
        ):
            if len(leases_of) >= limit:
                return Admission(False, reason, retry_after(min(leases_of.values()) - now))
        today = day(now)
        if self._audio.get(f"{c}:{today}:sub:{claims.sub}", 0.0) >= policy.audio_s_per_day_subject:
            return Admission(False, "subject_audio")
        if self._audio.get(f"{c}:{today}:all", 0.0) >= policy.audio_s_per_day_client:
            return Admission(False, "client_audio")
        if started is None and claims.single_use:
            if session_key in self._used:
                return Admission(False, "used")
            self._used.add(session_key)
        for leases_of in leases:
            leases_of[stream_id] = now + self.lease_s
        if started is None:
            started = self._sessions[session_key] = now
        return Admission(True, "ok", 0, int(started * 1000))

    async def heartbeat(self, streams: Sequence[Stream], policies: dict[str, ClientPolicy]) -> Beat:
        now, today, beat = time.time(), day(), Beat()
        for s in streams:
            c = s.claims.client_id
            for key in (f"{c}:sub:{s.claims.sub}", f"{c}:all"):
                self._live(key, now)[s.stream_id] = now + self.lease_s
            subject_total = self._add(f"{c}:{today}:sub:{s.claims.sub}", s.audio_s)
            client_total = self._add(f"{c}:{today}:all", s.audio_s)
            s.audio_s = 0.0
            beat.add(s, policies.get(c), subject_total, client_total)
        return beat

    def _add(self, key: str, seconds: float) -> float:
        self._audio[key] = self._audio.get(key, 0.0) + seconds
        return self._audio[key]

    async def release(self, stream: Stream) -> None:
        c = stream.claims.client_id
        for key in (f"{c}:sub:{stream.claims.sub}", f"{c}:all"):
            self._leases.get(key, {}).pop(stream.stream_id, None)
        today = day()
        self._add(f"{c}:{today}:sub:{stream.claims.sub}", stream.audio_s)
        self._add(f"{c}:{today}:all", stream.audio_s)
        stream.audio_s = 0.0

    async def aclose(self) -> None:
        return None
