"""Revoked tokens: deny entries read by the relay at every handshake.

- one token: `revoked:jti:<jti>`;
- every token of a subject of a client, or of a whole client, issued until now:
  `revoked:{<client>}:sub:<subject>` and `revoked:{<client>}:all`, holding the revocation time
  (tokens with `iat` at or before it are refused; tokens issued later are not).
Each entry lives until the last token it covers can no longer be used (`exp + max_session_s`,
since a stream opened just before `exp` may run that long), then Redis forgets it.
- every token a signing key signed: its kid in the set `revoked:kids`, kept for good (a leaked key
  can sign tokens with any `exp`).
Each revocation is also published so relays close live streams at once; a token revoked again is
acknowledged with no second publish.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from speechgate.core import events
from speechgate.core.claims import AccessClaims
from speechgate.core.events import publish
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import Redis, lua

SIGNING_KEY_REVOKED = "signing key revoked"


class Revocations(Protocol):
    async def revoke_jti(self, jti: str, until: int) -> bool:
        """Revoke one token; False when it was revoked already (nothing is published again)."""
        ...

    async def revoked(self, claims: AccessClaims, kid: str) -> str | None: ...


class RedisRevocations:
    def __init__(self, redis: Redis, keyspace: Keyspace) -> None:
        self.redis = redis
        self.keyspace = keyspace
        self._revoke_jti = redis.register_script(lua(__package__, "revoke_jti.lua"))

    async def revoke_jti(self, jti: str, until: int) -> bool:
        event = events.encode({"type": "revoke", "jti": jti})
        done = await self._revoke_jti(
            keys=[self.keyspace.revoked_jti(jti)], args=[until, self.keyspace.events, event]
        )
        return bool(done)

    async def revoke_subject(self, client_id: str, subject: str, ttl_s: int) -> None:
        now = int(time.time())
        await self.redis.set(self.keyspace.revoked_subject(client_id, subject), str(now), ex=ttl_s)
        await publish(
            self.redis, self.keyspace, {"type": "revoke", "client_id": client_id, "sub": subject, "at": now}
        )

    async def revoke_client(self, client_id: str, ttl_s: int) -> None:
        now = int(time.time())
        await self.redis.set(self.keyspace.revoked_client(client_id), str(now), ex=ttl_s)
        await publish(self.redis, self.keyspace, {"type": "revoke", "client_id": client_id, "at": now})

    async def revoke_signing_key(self, kid: str) -> None:
        await self.redis.sadd(self.keyspace.revoked_signing_keys, kid)
        await publish(self.redis, self.keyspace, {"type": "revoke", "kid": kid})

    async def revoked(self, claims: AccessClaims, kid: str) -> str | None:
        """Why the token (signed by `kid`) is revoked, or None."""
        keys = self.keyspace
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys.revoked_jti(claims.jti))
            pipe.get(keys.revoked_subject(claims.client_id, claims.sub))
            pipe.get(keys.revoked_client(claims.client_id))
            pipe.sismember(keys.revoked_signing_keys, kid)
            jti, subject_at, client_at, signing_key = await pipe.execute()
        if signing_key:
            return SIGNING_KEY_REVOKED
        if jti:
            return "token revoked"
        if subject_at is not None and claims.iat <= int(subject_at):
            return "subject revoked"
        if client_at is not None and claims.iat <= int(client_at):
            return "client revoked"
        return None


class MemoryRevocations:
    """For a single process without Redis (`speechgate dev`): the token service and the relay
    share one instance, and the relay subscribes to it as it would to the Redis channel."""

    def __init__(self) -> None:
        self._until: dict[str, int] = {}
        self._subscribers: list[Callable[[dict[str, Any]], Awaitable[None]]] = []

    def subscribe(self, handler: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        self._subscribers.append(handler)

    async def revoke_jti(self, jti: str, until: int) -> bool:
        now = time.time()
        self._until = {k: v for k, v in self._until.items() if v > now}
        if jti in self._until:
            return False
        self._until[jti] = until
        for handler in self._subscribers:
            await handler({"type": "revoke", "jti": jti})
        return True

    async def revoked(self, claims: AccessClaims, kid: str) -> str | None:
        return "token revoked" if self._until.get(claims.jti, 0) > time.time() else None


def revocations_for(redis: Redis | None, keyspace: Keyspace) -> Revocations:
    """Redis when there is one; else this process alone."""
    return RedisRevocations(redis, keyspace) if redis is not None else MemoryRevocations()
