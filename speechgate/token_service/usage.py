"""What each tenant uses right now, read from the live Redis state (`speechgate quotas`).

Reads only what the services write (speechgate/core/keyspace.py): stream leases, daily audio, the
rate-limit windows and the per-minute token stats. Nothing here is on a request path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from speechgate.core.clients import ClientPolicy
from speechgate.core.keyspace import Keyspace, day, glob_literal, seconds_to_midnight, unpart
from speechgate.core.redisconn import Redis
from speechgate.token_service.ratelimit import RedisLimiter, checks_for


@dataclass(frozen=True)
class Window:
    """One rate limit as it stands: the sliding-window count against its limit."""

    limit: str  # e.g. "subject 20/minute"
    ident: str
    used: int
    amount: int
    reset_s: int


@dataclass
class Usage:
    client_id: str
    subject: str | None
    streams: int
    streams_limit: int
    audio_s: float
    audio_limit_s: int
    issued_1m: int = 0
    refused_1m: int = 0

    @property
    def ratio(self) -> float:
        """The fuller of the two quotas, 0..1+: what `top` sorts by."""
        return max(self.streams / max(self.streams_limit, 1), self.audio_s / max(self.audio_limit_s, 1))

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "audio_s": round(self.audio_s, 1), "ratio": round(self.ratio, 4)}


@dataclass
class Detail:
    """Everything `quotas show` prints for a client (or one of its subjects)."""

    usage: Usage
    windows: list[Window] = field(default_factory=list)
    leases: list[dict[str, Any]] = field(default_factory=list)  # stream id, lease left
    audio_reset_s: int = 0
    revoked_at: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.usage.as_dict(),
            "windows": [asdict(w) for w in self.windows],
            "leases": self.leases,
            "audio_reset_s": self.audio_reset_s,
            "revoked_at": self.revoked_at,
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _minute_weights(now: float) -> tuple[int, int, float]:
    """The stats buckets of the last 60 s: this minute in full, the one before by what is left of it."""
    minute = int(now // 60)
    return minute, minute - 1, 1 - (now % 60) / 60


def _queue_stats(pipe: Any, keys: Keyspace, client_id: str, now: float) -> None:
    """Queue the reads `_stats` needs: this minute's and the previous minute's hash."""
    current, previous, _ = _minute_weights(now)
    pipe.hgetall(keys.stats(client_id, current))
    pipe.hgetall(keys.stats(client_id, previous))


def _stats(this_minute: dict[Any, Any], last_minute: dict[Any, Any], now: float) -> dict[str, float]:
    """Tokens issued and refused in the last minute, by hash field (`issued`, `refused:<subject>`)."""
    weight = _minute_weights(now)[2]
    totals: dict[str, float] = {}
    for values, factor in ((this_minute, 1.0), (last_minute, weight)):
        for name, count in values.items():
            totals[_text(name)] = totals.get(_text(name), 0.0) + int(count) * factor
    return totals


async def client_usage(redis: Redis, keys: Keyspace, policies: list[ClientPolicy], now: float) -> list[Usage]:
    today, now_ms = day(now), int(now * 1000)
    async with redis.pipeline(transaction=False) as pipe:  # one round trip for every client
        for policy in policies:
            pipe.zcount(keys.lease_client(policy.client_id), now_ms, "+inf")
            pipe.get(keys.audio_client(policy.client_id, today))
            _queue_stats(pipe, keys, policy.client_id, now)
        values = await pipe.execute()
    found = []
    for n, policy in enumerate(policies):
        streams, audio, this_minute, last_minute = values[4 * n : 4 * n + 4]
        stats = _stats(this_minute, last_minute, now)
        found.append(
            Usage(
                policy.client_id,
                None,
                int(streams),
                policy.max_streams_per_client,
                float(audio or 0),
                policy.audio_s_per_day_client,
                round(stats.get("issued", 0)),
                round(stats.get("refused", 0)),
            )
        )
    return found


async def subject_usage(
    redis: Redis, keys: Keyspace, policies: list[ClientPolicy], now: float
) -> list[Usage]:
    """Every subject with a live stream, audio today or tokens in the last minute."""
    today, now_ms = day(now), int(now * 1000)
    found = []
    for policy in policies:
        c = policy.client_id
        audio_prefix = keys.audio_subject(c, today, "")
        lease_prefix = keys.lease_subject(c, "")
        subjects: set[str] = set()
        async for key in redis.scan_iter(match=glob_literal(audio_prefix) + "*", count=1000):
            subjects.add(unpart(_text(key).removeprefix(audio_prefix)))
        async for key in redis.scan_iter(match=glob_literal(lease_prefix) + "*", count=1000):
            subjects.add(unpart(_text(key).removeprefix(lease_prefix)))
        async with redis.pipeline(transaction=False) as pipe:
            _queue_stats(pipe, keys, c, now)
            this_minute, last_minute = await pipe.execute()
        stats = _stats(this_minute, last_minute, now)
        subjects |= {name.split(":", 1)[1] for name in stats if ":" in name}
        ordered = sorted(subjects)
        async with redis.pipeline(transaction=False) as pipe:
            for subject in ordered:
                pipe.zcount(keys.lease_subject(c, subject), now_ms, "+inf")
                pipe.get(keys.audio_subject(c, today, subject))
            values = await pipe.execute()
        for n, subject in enumerate(ordered):
            found.append(
                Usage(
                    c,
                    subject,
                    int(values[2 * n]),
                    policy.max_streams_per_subject,
                    float(values[2 * n + 1] or 0),
                    policy.audio_s_per_day_subject,
                    round(stats.get(f"issued:{subject}", 0)),
                    round(stats.get(f"refused:{subject}", 0)),
                )
            )
    return found


async def detail(
    redis: Redis,
    keys: Keyspace,
    policy: ClientPolicy,
    subject: str | None,
    clock: Callable[[], float] = time.time,
) -> Detail:
    """`clock` is read again after the leases are: a relay renewing a lease between a reading
    taken before and the read once showed more than a whole lease left (15.2 of 15 s)."""
    now = clock()
    c = policy.client_id
    if subject is None:
        (usage,) = await client_usage(redis, keys, [policy], now)
    else:
        usage = next(
            (u for u in await subject_usage(redis, keys, [policy], now) if u.subject == subject),
            Usage(c, subject, 0, policy.max_streams_per_subject, 0.0, policy.audio_s_per_day_subject),
        )
    limits = policy.rate_limits
    checks = checks_for(c, subject or "", "", limits.client, limits.subject if subject else "", "")
    limiter = RedisLimiter(redis, keys)
    windows = []
    try:
        for check in checks:
            used, reset_ms = await limiter.peek(c, check)
            label = f"{check.policy} {check.item}"
            windows.append(Window(label, check.ident, used, check.amount, math.ceil(reset_ms / 1000)))
    finally:
        await limiter.aclose()
    lease_key = keys.lease_client(c) if subject is None else keys.lease_subject(c, subject)
    live: list[Any] = await redis.zrangebyscore(lease_key, int(now * 1000), "+inf", withscores=True)
    read_ms = clock() * 1000  # no renewal written before the read was written after this
    leases = [
        {"stream_id": _text(stream), "lease_left_s": max(0.0, round((float(until) - read_ms) / 1000, 1))}
        for stream, until in live
    ]
    revoked_key = keys.revoked_client(c) if subject is None else keys.revoked_subject(c, subject)
    revoked = await redis.get(revoked_key)
    return Detail(usage, windows, leases, seconds_to_midnight(now), int(float(revoked)) if revoked else None)


async def reset(redis: Redis, keys: Keyspace, policy: ClientPolicy, subject: str | None, now: float) -> int:
    """Forget today's audio and the rate-limit windows of a client (or one subject); live streams
    keep their leases (they are real). Returns how many keys were deleted."""
    c, today = policy.client_id, day(now)
    if subject is None:
        patterns = [
            glob_literal(keys.audio_client(c, today)),
            glob_literal(keys.audio_subject(c, today, "")) + "*",
            keys.rates_pattern(c),
        ]
        found: list[Any] = []
        for pattern in patterns:
            found += [key async for key in redis.scan_iter(match=pattern, count=1000)]
    else:  # the subject's own windows, by their exact names
        windows = [
            keys.rate(c, check.policy, check.ident, check.amount, check.window_s)
            for check in checks_for(c, subject, "", "", policy.rate_limits.subject, "")
        ]
        found = [keys.audio_subject(c, today, subject), *windows, *map(Keyspace.previous_window, windows)]
    deleted = 0
    for key in found:  # one by one: on Redis Cluster a multi-key DEL must stay in one slot
        deleted += int(await redis.delete(key))
    return deleted
