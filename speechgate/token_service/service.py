"""The token service's state and its I/O: client authentication against the registry, issuing
and revoking tokens, the signing keys kept fresh. The rules themselves are in grants.py (no I/O);
the HTTP endpoints in app.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from speechgate.core.claims import InvalidToken, sign, verify
from speechgate.core.clients import ClientPolicy, ClientRegistry, check_secret, ensure_hash_key
from speechgate.core.events import EventListener
from speechgate.core.idp import IdpUnavailable, JwksCache, SubjectTokenError, verify_subject_token
from speechgate.core.keys import KeyRing, load_keyring
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import REDIS_ERRORS, Redis, RedisHealth
from speechgate.core.revocation import Revocations
from speechgate.core.settings import Settings
from speechgate.core.speechkeys import SPEECH_KEY_SECRET
from speechgate.core.store import SecretStore, StoreError
from speechgate.token_service import grants, oauth
from speechgate.token_service.metrics import TokenMetrics
from speechgate.token_service.oauth import OAuthError, invalid_client, require
from speechgate.token_service.ratelimit import FailoverLimiter, checks_for

log = logging.getLogger("speechgate.token")

# Stands in for a client that does not exist: its secret is checked, and never matches.
_NOBODY = ClientPolicy(client_id="speechgate-nobody", secret_hash="hmac-sha256:" + "0" * 64)


@dataclass
class TokenService:
    """Everything the routes need, built once per app."""

    settings: Settings
    store: SecretStore
    redis: Redis | None
    metrics: TokenMetrics
    http: httpx.AsyncClient
    clients: ClientRegistry
    limiter: FailoverLimiter
    health: RedisHealth
    revocations: Revocations
    jwks_cache: JwksCache
    keyring: KeyRing | None = None
    hash_key: bytes = b""
    store_ok: bool = True
    store_ok_at: float = 0.0
    listener: EventListener | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # --- client authentication ------------------------------------------------------------

    async def authenticate(self, client_id: str | None, secret: str | None) -> ClientPolicy:
        if not client_id:
            raise invalid_client("client_id is required (HTTP Basic or the client_id parameter)")
        try:
            policy = await self.clients.get(client_id)
        except StoreError as exc:
            log.error("client registry unavailable: %s", exc)
            raise OAuthError(
                "temporarily_unavailable",
                "client registry unavailable; retry later",
                503,
                {"Retry-After": "5"},
            ) from None
        if not isinstance(policy, ClientPolicy):
            # No such client, or one disabled in the store (whose secret cannot be read): the
            # same answer as a wrong secret, after the same keyed hash, so that neither the
            # message nor the time tells whether the id exists.
            check_secret(self.hash_key, _NOBODY, secret or "")
            raise invalid_client("unknown client or wrong client secret")
        if policy.public:
            if secret:
                raise invalid_client("this is a public client: send no client_secret")
        elif not secret:
            raise invalid_client("this client must authenticate with its client_secret")
        elif not check_secret(self.hash_key, policy, secret):
            raise invalid_client("unknown client or wrong client secret")
        if not policy.enabled:
            raise invalid_client("this client is disabled")
        return policy

    # --- the token endpoint ---------------------------------------------------------------

    async def issue(self, request: Request, params: dict[str, str]) -> Response:
        grant = grants.grant_type(params)
        client_id, secret = oauth.client_credentials(request.headers.get("authorization"), params)
        policy = await self.authenticate(client_id, secret)
        request.state.client_id = policy.client_id  # for the access log and metrics: authenticated only
        if grant == oauth.GRANT_CLIENT_CREDENTIALS:
            subject = grants.subject_for_client(policy, params)
        else:
            subject = await self._verified_subject(
                policy, grants.subject_token(policy, params, self.settings)
            )
        asked = grants.requested(policy, params)

        address = request.client.host if request.client else "unknown"
        limits_ = policy.rate_limits
        checks = checks_for(policy.client_id, subject, address, limits_.client, limits_.subject, limits_.ip)
        decision = await self.limiter.hit(policy.client_id, subject, checks)
        headers = {**oauth.NO_STORE, **grants.ratelimit_headers(checks, decision)}
        if not decision.allowed:
            headers["Retry-After"] = str(decision.retry_after_s)
            raise OAuthError(
                "slow_down", f"rate limit reached; retry in {decision.retry_after_s} s", 429, headers
            )

        assert self.keyring is not None
        now = int(time.time())
        claims = grants.claims_for(self.settings, policy, subject, asked, now)
        body = {
            "access_token": sign(claims, self.keyring.signer_at(now)),
            "token_type": "Bearer",
            "expires_in": asked.lifetime_s,
            "scope": asked.scope,
            "relay_url": self.settings.relay_url,
        }
        if grant == oauth.GRANT_TOKEN_EXCHANGE:
            body["issued_token_type"] = oauth.ISSUED_TOKEN_TYPE
        self.metrics.issued.labels(policy.client_id, grants.grant_label(grant)).inc()
        return JSONResponse(body, headers=headers)

    async def _verified_subject(self, policy: ClientPolicy, token: str) -> str:
        assert policy.idp is not None  # grants.subject_token makes sure
        try:
            return await verify_subject_token(
                token,
                policy.idp,
                self.jwks_cache,
                our_issuer=self.settings.issuer,
                leeway=self.settings.idp_leeway_s,
            )
        except SubjectTokenError as exc:
            raise OAuthError("invalid_grant", str(exc)) from None
        except IdpUnavailable:
            raise OAuthError(
                "temporarily_unavailable",
                "the identity provider's keys cannot be fetched; retry later",
                503,
                {"Retry-After": "10"},
            ) from None

    # --- revocation (RFC 7009) ------------------------------------------------------------

    async def revoke(self, request: Request, params: dict[str, str]) -> Response:
        client_id, secret = oauth.client_credentials(request.headers.get("authorization"), params)
        policy = await self.authenticate(client_id, secret)
        token = require(params, "token")
        assert self.keyring is not None
        try:
            claims = verify(
                token,
                self.keyring.public_keys(),
                issuer=self.settings.issuer,
                audience=self.settings.audience,
                check_exp=False,
            )
        except InvalidToken:
            return Response(status_code=200, headers=oauth.NO_STORE)  # RFC 7009 §2.2: not an error
        if claims.client_id != policy.client_id:
            raise OAuthError("unauthorized_client", "the token was issued to another client")
        if claims.usable_until > time.time():
            try:
                await self.revocations.revoke_jti(claims.jti, claims.usable_until)
            except REDIS_ERRORS as exc:
                self.health.mark_down(exc)
                raise OAuthError(
                    "temporarily_unavailable",
                    "revocation store unavailable; retry later",
                    503,
                    {"Retry-After": "1"},
                ) from None
            self.metrics.revoked.inc()
            log.info("token revoked: client=%s jti=%s", claims.client_id, claims.jti)
        return Response(status_code=200, headers=oauth.NO_STORE)

    # --- background work ------------------------------------------------------------------

    async def refresh_keys(self) -> None:
        try:
            self.keyring = await load_keyring(self.store)
        except StoreError as exc:
            self.store_ok = False
            self.metrics.store_up.set(0)
            log.warning(
                "key store refresh failed (%s); keeping %s",
                exc,
                "the keys already loaded" if self.keyring else "no keys",
            )
            return
        self.store_ok = True
        self.store_ok_at = time.time()
        self.metrics.store_up.set(1)
        self.metrics.store_last_success.set(self.store_ok_at)
        self.metrics.signing_keys.set(len(self.keyring.keys))
        self.metrics.key_created.labels("signing").set(self.keyring.signer.created)
        with contextlib.suppress(StoreError):  # SecretNotFound too: no speech key in the store
            speech = [v for v in await self.store.versions(SPEECH_KEY_SECRET) if v.enabled]
            if speech:
                self.metrics.key_created.labels("speech").set(speech[-1].created)

    async def on_event(self, event: dict[str, Any]) -> None:
        """A key reload published by the CLI: every replica re-reads at once."""
        if event.get("type") == "reload":
            log.info("reload event: %s", event.get("what", "all"))
            self.clients.clear()
            await self.refresh_keys()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.key_refresh_s)
            await self.refresh_keys()

    async def start(self) -> None:
        await self.refresh_keys()
        if self.keyring is None:
            raise RuntimeError(
                "no usable signing key: run `speechgate keys rotate-signing` or `speechgate dev`"
            )
        self.hash_key = await ensure_hash_key(self.store)
        self.tasks.append(asyncio.create_task(self._refresh_forever()))
        if self.redis is not None:
            self.listener = EventListener(self.redis, Keyspace(self.settings.redis_prefix), self.on_event)
            self.listener.start()

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.listener is not None:
            await self.listener.close()
        await self.health.close()
        await self.limiter.aclose()
        await self.http.aclose()
        if self.redis is not None:
            await self.redis.aclose()
        await self.store.close()
