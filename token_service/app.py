"""The token service's web app: `create_app(settings, store, redis)`.

The app owns what it is given: its lifespan loads the signing keys at start and closes the store
and the Redis client at shutdown. Nothing lives in module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from token_service import oauth
from token_service.claims import AccessClaims, InvalidToken, new_jti, sign, verify
from token_service.clients import (
    LOCALE,
    ClientPolicy,
    ClientRegistry,
    check_secret,
    ensure_hash_key,
)
from token_service.events import EventListener
from token_service.http import BoundedHttpToolsProtocol
from token_service.idp import IdpUnavailable, JwksCache, SubjectTokenError, verify_subject_token
from token_service.keys import KeyRing, load_keyring
from token_service.keyspace import Keyspace
from token_service.logs import AccessLog
from token_service.metrics import TokenMetrics
from token_service.oauth import OAuthError, invalid_client, invalid_request, require
from token_service.openapi import openapi_document
from token_service.ratelimit import (
    Check,
    Decision,
    FailoverLimiter,
    LocalLimiter,
    RedisLimiter,
    checks_for,
)
from token_service.redisconn import REDIS_ERRORS, Redis, RedisHealth
from token_service.revocation import Revocations, revocations_for
from token_service.settings import Settings
from token_service.speechkeys import SPEECH_KEY_SECRET
from token_service.store import SecretStore, StoreError

log = logging.getLogger("speechgate.token")

GRANTS = (oauth.GRANT_CLIENT_CREDENTIALS, oauth.GRANT_TOKEN_EXCHANGE)
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
        grant = require(params, "grant_type")
        if grant not in GRANTS:
            raise OAuthError("unsupported_grant_type", f"grant_type must be one of: {', '.join(GRANTS)}")
        client_id, secret = oauth.client_credentials(request.headers.get("authorization"), params)
        policy = await self.authenticate(client_id, secret)
        request.state.client_id = policy.client_id  # for the access log and metrics: authenticated only
        if grant == oauth.GRANT_CLIENT_CREDENTIALS:
            subject = self._subject_for_client(policy, params)
        else:
            subject = await self._subject_from_exchange(policy, params)
        scope = _scopes(policy, params.get("scope"))
        languages = _languages(policy, params.get("language"))
        single_use = oauth.parse_bool("single_use", params.get("single_use"))
        lifetime = oauth.parse_lifetime(params.get("expires_in"), policy.token_ttl_s)

        address = request.client.host if request.client else "unknown"
        limits_ = policy.rate_limits
        checks = checks_for(policy.client_id, subject, address, limits_.client, limits_.subject, limits_.ip)
        decision = await self.limiter.hit(policy.client_id, subject, checks)
        headers = {**oauth.NO_STORE, **_ratelimit_headers(checks, decision)}
        if not decision.allowed:
            headers["Retry-After"] = str(decision.retry_after_s)
            raise OAuthError(
                "slow_down", f"rate limit reached; retry in {decision.retry_after_s} s", 429, headers
            )

        assert self.keyring is not None
        now = int(time.time())
        claims = AccessClaims(
            iss=self.settings.issuer,
            aud=self.settings.audience,
            sub=subject,
            client_id=policy.client_id,
            scope=scope,
            iat=now,
            nbf=now,
            exp=now + lifetime,
            jti=new_jti(),
            max_session_s=policy.max_session_s,
            lang=languages,
            single_use=single_use,
        )
        body = {
            "access_token": sign(claims, self.keyring.signer_at(now)),
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scope,
            "relay_url": self.settings.relay_url,
        }
        if grant == oauth.GRANT_TOKEN_EXCHANGE:
            body["issued_token_type"] = oauth.ISSUED_TOKEN_TYPE
        self.metrics.issued.labels(policy.client_id, _grant_label(grant)).inc()
        return JSONResponse(body, headers=headers)

    def _subject_for_client(self, policy: ClientPolicy, params: dict[str, str]) -> str:
        if policy.public:
            raise OAuthError("unauthorized_client", "a public client may only use token exchange")
        subject = params.get("subject")
        if subject is None:
            return policy.client_id
        if not 0 < len(subject) <= 256 or not subject.isprintable():
            raise invalid_request("subject must be 1-256 printable characters")
        return subject

    async def _subject_from_exchange(self, policy: ClientPolicy, params: dict[str, str]) -> str:
        if policy.idp is None:
            raise OAuthError("unauthorized_client", "this client has no identity provider for token exchange")
        if "subject" in params:
            raise invalid_request("subject is taken from the subject_token in a token exchange")
        token = require(params, "subject_token")
        token_type = require(params, "subject_token_type")
        if token_type not in oauth.SUBJECT_TOKEN_TYPES:
            raise invalid_request(
                f"subject_token_type must be one of: {', '.join(sorted(oauth.SUBJECT_TOKEN_TYPES))}"
            )
        requested = params.get("requested_token_type")
        if requested not in (None, oauth.ISSUED_TOKEN_TYPE, "urn:ietf:params:oauth:token-type:jwt"):
            raise invalid_request(f"requested_token_type must be {oauth.ISSUED_TOKEN_TYPE}")
        for name in ("audience", "resource"):
            if params.get(name) not in (None, self.settings.audience, self.settings.relay_url):
                raise OAuthError("invalid_target", f"{name} must be {self.settings.audience}")
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


def _grant_label(grant: str | None) -> str:
    if grant == oauth.GRANT_TOKEN_EXCHANGE:
        return "token_exchange"
    if grant == oauth.GRANT_CLIENT_CREDENTIALS:
        return grant
    return "other"


def _scopes(policy: ClientPolicy, requested: str | None) -> str:
    if requested is None or requested.strip() == "":
        return " ".join(policy.scopes)
    scopes = requested.split()
    denied = [s for s in scopes if s not in policy.scopes]
    if denied:
        named = " ".join(denied)
        named = named if len(named) <= 100 else named[:100] + "…"  # echo a part, not kilobytes
        raise OAuthError(
            "invalid_scope", f"scope not allowed for this client: {named}; allowed: {' '.join(policy.scopes)}"
        )
    return " ".join(dict.fromkeys(scopes))


def _languages(policy: ClientPolicy, requested: str | None) -> tuple[str, ...]:
    if requested is None or requested == "":
        return policy.languages
    if not LOCALE.match(requested):
        raise invalid_request("language must be a locale such as en-US")
    if not policy.allows_language(requested):
        raise OAuthError("invalid_scope", f"language {requested} is not allowed for this client")
    return (requested,)


def _ratelimit_headers(checks: Sequence[Check], decision: Decision) -> dict[str, str]:
    """draft-ietf-httpapi-ratelimit-headers: the policies, and what is left of each."""
    if not checks:
        return {}
    policy = ", ".join(f'"{c.name}";q={c.amount};w={c.window_s}' for c in checks)
    state = ", ".join(
        f'"{c.name}";r={r};t={t}'
        for c, r, t in zip(checks, decision.remaining, decision.reset_s, strict=True)
    )
    return {"RateLimit-Policy": policy, "RateLimit": state}


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = invalid_request(f"request body larger than {limit} bytes", 413)
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _error(exc: OAuthError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers={**oauth.NO_STORE, **exc.headers})


def create_app(
    settings: Settings,
    store: SecretStore,
    redis: Redis | None,
    *,
    http: httpx.AsyncClient | None = None,
    registry: CollectorRegistry | None = None,
    revocations: Revocations | None = None,
) -> Starlette:
    """`revocations` defaults to Redis, or to this process alone without Redis; `speechgate dev`
    passes one it shares with the relay running beside it."""
    metrics = TokenMetrics(registry or CollectorRegistry())
    health = RedisHealth(redis, on_change=lambda up: metrics.redis_up.set(1 if up else 0))
    keyspace = Keyspace(settings.redis_prefix)
    http_client = http or httpx.AsyncClient(follow_redirects=False)
    service = TokenService(
        settings=settings,
        store=store,
        redis=redis,
        metrics=metrics,
        http=http_client,
        clients=ClientRegistry(store, ttl=settings.client_cache_s),
        limiter=FailoverLimiter(RedisLimiter(redis, keyspace) if redis else None, health, LocalLimiter()),
        health=health,
        revocations=revocations or revocations_for(redis, keyspace),
        jwks_cache=JwksCache(http_client, settings.idp_jwks_min_refresh_s, settings.idp_jwks_max_age_s),
    )
    max_body = settings.max_body_bytes

    async def token(request: Request) -> Response:
        started = time.perf_counter()
        grant = None
        try:
            params = oauth.parse_body(
                request.headers.get("content-type"), await _read_body(request, max_body)
            )
            grant = params.get("grant_type")
            response = await service.issue(request, params)
            request.state.outcome = "issued"
            return response
        except OAuthError as exc:
            client = getattr(request.state, "client_id", None) or "-"
            metrics.refused.labels(client, _grant_label(grant), exc.error).inc()
            request.state.outcome = exc.error
            log.info("token refused: %s: %s", exc.error, exc.description)
            return _error(exc)
        finally:
            metrics.latency.observe(time.perf_counter() - started)

    async def revoke(request: Request) -> Response:
        try:
            params = oauth.parse_body(
                request.headers.get("content-type"), await _read_body(request, max_body)
            )
            response = await service.revoke(request, params)
            request.state.outcome = "revoked"
            return response
        except OAuthError as exc:
            request.state.outcome = exc.error
            log.info("revocation refused: %s: %s", exc.error, exc.description)
            return _error(exc)

    async def jwks(request: Request) -> Response:
        assert service.keyring is not None
        return Response(
            service.keyring.jwks_json,
            media_type="application/json",
            headers={"Cache-Control": "public, max-age=60"},
        )

    metadata_doc = _metadata(settings)

    async def metadata(request: Request) -> Response:
        return JSONResponse(metadata_doc, headers={"Cache-Control": "public, max-age=3600"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks: dict[str, str] = {}
        if redis is None:
            checks["redis"] = "not configured: per-process limits"
        else:
            if service.health.up:
                try:
                    await redis.ping()
                except REDIS_ERRORS as exc:
                    service.health.mark_down(exc)
            checks["redis"] = "ok" if service.health.up else "unreachable: per-process limits"
        stale_s = int(time.time() - service.store_ok_at)
        checks["key_store"] = "ok" if service.store_ok else f"unreachable: serving keys read {stale_s} s ago"
        if service.keyring is None:
            return JSONResponse({"status": "not ready", "checks": checks}, status_code=503)
        degraded = not service.store_ok or (redis is not None and not service.health.up)
        # Degraded still answers 200: every replica shares Redis, and taking them all out of the
        # load balancer when it fails would turn a fallback into an outage.
        return JSONResponse({"status": "degraded" if degraded else "ready", "checks": checks})

    async def metrics_route(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    openapi_doc = openapi_document(settings)

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_doc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse(
            {
                "error": "not_found" if exc.status_code == 404 else "invalid_request",
                "error_description": exc.detail,
            },
            status_code=exc.status_code,
            headers=exc.headers,
        )

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            {"error": "server_error", "error_description": "internal error; it has been logged"},
            status_code=500,
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=[
            Route("/v1/token", token, methods=["POST"]),
            Route("/v1/revoke", revoke, methods=["POST"]),
            Route("/.well-known/jwks.json", jwks, methods=["GET"]),
            Route("/.well-known/oauth-authorization-server", metadata, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_route, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
        middleware=[Middleware(AccessLog, on_done=metrics.count_request)],
    )
    app.state.service = service
    return app


def _metadata(settings: Settings) -> dict[str, Any]:
    base = settings.issuer.rstrip("/")
    return {
        "issuer": settings.issuer,
        "token_endpoint": f"{base}/v1/token",
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "revocation_endpoint": f"{base}/v1/revoke",
        "grant_types_supported": list(GRANTS),
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "scopes_supported": ["speech:recognize", "speech:synthesize"],
        "service_documentation": f"{base}/openapi.json",
    }


def server_options(settings: Settings) -> dict[str, Any]:
    """How uvicorn serves the token service (`speechgate token-service`, and the tests): no
    software name in a `server` header, and `X-Forwarded-For` believed only from the proxies
    `SPEECHGATE_FORWARDED_ALLOW_IPS` names (none by default: the per-address limit would
    otherwise be keyed on a value any caller sets); the bounds of token_service/http.py."""
    bounds = {"head_timeout_s": settings.http_timeout_s, "body_timeout_s": settings.http_timeout_s}
    return {
        "http": type("BoundedHttp", (BoundedHttpToolsProtocol,), bounds),
        "limit_concurrency": settings.max_connections,
        "server_header": False,
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": settings.forwarded_allow_ips or None,
    }


def app_from_env() -> Starlette:
    """The production factory (`uvicorn --factory token_service.app:app_from_env`)."""
    from token_service.runtime import open_redis, open_store

    settings = Settings.from_env()
    return create_app(settings, open_store(settings), open_redis(settings))
