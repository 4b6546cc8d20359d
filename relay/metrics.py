"""Prometheus metrics of the relay, on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
            "Streams closed by the relay, by code",
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
