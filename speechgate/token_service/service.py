"""The token service's state and its I/O: client authentication against the registry, issuing
and revoking tokens, the signing keys kept fresh. The rules themselves are in grants.py (no I/O);
the HTTP endpoints in app.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from speechgate.core.claims import AccessClaims, InvalidToken, sign, token_kid, verify
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
from speechgate.token_service.ratelimit import (
    INTROSPECTIONS,
    REVOCATIONS,
    TOKENS,
    FailoverLimiter,
    checks_for,
)

log = logging.getLogger("speechgate.token")

UNKNOWN_CLIENT = "unknown client, or a wrong or missing client_secret (a public client sends none)"
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
        # One answer after the same keyed hash whatever is wrong (no such client, a disabled one
        # whose secret cannot be read, a secret missing or wrong, a secret sent by a public
        # client), so that neither the message nor the time tells whether the id exists.
        confidential = policy if isinstance(policy, ClientPolicy) and not policy.public else None
        matches = check_secret(self.hash_key, confidential or _NOBODY, secret or "")
        allowed = (matches and bool(secret)) if confidential is not None else not secret
        if not isinstance(policy, ClientPolicy) or not allowed:
            raise invalid_client(UNKNOWN_CLIENT)
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

        headers = await self._limit(request, policy, TOKENS, subject)
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

    async def _limit(
        self, request: Request, policy: ClientPolicy, counted: str, subject: str = ""
    ) -> dict[str, str]:
        """The client's rate limits for a token (per client, subject and address), or for a call
        of another endpoint (per client and address, on counters of that endpoint's own: a loop
        of revocations must not use up the tokens, nor tokens the revocations). The headers that
        say where the request stands, or a 429 `slow_down` with Retry-After."""
        address = request.client.host if request.client else "unknown"
        limits_ = policy.rate_limits
        if counted == TOKENS:
            checks = checks_for(
                policy.client_id, subject, address, limits_.client, limits_.subject, limits_.ip
            )
        else:
            subject = counted
            checks = [
                replace(check, policy=f"{counted}-{check.policy}")
                for check in checks_for(policy.client_id, subject, address, limits_.client, "", limits_.ip)
            ]
        decision = await self.limiter.hit(policy.client_id, subject, checks, counted)
        headers = {**oauth.NO_STORE, **grants.ratelimit_headers(checks, decision)}
        if not decision.allowed:
            headers["Retry-After"] = str(decision.retry_after_s)
            raise OAuthError(
                "slow_down", f"rate limit reached; retry in {decision.retry_after_s} s", 429, headers
            )
        return headers

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
        request.state.client_id = policy.client_id
        await self._limit(request, policy, REVOCATIONS)  # each once cost a publish to every relay
        claims = self._ours(require(params, "token"), check_exp=False)
        if claims is None:
            return Response(status_code=200, headers=oauth.NO_STORE)  # RFC 7009 §2.2: not an error
        if claims.client_id != policy.client_id:
            raise OAuthError("unauthorized_client", "the token was issued to another client")
        if claims.usable_until > time.time():
            try:
                first = await self.revocations.revoke_jti(claims.jti, claims.usable_until)
            except REDIS_ERRORS as exc:
                raise self._store_down(exc, "") from None
            if first:  # revoked again: acknowledged as RFC 7009 asks, with nothing more to do
                self.metrics.revoked.inc()
                log.info("token revoked: client=%s jti=%s", claims.client_id, claims.jti)
        return Response(status_code=200, headers=oauth.NO_STORE)

    def _ours(self, token: str, check_exp: bool = True) -> AccessClaims | None:
        """The claims of one of our tokens, or None for anything else."""
        assert self.keyring is not None
        try:
            return verify(
                token,
                self.keyring.public_keys(),
                issuer=self.settings.issuer,
                audience=self.settings.audience,
                check_exp=check_exp,
            )
        except InvalidToken:
            return None

    def _store_down(self, exc: BaseException, what: str) -> OAuthError:
        self.health.mark_down(exc)
        return OAuthError(
            "temporarily_unavailable",
            f"revocation store unavailable; {what}retry later",
            503,
            {"Retry-After": "1"},
        )

    # --- introspection (RFC 7662) ---------------------------------------------------------

    async def introspect(self, request: Request, params: dict[str, str]) -> Response:
        """Whether a token is active now (signed by a key of ours, for us, not expired, not
        revoked) and what it carries. A client learns this of the tokens issued to it only: of
        any other token the answer is `{"active": false}`, as for a token that is not one."""
        client_id, secret = oauth.client_credentials(request.headers.get("authorization"), params)
        policy = await self.authenticate(client_id, secret)
        request.state.client_id = policy.client_id
        headers = await self._limit(request, policy, INTROSPECTIONS)
        token = require(params, "token")
        claims = self._ours(token)
        if claims is None or claims.client_id != policy.client_id:
            return JSONResponse({"active": False}, headers=headers)
        try:
            revoked = await self.revocations.revoked(claims, token_kid(token))
        except REDIS_ERRORS as exc:
            raise self._store_down(exc, "whether the token is revoked cannot be told; ") from None
        if revoked is not None:
            return JSONResponse({"active": False}, headers=headers)
        return JSONResponse(grants.introspection(claims), headers=headers)

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
            self.listener = EventListener(
                self.redis,
                Keyspace(self.settings.redis_prefix),
                self.on_event,
                gauge=self.metrics.events_subscribed,
            )
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
