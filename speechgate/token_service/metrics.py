"""Prometheus metrics of the token service, on a registry of the app's own (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from speechgate.core.events import events_gauge
from speechgate.core.redisconn import redis_up_gauge


class TokenMetrics:
    def __init__(self, registry: CollectorRegistry, routes: set[str]) -> None:
        self.registry = registry
        self.routes = frozenset(routes)  # the app's paths: the only values of the route label
        # Client ids are labels only once authenticated: the set of configured clients is bounded,
        # while made-up ids from the internet are not.
        self.issued = Counter(
            "speechgate_tokens_issued", "Access tokens issued", ["client", "grant"], registry=registry
        )
        self.refused = Counter(
            "speechgate_tokens_refused",
            "Token requests refused, by client ('-' before it is authenticated) and OAuth error code",
            ["client", "grant", "reason"],
            registry=registry,
        )
        self.requests = Counter(
            "speechgate_http_requests",
            "HTTP requests answered, by route and status code",
            ["route", "status"],
            registry=registry,
        )
        self.revoked = Counter("speechgate_tokens_revoked", "Tokens revoked", registry=registry)
        self.latency = Histogram(
            "speechgate_token_request_seconds",
            "Time to answer a token request",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
            registry=registry,
        )
        self.redis_up = redis_up_gauge(registry)
        self.events_subscribed = events_gauge(registry)
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
        self.key_created = Gauge(
            "speechgate_key_created_timestamp_seconds",
            "When the key in use was created (age = time() - this)",
            ["key"],
            registry=registry,
        )

        # At 0 from the start (Prometheus' guidance): the request and error-rate panels read 0
        # before the first request or the first 5xx, not "no data". One 5xx status is enough for
        # the panels' `status=~"5.."`.
        for route in (*self.routes, "other"):
            for status in ("200", "500"):
                self.requests.labels(route, status)

    def count_request(self, path: str, status: int) -> None:
        # Only known routes become label values: made-up paths must not grow the series.
        self.requests.labels(path if path in self.routes else "other", str(status)).inc()
