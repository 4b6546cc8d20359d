"""Rate limits on token requests: per client, per subject and per source IP.

What a limit means is apart from where its counters live (as in `limits`):
- `Check` is one limit to apply (a policy name, who it counts, amount per window);
- `RedisLimiter` applies all of a request's checks in one Lua script, one round trip, and counts
  a hit only when every check passes. Round trips are the token endpoint's main cost, and
  separate `limits` hits would also count a request against one limit that another refused.
  The algorithm is `limits`' sliding-window counter (constant memory per key, unlike the moving
  window whose list grows with the limit, alisaifee/limits#268), windows timed by key TTLs so
  replicas need no shared clock;
- `LocalLimiter` is `limits`' own sliding-window counter in memory: the per-process fallback
  while Redis is down, and the limiter of `speechgate dev` without Redis;
- `FailoverLimiter` uses Redis while it answers and the local one while it does not.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import limits
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import REDIS_ERRORS, Redis, RedisHealth, ScriptRunner, lua


@dataclass(frozen=True)
class Check:
    policy: str  # "client", "subject" or "ip": what is counted
    ident: str  # whom: the subject or the address (the client id for "client")
    item: limits.RateLimitItem

    @property
    def amount(self) -> int:
        return int(self.item.amount)

    @property
    def window_s(self) -> int:
        return int(self.item.get_expiry())

    @property
    def name(self) -> str:
        return f"{self.policy}-{self.window_s}s"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int  # when refused: how long until the request would pass
    remaining: tuple[int, ...]  # per check, after this request
    reset_s: tuple[int, ...]  # per check, seconds until its window moves on


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> tuple[limits.RateLimitItem, ...]:
    """`limits` notation, e.g. "20/minute;300/hour"; empty means no limit."""
    return tuple(limits.parse_many(text)) if text else ()


TOKENS, REVOCATIONS, INTROSPECTIONS = "tokens", "revocations", "introspections"  # what a hit counts


def checks_for(
    client_id: str, subject: str, address: str, client: str, per_subject: str, per_ip: str
) -> list[Check]:
    found = [Check("client", client_id, item) for item in parse(client)]
    found += [Check("subject", subject, item) for item in parse(per_subject)]
    found += [Check("ip", address, item) for item in parse(per_ip)]
    return found


class Limiter(Protocol):
    async def hit(
        self, client_id: str, subject: str, checks: Sequence[Check], counted: str = TOKENS
    ) -> Decision: ...


class RedisLimiter:
    def __init__(self, redis: Redis, keyspace: Keyspace) -> None:
        self.keyspace = keyspace
        self._script = ScriptRunner(redis, lua(__package__, "rate_hit.lua"))
        self._read = ScriptRunner(redis, lua(__package__, "rate_read.lua"))

    async def hit(
        self, client_id: str, subject: str, checks: Sequence[Check], counted: str = TOKENS
    ) -> Decision:
        """`counted`: what the request is counted as in the per-minute stats (`quotas` reads
        the tokens'): TOKENS, REVOCATIONS or INTROSPECTIONS."""
        keys: list[str] = []
        args: list[int | str] = []
        for check in checks:
            keys += self._windows(client_id, check)
            args += (check.amount, check.window_s)
        minute = int(time.time() // 60)
        keys.append(
            self.keyspace.stats(client_id, minute)
            if counted == TOKENS
            else self.keyspace.call_stats(client_id, counted, minute)
        )
        args.append(subject)
        values = [int(v) for v in await self._script(keys, args)]
        return Decision(
            allowed=values[0] == 1,
            retry_after_s=math.ceil(values[1] / 1000),
            remaining=tuple(values[2::2]),
            reset_s=tuple(math.ceil(v / 1000) for v in values[3::2]),
        )

    async def peek(self, client_id: str, check: Check) -> tuple[int, int]:
        """(used, ms until the window moves on) of one check, counted as `hit` counts it, without
        counting: the same algorithm, in rate_read.lua (one round trip, one key slot)."""
        used, reset_ms = await self._read(self._windows(client_id, check), [check.window_s])
        return int(used), int(reset_ms)

    def _windows(self, client_id: str, check: Check) -> list[str]:
        """The check's previous and current window keys, in the order both scripts take them."""
        current = self.keyspace.rate(client_id, check.policy, check.ident, check.amount, check.window_s)
        return [self.keyspace.previous_window(current), current]

    async def aclose(self) -> None:
        await self._script.aclose()
        await self._read.aclose()


class LocalLimiter:
    """Per-process limits with `limits`' in-memory sliding-window counter."""

    def __init__(self) -> None:
        self._strategy = SlidingWindowCounterRateLimiter(MemoryStorage())

    async def hit(
        self, client_id: str, subject: str, checks: Sequence[Check], counted: str = TOKENS
    ) -> Decision:
        strategy = self._strategy
        passed = [await strategy.test(c.item, client_id, c.policy, c.ident) for c in checks]
        if all(passed):
            for c in checks:
                await strategy.hit(c.item, client_id, c.policy, c.ident)
        now = time.time()
        remaining, reset = [], []
        retry = 0
        for check, ok in zip(checks, passed, strict=True):
            stats = await strategy.get_window_stats(check.item, client_id, check.policy, check.ident)
            until = max(0, math.ceil(stats.reset_time - now))
            remaining.append(stats.remaining if ok else 0)
            reset.append(until)
            if not ok:
                retry = max(retry, until, 1)
        return Decision(all(passed), retry, tuple(remaining), tuple(reset))


class FailoverLimiter:
    """Shared limits in Redis while it answers; per-process limits while it does not."""

    def __init__(self, redis: RedisLimiter | None, health: RedisHealth, local: LocalLimiter) -> None:
        self.redis = redis
        self.health = health
        self.local = local

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()

    async def hit(
        self, client_id: str, subject: str, checks: Sequence[Check], counted: str = TOKENS
    ) -> Decision:
        if self.redis is not None and self.health.up:
            try:
                return await self.redis.hit(client_id, subject, checks, counted)
            except REDIS_ERRORS as exc:
                self.health.mark_down(exc)
        return await self.local.hit(client_id, subject, checks, counted)
