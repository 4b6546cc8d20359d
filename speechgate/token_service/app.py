"""The token service's web app: `create_app(settings, store, redis)`, its endpoints, and how
uvicorn serves it.

The app owns what it is given: its lifespan loads the signing keys at start and closes the store
and the Redis client at shutdown. Nothing lives in module globals: the endpoints find the service
on `request.app.state.service`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from speechgate.core import foundation
from speechgate.core.events import NOT_LISTENING
from speechgate.core.logs import AccessLog
from speechgate.core.redisconn import REDIS_ERRORS, Redis
from speechgate.core.revocation import Revocations
from speechgate.core.settings import Settings
from speechgate.core.store import SecretStore
from speechgate.token_service import grants, oauth
from speechgate.token_service.http import CLIENT_GONE, ENDED, BoundedHttpToolsProtocol
from speechgate.token_service.metrics import TokenMetrics
from speechgate.token_service.oauth import OAuthError, invalid_request
from speechgate.token_service.openapi import openapi_document
from speechgate.token_service.ratelimit import FailoverLimiter, LocalLimiter, RedisLimiter
from speechgate.token_service.service import TokenService

log = logging.getLogger("speechgate.token")


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


def _service(request: Request) -> TokenService:
    service: TokenService = request.app.state.service
    return service


async def token(request: Request) -> Response:
    service = _service(request)
    started = time.perf_counter()
    grant = None
    try:
        params = oauth.parse_body(
            request.headers.get("content-type"), await _read_body(request, service.settings.max_body_bytes)
        )
        grant = params.get("grant_type")
        response = await service.issue(request, params)
        request.state.outcome = "issued"
        return response
    except OAuthError as exc:
        client = getattr(request.state, "client_id", None) or "-"
        service.metrics.refused.labels(client, grants.grant_label(grant), exc.error).inc()
        request.state.outcome = exc.error
        log.info("token refused: %s: %s", exc.error, exc.description)
        return _error(exc)
    finally:
        service.metrics.latency.observe(time.perf_counter() - started)


async def _client_call(request: Request, call: str, done: str) -> Response:
    """A client-authenticated form POST other than the token endpoint: TokenService.<call>."""
    service = _service(request)
    try:
        params = oauth.parse_body(
            request.headers.get("content-type"), await _read_body(request, service.settings.max_body_bytes)
        )
        response: Response = await getattr(service, call)(request, params)
        request.state.outcome = done
        return response
    except OAuthError as exc:
        request.state.outcome = exc.error
        log.info("%s refused: %s: %s", call, exc.error, exc.description)
        return _error(exc)


async def revoke(request: Request) -> Response:
    return await _client_call(request, "revoke", "revoked")


async def introspect(request: Request) -> Response:
    return await _client_call(request, "introspect", "introspected")


async def jwks(request: Request) -> Response:
    keyring = _service(request).keyring
    assert keyring is not None  # the lifespan does not start without one
    return Response(
        keyring.jwks_json, media_type="application/json", headers={"Cache-Control": "public, max-age=60"}
    )


async def openid_configuration(request: Request) -> Response:
    """Not an OpenID provider (no ID tokens, no userinfo): said plainly, with where to look."""
    return JSONResponse(
        {
            "error": "not_found",
            "error_description": "this is an OAuth 2.0 authorization server, not an OpenID provider: "
            "its metadata is at /.well-known/oauth-authorization-server (RFC 8414)",
        },
        status_code=404,
    )


async def metadata(request: Request) -> Response:
    return JSONResponse(request.app.state.metadata, headers={"Cache-Control": "public, max-age=3600"})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    service = _service(request)
    redis = service.redis
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
    if service.listener is not None:
        checks["events"] = "ok" if service.listener.subscribed.is_set() else NOT_LISTENING
    if service.keyring is None:
        return JSONResponse({"status": "not ready", "checks": checks}, status_code=503)
    degraded = not service.store_ok or any(
        state != "ok" for name, state in checks.items() if name != "redis" or redis is not None
    )
    # Degraded still answers 200: every replica shares Redis, and taking them all out of the
    # load balancer when it fails would turn a fallback into an outage.
    return JSONResponse({"status": "degraded" if degraded else "ready", "checks": checks})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(_service(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


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


_ENDED_OUTCOMES = {400: "bad_body", 408: "body_timeout", 431: "head_too_large", 503: "too_many_connections"}


async def request_ended(request: Request, exc: Exception) -> Response:
    """A request whose body never came whole: the client's doing, not a server error. The HTTP
    protocol has answered it (408 for a timeout, 400 for a body it could not parse) or the client
    is gone (499, nothing is sent); the access log's one line says which."""
    status = int(request.scope.get(ENDED, CLIENT_GONE))
    request.state.outcome = _ENDED_OUTCOMES.get(status, "client_gone")
    return Response(status_code=status)


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        {"error": "server_error", "error_description": "internal error; it has been logged"},
        status_code=500,
    )


# The routes; their paths are also the only values of speechgate_http_requests' route label.
ROUTES = (
    Route("/v1/token", token, methods=["POST"]),
    Route("/v1/revoke", revoke, methods=["POST"]),
    Route("/v1/introspect", introspect, methods=["POST"]),
    Route("/.well-known/jwks.json", jwks, methods=["GET"]),
    Route("/.well-known/oauth-authorization-server", metadata, methods=["GET"]),
    Route("/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
)


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
    token_metrics = TokenMetrics(registry or CollectorRegistry(), {route.path for route in ROUTES})
    shared = foundation.build(
        settings, store, redis, token_metrics.redis_up, http=http, revocations=revocations
    )
    limiter = RedisLimiter(redis, shared.keyspace) if redis else None
    service = TokenService(
        settings=settings,
        store=store,
        redis=redis,
        metrics=token_metrics,
        http=shared.http,
        clients=shared.clients,
        limiter=FailoverLimiter(limiter, shared.health, LocalLimiter()),
        health=shared.health,
        revocations=shared.revocations,
        jwks_cache=shared.jwks_cache,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = Starlette(
        routes=list(ROUTES),
        exception_handlers={
            HTTPException: http_error,
            ClientDisconnect: request_ended,
            Exception: server_error,
        },
        lifespan=lifespan,
        middleware=[Middleware(AccessLog, on_done=token_metrics.count_request)],
    )
    app.state.service = service
    app.state.metadata = grants.metadata(settings)
    app.state.openapi = openapi_document(settings)
    return app


def server_options(settings: Settings) -> dict[str, Any]:
    """How uvicorn serves the token service (`speechgate token-service`, and the tests): no
    software name in a `server` header, and `X-Forwarded-For` believed only from the proxies
    `SPEECHGATE_FORWARDED_ALLOW_IPS` names (none by default: the per-address limit would
    otherwise be keyed on a value any caller sets); the bounds of speechgate/token_service/http.py."""
    trusted = {ip.strip() for ip in settings.forwarded_allow_ips.split(",") if ip.strip()}
    bounds = {
        "head_timeout_s": settings.http_timeout_s,
        "body_timeout_s": settings.http_timeout_s,
        # One count per server; a proxy trusted with "*" trusts every address, and so bounds none.
        "max_per_address": 0 if "*" in trusted else settings.max_connections_per_address,
        "trusted": frozenset(trusted),
        "per_address": {},
    }
    return {
        "http": type("BoundedHttp", (BoundedHttpToolsProtocol,), bounds),
        "limit_concurrency": settings.max_connections,
        "server_header": False,
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": settings.forwarded_allow_ips or None,
    }


def app_from_env() -> Starlette:
    """The production factory (`uvicorn --factory speechgate.token_service.app:app_from_env`)."""
    from speechgate.core.runtime import TOKEN_SERVICE, open_redis, open_store

    settings = Settings.from_env()
    return create_app(settings, open_store(settings), open_redis(settings, TOKEN_SERVICE))
