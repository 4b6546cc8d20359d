"""Prometheus metrics of the token service, on a registry of the app's own (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class TokenMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Client ids are labels only once authenticated: the set of configured clients is bounded,
        # while made-up ids from the internet are not.
        self.issued = Counter(
            "speechgate_tokens_issued", "Access tokens issued", ["client", "grant"], registry=registry
        )
        self.refused = Counter(
            "speechgate_tokens_refused",
            "Token requests refused, by OAuth error code",
            ["grant", "reason"],
            registry=registry,
        )
        self.revoked = Counter("speechgate_tokens_revoked", "Tokens revoked", registry=registry)
        self.latency = Histogram(
            "speechgate_token_request_seconds",
            "Time to answer a token request",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        self.redis_up = Gauge(
            "speechgate_redis_up", "1 while Redis answers, 0 while limits are per-process", registry=registry
        )
        self.store_up = Gauge(
            "speechgate_key_store_up", "1 when the last read of the key store succeeded", registry=registry
        )
        self.store_last_success = Gauge(
            "speechgate_key_store_last_success_timestamp_seconds",
            "When the key store was last read successfully (staleness = now - this)",
            registry=registry,
        )
        self.signing_keys = Gauge(
            "speechgate_signing_keys", "Signing keys published in the JWKS", registry=registry
        )
