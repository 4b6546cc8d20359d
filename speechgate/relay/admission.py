"""The handshake checks: everything a stream must satisfy is checked before the upgrade, so that
the Speech SDKs surface a clean 401/403/429 (a `Refusal`), and nothing is forwarded for a stream
that would be refused later."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from websockets.http11 import Request

from speechgate.core.claims import AccessClaims
from speechgate.core.clients import ClientPolicy, ClientRegistry
from speechgate.core.keyspace import seconds_to_midnight
from speechgate.core.redisconn import REDIS_ERRORS, RedisHealth
from speechgate.core.revocation import Revocations
from speechgate.relay.auth import Authenticator, Refusal, authorize, find_token
from speechgate.relay.doors.plain import plain_format
from speechgate.relay.endpoints import endpoint_for, message_rules, upstream_query
from speechgate.relay.http import asks_for_upgrade, header
from speechgate.relay.live import Pending
from speechgate.relay.pool import NoUpstream, Pool, Want
from speechgate.relay.sessions import MemorySessions, RedisSessions, Sessions, Stream, new_stream_id
from speechgate.relay.upstream import UpstreamError
from speechgate.relay.voices import VoiceList, for_token

log = logging.getLogger("speechgate.relay")

REFUSALS = {
    "expired": (
        401,
        "token_expired",
        "the token has expired and opened no session that may reconnect; get a new one",
    ),
    "used": (401, "token_used", "this single-use token has opened its session already; get a new one"),
    "session_over": (
        401,
        "session_over",
        "this token's session has reached its time limit (max_session_s); get a new token",
    ),
    "in_use": (
        409,
        "token_in_use",
        "this single-use token holds a live stream already; it opens one stream at a time",
    ),
    "subject_streams": (429, "too_many_streams", "this user has as many live streams as allowed"),
    "client_streams": (429, "too_many_streams", "this app has as many live streams as allowed"),
    "subject_audio": (429, "audio_quota", "this user's daily audio quota is used up"),
    "client_audio": (429, "audio_quota", "this app's daily audio quota is used up"),
}


# When no upstream of the pool may take a stream: the pool's capacity, not the user's quota.
UPSTREAM_REFUSALS = {
    "full": (
        429,
        "upstream_capacity",
        "every Azure Speech resource this stream may use is at its concurrency capacity; retry shortly",
    ),
    "down": (
        503,
        "upstream_unavailable",
        "every Azure Speech resource this stream may use is refusing connections now; retry shortly",
    ),
    "none": (
        503,
        "no_upstream",
        "no Azure Speech resource serves this path and language in this app's zones; "
        "ask the operators (speechgate upstreams list)",
    ),
}


class Gatekeeper:
    """The rules of the handshake, over the relay's shared state (given, not owned)."""

    def __init__(
        self,
        auth: Authenticator,
        clients: ClientRegistry,
        revocations: Revocations,
        health: RedisHealth,
        local_sessions: MemorySessions,
        redis_sessions: RedisSessions | None,
        voice_list: VoiceList,
        pool: Pool,
        has_redis: bool,
        live_streams: Callable[[], Iterable[Stream]] = tuple,
        write_leases: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`live_streams`: the streams live in this process; `write_leases`: writes each one's
        lease (and audio) to Redis, what the relay's heartbeat does."""
        self.auth = auth
        self.clients = clients
        self.revocations = revocations
        self.health = health
        self.local_sessions = local_sessions
        self.redis_sessions = redis_sessions
        self.voice_list = voice_list
        self.pool = pool
        self.has_redis = has_redis
        self.live_streams = live_streams
        self.write_leases = write_leases
        self._written_after = 0  # the outages (RedisHealth.outages) the leases were written after
        self._writing: asyncio.Future[bool] | None = None

    async def _shared_rules_ready(self) -> bool:
        """Whether Redis's rules may admit: only once every stream live here has its lease there
        again since Redis last went away (after a restart Redis holds none; after a hang past the
        lease they have lapsed). The first admission after an outage writes them, those beside
        it wait for that write; until it succeeds, the per-process rules admit."""
        outages = self.health.outages
        if outages == self._written_after or self.write_leases is None:
            return True
        if self._writing is None:
            self._writing = asyncio.ensure_future(self._write_leases(outages))
        return await asyncio.shield(self._writing)

    async def _write_leases(self, outages: int) -> bool:
        try:
            assert self.write_leases is not None
            await self.write_leases()  # marks Redis down again if it fails
            if self.health.up and self.health.outages == outages:
                self._written_after = outages
            return self._written_after == outages
        finally:
            self._writing = None

    async def admit(
        self, request: Request, path: str, params: list[tuple[str, str]], draining: bool
    ) -> Pending:
        """Every rule a stream must satisfy, in the order that costs least first; a `Refusal`
        says which failed. The stream's slot is held from here: `Relay.after_handshake` gives it
        back when the upgrade then fails."""
        endpoint = endpoint_for(path)
        if not asks_for_upgrade(request):
            raise Refusal(426, "upgrade_required", "this endpoint takes a WebSocket connection")
        door = endpoint.door
        if door == "plain":
            plain_format(params)
        if draining:
            raise Refusal(503, "draining", "this relay is shutting down; connect again", 1)
        claims, kid = await self.auth.verify(find_token(request.headers, params, door == "plain"))
        languages = [v for k, v in params if k.lower() == "language"]
        # Universal v2 may name its language in speech.context only (checked there: Rules).
        required = endpoint.kind not in ("synthesis", "universal") and not any(
            k.lower() == "from" for k, _ in params
        )
        authorize(claims, endpoint.scopes(params), languages, required)
        policy = await self.clients.get(claims.client_id)
        if not isinstance(policy, ClientPolicy) or not policy.enabled:  # unknown or disabled
            raise Refusal(403, "client_disabled", "the app this token was issued to is disabled")
        origin = header(request, "Origin") or None
        if origin is not None and policy.origins and origin not in policy.origins:
            raise Refusal(403, "origin_not_allowed", f"pages of {origin[:60]} may not use this app's tokens")
        query = upstream_query(endpoint, params, policy, claims) if door == "azure" else ""
        stream_id = new_stream_id(claims)
        may_start = time.time() < claims.exp
        sessions: Sessions = self.local_sessions
        if self.redis_sessions is not None and self.health.up and await self._shared_rules_ready():
            try:
                await self.refuse_if_revoked(claims, kid)
                admission = await self.redis_sessions.admit(claims, policy, stream_id, may_start)
                sessions = self.redis_sessions
            except REDIS_ERRORS as exc:
                self.health.mark_down(exc)  # revocations cannot be read until Redis is back
        if sessions is self.local_sessions:
            if not self.has_redis:  # development: revocations live in this process
                await self.refuse_if_revoked(claims, kid)
            else:  # Redis is away: the streams it admitted here count in this process's rules too
                self.local_sessions.hold(
                    s for s in self.live_streams() if s.backend is not self.local_sessions
                )
            admission = await self.local_sessions.admit(claims, policy, stream_id, may_start)
        if not admission.admitted:
            status, error, message = REFUSALS[admission.reason]
            retry = admission.retry_after_s or (seconds_to_midnight() if status == 429 else None)
            raise Refusal(status, error, message, retry)
        rules = message_rules(endpoint, params, claims, policy)
        pending = Pending(claims, kid, stream_id, endpoint, path, params, query, sessions, admission, rules)
        if not self.pool.active:
            return pending
        spoken = languages or [v for k, v in params if k.lower() == "from"]  # translation's source
        # The plain door speaks recognition to Azure ("stt"), whatever its own path.
        want = Want(endpoint.service or "stt", spoken[0] if spoken else None, policy.zones)
        try:
            placement = await self.pool.assign(stream_id, want)
        except NoUpstream as exc:
            with contextlib.suppress(*REDIS_ERRORS):  # else its lease lapses
                await sessions.release(pending.stream())
            status, error, message = UPSTREAM_REFUSALS[exc.why]
            raise Refusal(status, error, message, exc.retry_after_s or None) from None
        return dataclasses.replace(pending, placement=placement)

    async def voices(self, request: Request, params: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """`GET /cognitiveservices/voices/list` with a token that may synthesize: Azure's list
        (cached; relay.voices), only the token's languages' voices when it restricts them."""
        claims, kid = await self.auth.verify(find_token(request.headers, params, False))
        if time.time() >= claims.exp:
            raise Refusal(401, "token_expired", "the token has expired; get a new one")
        authorize(claims, ("speech:synthesize",), [], False)
        policy = await self.clients.get(claims.client_id)
        if not isinstance(policy, ClientPolicy) or not policy.enabled:
            raise Refusal(403, "client_disabled", "the app this token was issued to is disabled")
        if not self.has_redis or self.health.up:
            try:
                await self.refuse_if_revoked(claims, kid)
            except REDIS_ERRORS as exc:
                self.health.mark_down(exc)
        try:
            voices = await self.voice_list.get()
        except UpstreamError as exc:
            log.warning("voices list unavailable: %s", exc)
            raise Refusal(
                503, "upstream_unavailable", "Azure's voices list cannot be fetched; retry", 30
            ) from None
        return for_token(voices, claims.lang)

    async def refuse_if_revoked(self, claims: AccessClaims, kid: str) -> None:
        reason = await self.revocations.revoked(claims, kid)
        if reason is not None:
            raise Refusal(401, "token_revoked", reason)
