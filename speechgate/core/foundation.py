"""The shared objects both services build from their settings: one builder, so that the token
service and the relay cannot drift apart in how they reach Redis, the client policies, the
revocations or an identity provider's keys."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client import Gauge

from speechgate.core.clients import ClientRegistry
from speechgate.core.idp import JwksCache
from speechgate.core.keyspace import Keyspace
from speechgate.core.redisconn import Redis, RedisHealth
from speechgate.core.revocation import Revocations, revocations_for
from speechgate.core.settings import Settings
from speechgate.core.store import SecretStore


@dataclass(frozen=True, slots=True)
class Foundation:
    settings: Settings
    store: SecretStore
    redis: Redis | None
    keyspace: Keyspace
    http: httpx.AsyncClient
    clients: ClientRegistry  # the policies, cached for settings.client_cache_s
    health: RedisHealth  # whether Redis answers; rules fall back to this process while it does not
    revocations: Revocations
    jwks_cache: JwksCache  # identity providers' keys (token exchange, and the relay's own tokens)


def build(
    settings: Settings,
    store: SecretStore,
    redis: Redis | None,
    redis_up: Gauge,
    *,
    http: httpx.AsyncClient | None = None,
    revocations: Revocations | None = None,
) -> Foundation:
    """`revocations` defaults to Redis, or to this process alone without Redis; `speechgate dev`
    passes one that its two services share. `redis_up` follows the Redis health."""
    keyspace = Keyspace(settings.redis_prefix)
    client = http or httpx.AsyncClient(follow_redirects=False)
    return Foundation(
        settings=settings,
        store=store,
        redis=redis,
        keyspace=keyspace,
        http=client,
        clients=ClientRegistry(store, ttl=settings.client_cache_s),
        health=RedisHealth(redis, on_change=lambda up: redis_up.set(1 if up else 0)),
        revocations=revocations or revocations_for(redis, keyspace),
        jwks_cache=JwksCache(
            client,
            settings.idp_jwks_min_refresh_s,
            settings.idp_jwks_max_age_s,
            deadline_s=settings.idp_jwks_timeout_s,
        ),
    )
