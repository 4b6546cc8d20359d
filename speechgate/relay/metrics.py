"""Prometheus metrics of the relay, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from speechgate.core.events import events_gauge
from speechgate.core.redisconn import redis_up_gauge
from speechgate.relay.auth import REFUSAL_ERRORS

# Close codes counted by their number; any other is "other" (label values stay bounded).
KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1012, 1013, 4000, 4429}
)
DOORS = ("plain", "azure")


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.active = Gauge("speechgate_relay_active_streams", "Live streams", ["door"], registry=registry)
        self.audio = Counter(
            "speechgate_relay_audio_seconds",
            "Audio seconds forwarded to Azure",
            ["client"],
            registry=registry,
        )
        self.refused = Counter(
            "speechgate_relay_refusals", "Handshakes refused, by reason", ["reason"], registry=registry
        )
        self.closed = Counter(
            "speechgate_relay_closes",
            "Streams ended, by door and close code",
            ["door", "code"],
            registry=registry,
        )
        self.upstream_connect = Histogram(
            "speechgate_relay_upstream_connect_seconds",
            "Time to open the Azure connection",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )
        self.upstream_failures = Counter(
            "speechgate_relay_upstream_failures", "Azure connections that failed", registry=registry
        )
        self.first_result = Histogram(
            "speechgate_relay_first_result_seconds",
            "From a turn's first audio to Azure's first result (partial or final)",
            ["door"],
            buckets=(0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10),
            registry=registry,
        )
        self.forward = Histogram(
            "speechgate_relay_frame_forward_seconds",
            "Time to hand a frame to the other leg, waits for a slow peer included (1 frame in 16)",
            ["direction"],
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
            registry=registry,
        )
        self.redis_up = redis_up_gauge(registry)
        self.events_subscribed = events_gauge(registry)
        self.quota_use = Gauge(
            "speechgate_quota_use_ratio",
            "Share of a client's daily audio quota used today (1 = used up)",
            ["client", "quota"],
            registry=registry,
        )
        # The upstream pool (relay/pool.py); labels are upstream names, which operators choose.
        self.upstream_streams = Gauge(
            "speechgate_upstream_streams",
            "Live streams on an upstream of the pool, fleet-wide as counted in Redis (aggregate with max)",
            ["upstream"],
            registry=registry,
        )
        self.upstream_limit = Gauge(
            "speechgate_upstream_limit",
            "Concurrent streams an upstream of the pool takes",
            ["upstream"],
            registry=registry,
        )
        self.upstream_healthy = Gauge(
            "speechgate_upstream_healthy",
            "1 unless the upstream is marked down after a refusal (for the backoff)",
            ["upstream"],
            registry=registry,
        )
        self.upstream_refusals = Counter(
            "speechgate_upstream_refusals",
            "Connections an upstream of the pool refused: throttled (429), error (5xx), auth, unreachable",
            ["upstream", "reason"],
            registry=registry,
        )
        self._known_series()

    def _known_series(self) -> None:
        """Every series of a known label value at 0 from the start, as Prometheus' guidance asks:
        a dashboard panel or an alert on one that has not happened yet reads 0, not "no data".
        (Series labelled by client appear with that client's first stream; the pool's with it.)"""
        for door in DOORS:
            self.active.labels(door)
            self.first_result.labels(door)
            for code in (*sorted(KNOWN_CLOSE_CODES), "other"):
                self.closed.labels(door, str(code))
        for direction in ("up", "down"):
            self.forward.labels(direction)
        for error in REFUSAL_ERRORS:
            self.refused.labels(error)
