"""Revoked tokens: a deny list read by the relay at every handshake.

An entry lives until the token can no longer matter (`exp` + `max_session_s`, since a stream opened
just before `exp` may run that long), then Redis forgets it by itself. Each revocation is also
published so relays close live streams at once.
"""

from __future__ import annotations

import time
from typing import Protocol

from token_service.events import publish
from token_service.keyspace import Keyspace
from token_service.redisconn import Redis


class Revocations(Protocol):
    async def revoke_jti(self, jti: str, until: int) -> None: ...

    async def is_revoked(self, jti: str) -> bool: ...


class RedisRevocations:
    def __init__(self, redis: Redis, keyspace: Keyspace) -> None:
        self.redis = redis
        self.keyspace = keyspace

    async def revoke_jti(self, jti: str, until: int) -> None:
        # Two commands, not a pipeline: Redis Cluster refuses PUBLISH inside one.
        await self.redis.set(self.keyspace.revoked_jti(jti), "1", exat=until)
        await publish(self.redis, self.keyspace, {"type": "revoke", "jti": jti})

    async def is_revoked(self, jti: str) -> bool:
        return bool(await self.redis.exists(self.keyspace.revoked_jti(jti)))


class MemoryRevocations:
    """For a single process without Redis (`speechgate dev`)."""

    def __init__(self) -> None:
        self._until: dict[str, int] = {}

    async def revoke_jti(self, jti: str, until: int) -> None:
        now = time.time()
        self._until = {k: v for k, v in self._until.items() if v > now}
        self._until[jti] = until

    async def is_revoked(self, jti: str) -> bool:
        return self._until.get(jti, 0) > time.time()
