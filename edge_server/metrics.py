"""Prometheus metrics of one edge server (own registry, so tests can run several in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)


class EdgeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions = Counter("coinfer_sessions", "Generate sessions by outcome", ["outcome"], registry=r)
        self.active_sessions = Gauge("coinfer_active_sessions", "Open sessions", registry=r)
        self.kv_cache_bytes = Gauge("coinfer_kv_cache_bytes", "KV cache bytes held by open sessions", registry=r)
        self.wire_bytes = Counter("coinfer_wire_bytes", "Serialized stream message bytes", ["direction"], registry=r)
        self.tokens = Counter("coinfer_generated_tokens", "Tokens generated", registry=r)
        self.split_layer = Histogram(
            "coinfer_split_layer", "Split layer of opened sessions", buckets=tuple(range(0, 65, 2)), registry=r
        )
        self.prefill_seconds = Histogram(
            "coinfer_prefill_seconds", "Edge compute for a prefill", buckets=LATENCY_BUCKETS, registry=r
        )
        self.step_seconds = Histogram(
            "coinfer_step_seconds", "Edge compute for one decode step", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_seconds = Histogram(
            "coinfer_queue_seconds", "Wait for the model per forward", buckets=LATENCY_BUCKETS, registry=r
        )
