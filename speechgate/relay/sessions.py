"""Session rules enforced in Redis, so that they hold across any number of relay processes.

- concurrent streams per subject and per client: leases in sorted sets, renewed by a heartbeat;
  a relay that dies stops renewing and its slots free themselves within the lease time;
- audio seconds per day per subject and per client, metered from the audio actually forwarded;
- single-use tokens open one session; a session may reconnect (the SDK does, after Azure closes
  a connection or the network drops) with the same token, expired or not, while it is within its
  `max_session_s`.

Size: the same rules twice, in Redis for every replica and in this process as the fallback while
Redis is away (the contract tests hold the two to one set of cases); apart, each would need the
other's stream bookkeeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from speechgate.core.claims import AccessClaims
from speechgate.core.clients import ClientPolicy
from speechgate.core.keyspace import Keyspace, day
from speechgate.core.redisconn import Redis, ScriptRunner, lua

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
    audio_s: float = 0.0  # metered since the per-process rules last counted it
    total_audio_s: float = 0.0
    in_metrics_s: float = 0.0  # how much of total_audio_s the Prometheus counter has
    byte_rate: int = 32000
    closing_reason: str | None = field(default=None)
    backend: Sessions | None = None  # the Sessions that admitted it, and so release it
    released: bool = False  # ended: its leases go, whatever a heartbeat under way says
    # Redis counts a stream's audio by its running total per day (idempotent: a write that timed
    # out but ran, and its retry, count once); the day and the total when that day began for it.
    day: str = ""
    day_base_s: float = 0.0
    reported_s: float = 0.0  # total_audio_s as the last successful write carried it
    # Continuity: on the session's audio time line, how far audio has been counted (the mark: a
    # reconnect starts at the one its ended connection left, `start_mark_s`, and each counted
    # second moves it on) and how far behind it the next audio goes. The SDKs replay
    # unconfirmed audio from an offset they name (a new connection, or a new turn on the same
    # one); what lies before the mark is not counted again, within the session's replay budget,
    # so that naming offset 0 on every turn buys nothing.
    start_mark_s: float = 0.0
    behind_s: float = 0.0
    replay_budget_s: float = 0.0

    @property
    def mark_s(self) -> float:
        return self.start_mark_s + self.total_audio_s

    def add_audio(self, payload_bytes: int) -> None:
        seconds = payload_bytes / self.byte_rate
        behind = self.behind_s
        if behind <= 0.0:  # new audio: the usual case (hot path)
            self.audio_s += seconds
            self.total_audio_s += seconds
        elif seconds <= behind:  # replayed audio, counted before
            self.behind_s = behind - seconds
            self.replay_budget_s -= seconds
        else:  # the replay's end, then new audio
            self.behind_s = 0.0
            self.replay_budget_s -= behind
            self.audio_s += seconds - behind
            self.total_audio_s += seconds - behind

    def context(self, continuation_s: float | None) -> None:
        """A speech.context: one that continues the session replays audio from where it says."""
        if continuation_s is None:
            return
        mark = self.mark_s
        start = max(continuation_s, mark - self.replay_budget_s, 0.0)
        if start < mark - self.behind_s:
            self.behind_s = mark - start

    def total_today(self, today: str) -> float:
        """This stream's audio on `today` (UTC): what the shared counters should hold of it."""
        if self.day != today:
            if self.day:  # a new day: what was not written before midnight counts on this one
                self.day_base_s = self.reported_s
            self.day = today
        return self.total_audio_s - self.day_base_s

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


REPLAY_BUDGET_S = 60.0  # audio a session's reconnects may replay uncounted, in all


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str  # "ok" or a key of relay.admission.REFUSALS
    retry_after_s: int = 0
    started_ms: int = 0
    resume_mark_s: float = 0.0  # what the session's last ended connection left (Stream.context)
    replay_budget_s: float = REPLAY_BUDGET_S


AUDIO_TTL_S = 2 * 86400


# Streams of one client in one beat script. A script holds Redis for everyone else while it runs
# (about 13-15 µs a stream here): 128 keep each call near 2 ms (bench/beat_cost.py).
BEAT_CHUNK = 128


class RedisSessions:
    def __init__(self, redis: Redis, keyspace: Keyspace, lease_s: float, chunk: int = BEAT_CHUNK) -> None:
        self.redis = redis
        self.keys = keyspace
        self.lease_ms = int(lease_s * 1000)
        self.chunk = chunk
        self._admit = ScriptRunner(redis, lua(__package__, "admit.lua"))
        self._beat = ScriptRunner(redis, lua(__package__, "beat.lua"))

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
            k.resume(c, claims.jti),
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
            stream_prefix(claims.jti),
        ]
        admitted, reason, retry, started, *resume = await self._admit(keys, args)
        reason = reason.decode() if isinstance(reason, bytes) else str(reason)
        if len(resume) == 2 and resume[0] and resume[1]:
            return Admission(
                bool(admitted), reason, int(retry), int(started), float(resume[0]), float(resume[1])
            )
        return Admission(bool(admitted), reason, int(retry), int(started))

    async def heartbeat(self, streams: Sequence[Stream], policies: dict[str, ClientPolicy]) -> Beat:
        """Renew every lease, count the audio, and find the streams over a quota.

        One script per client and `chunk` of its streams, not per stream: a relay with a thousand
        streams of a few users sends a few commands, not thousands (the beat runs on the event
        loop that forwards audio, and a long one shows as latency in every stream), and no one
        call holds Redis long for everyone else. Streams that ended meanwhile (`released`) lose
        the lease this beat may have renewed.
        """
        beat = Beat()
        by_client = _by_client(streams)
        for c, totals in (await self._write_all(by_client)).items():
            for s in by_client[c]:
                if not s.released:
                    beat.add(s, policies.get(c), totals[s.claims.sub], totals[""])
        ended = [s for s in streams if s.released]
        if ended:
            await self.settle(ended)
        return beat

    async def release(self, stream: Stream) -> None:
        """The stream ended: free its slots and count the last of its audio."""
        stream.released = True
        await self.settle([stream])

    async def settle(self, streams: Sequence[Stream]) -> None:
        """Write the final state of ended streams (again, after a failure: the write is idempotent)."""
        await self._write_all(_by_client(streams))

    async def _write_all(self, by_client: dict[str, list[Stream]]) -> dict[str, dict[str, float]]:
        """Every client's streams, a chunk a script; each client's day totals as its last
        chunk left them (they only grow: the largest seen is the latest)."""
        calls = [
            (c, group[at : at + self.chunk])
            for c, group in by_client.items()
            for at in range(0, len(group), self.chunk)
        ]
        results = await asyncio.gather(*(self._write(c, part) for c, part in calls))
        merged: dict[str, dict[str, float]] = {}
        for (c, _), totals in zip(calls, results, strict=True):
            into = merged.setdefault(c, {})
            for who, total in totals.items():
                into[who] = max(total, into.get(who, total))
        return merged

    async def _write(self, client_id: str, streams: list[Stream]) -> dict[str, float]:
        """One client's streams in one script: leases renewed (or removed, for ended streams),
        each stream's running audio total recorded, the difference added to the day's counters.
        Returns the day's totals by subject, and the client's under ''."""
        k, today = self.keys, day()
        subjects = sorted({s.claims.sub for s in streams})
        index = {sub: n for n, sub in enumerate(subjects, 1)}
        keys = [k.audio_streams(client_id, today), k.audio_client(client_id, today)]
        keys.append(k.lease_client(client_id))
        for sub in subjects:
            keys += [k.lease_subject(client_id, sub), k.audio_subject(client_id, today, sub)]
        now = time.time()
        args: list[int | str] = [
            int(now * 1000) + self.lease_ms,
            2 * self.lease_ms,
            AUDIO_TTL_S,
            len(subjects),
        ]
        sent = []
        for s in streams:
            total = s.total_audio_s
            sent.append(total)
            keys.append(k.resume(client_id, s.claims.jti))
            args += [
                s.stream_id,
                repr(s.total_today(today)),
                index[s.claims.sub],
                0 if s.released else 1,
                repr(s.mark_s),
                repr(s.replay_budget_s),
                max(0, int(s.session_deadline - now)),
            ]
        values = await self._beat(keys, args)
        for s, total in zip(streams, sent, strict=True):
            s.reported_s = max(s.reported_s, total)
        totals = {"": float(values[0])}
        totals.update({sub: float(values[n]) for sub, n in index.items()})
        return totals

    async def aclose(self) -> None:
        await self._admit.aclose()
        await self._beat.aclose()


def _by_client(streams: Sequence[Stream]) -> dict[str, list[Stream]]:
    grouped: dict[str, list[Stream]] = {}
    for s in streams:
        grouped.setdefault(s.claims.client_id, []).append(s)
    return grouped


def stream_prefix(jti: str) -> str:
    """What every stream id of a token starts with: a single-use token's live stream is found by
    it among its subject's leases."""
    return hashlib.sha256(jti.encode()).hexdigest()[:16] + "."


def new_stream_id(claims: AccessClaims) -> str:
    return stream_prefix(claims.jti) + uuid.uuid4().hex


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
        self._resume: dict[str, tuple[float, float]] = {}  # client:jti -> (mark, replay budget)

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
            if not may_start:
                return Admission(False, "session_over")
            started = None
        if started is None and not may_start:
            return Admission(False, "expired")
        leases = [self._live(f"{c}:sub:{claims.sub}", now), self._live(f"{c}:all", now)]
        if claims.single_use and any(sid.startswith(stream_prefix(claims.jti)) for sid in leases[0]):
            return Admission(False, "in_use")
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
        mark, budget = self._resume.pop(session_key, (0.0, REPLAY_BUDGET_S))
        return Admission(True, "ok", 0, int(started * 1000), mark, budget)

    async def heartbeat(self, streams: Sequence[Stream], policies: dict[str, ClientPolicy]) -> Beat:
        now, today, beat = time.time(), day(), Beat()
        for s in streams:
            c = s.claims.client_id
            for key in (f"{c}:sub:{s.claims.sub}", f"{c}:all"):
                self._live(key, now)[s.stream_id] = now + self.lease_s
            self._add(f"{c}:{today}:sub:{s.claims.sub}", s.audio_s)
            self._add(f"{c}:{today}:all", s.audio_s)
            s.audio_s = 0.0
        # Each stream is judged on the totals after all of them, as in Redis (one script per
        # client): a subject over its quota has every one of its streams ended, not the last.
        for s in streams:
            c = s.claims.client_id
            subject_total = self._audio.get(f"{c}:{today}:sub:{s.claims.sub}", 0.0)
            beat.add(s, policies.get(c), subject_total, self._audio.get(f"{c}:{today}:all", 0.0))
        return beat

    def _add(self, key: str, seconds: float) -> float:
        self._audio[key] = self._audio.get(key, 0.0) + seconds
        return self._audio[key]

    def hold(self, streams: Iterable[Stream]) -> None:
        """Leases here for streams another rule admitted (Redis, before it went away): the
        per-process rules count every stream live in this process, not only their own."""
        until = time.time() + self.lease_s
        for stream in streams:
            c = stream.claims.client_id
            for key in (f"{c}:sub:{stream.claims.sub}", f"{c}:all"):
                self._leases.setdefault(key, {})[stream.stream_id] = until

    def forget(self, stream: Stream) -> None:
        """Free the stream's slots here: it has moved to the shared rules."""
        c = stream.claims.client_id
        for key in (f"{c}:sub:{stream.claims.sub}", f"{c}:all"):
            self._leases.get(key, {}).pop(stream.stream_id, None)

    async def release(self, stream: Stream) -> None:
        self.forget(stream)
        c = stream.claims.client_id
        if stream.mark_s > 0:
            self._resume[f"{c}:{stream.claims.jti}"] = (stream.mark_s, stream.replay_budget_s)
        today = day()
        self._add(f"{c}:{today}:sub:{stream.claims.sub}", stream.audio_s)
        self._add(f"{c}:{today}:all", stream.audio_s)
        stream.audio_s = 0.0

    async def aclose(self) -> None:
        return None
