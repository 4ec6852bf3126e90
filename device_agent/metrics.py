"""Prometheus metrics of one device agent (own registry, so tests can run several in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class AgentMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "coinfer_requests", "REST requests by route and status", ["route", "status"], registry=r
        )
        self.active_requests = Gauge("coinfer_active_requests", "Generations in flight", registry=r)
        self.ttft = Histogram(
            "coinfer_time_to_first_token_seconds", "Request start to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "coinfer_inter_token_latency_seconds",
            "Time between consecutive tokens",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.wire_bytes = Counter(
            "coinfer_wire_bytes", "Serialized gRPC message bytes to/from the edge", ["direction"], registry=r
        )
        self.split_layer = Gauge("coinfer_split_layer", "Split layer of the latest request", registry=r)
        self.tokens = Counter("coinfer_generated_tokens", "Tokens generated", ["split_kind"], registry=r)
        self.replays = Counter("coinfer_replays", "Edge sessions reopened and replayed", registry=r)
        self.resumes = Counter(
            "coinfer_resumes",
            "Edge sessions that went on from the edge's own cache after a broken stream (no replay)",
            registry=r,
        )
        self.busy_retries = Counter(
            "coinfer_busy_retries", "Sessions retried after the edge said it was full", registry=r
        )
        self.cached_tokens = Counter(
            "coinfer_prefix_reused_tokens",
            "Prompt positions the edge still held from an earlier turn (not sent again)",
            registry=r,
        )
        self.fallbacks = Counter("coinfer_local_fallbacks", "Requests finished on the device, edge lost", registry=r)
        self.edge_errors = Counter("coinfer_edge_errors", "Edge errors by gRPC status", ["code"], registry=r)
        self.link_bandwidth = Gauge(
            "coinfer_link_bandwidth_bytes_per_second", "Estimated link bandwidth", ["direction"], registry=r
        )
        self.link_rtt = Gauge("coinfer_link_rtt_seconds", "Estimated round-trip time to the edge", registry=r)
        self.link_changes = Gauge("coinfer_link_changes", "Sudden link changes the estimator detected", registry=r)
        self.edge_queue = Gauge("coinfer_edge_queue_seconds", "Edge's reported wait per work item", registry=r)
        self.plan_predicted = Gauge(
            "coinfer_plan_predicted_seconds", "Predicted total latency of the latest plan", registry=r
        )
