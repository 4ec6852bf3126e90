"""Prometheus metrics of one edge server (own registry, so tests can run several in a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)


class EdgeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions = Counter("coinfer_sessions", "Generate sessions by outcome", ["outcome"], registry=r)
        self.active_sessions = Gauge("coinfer_active_sessions", "Open sessions", registry=r)
        self.kv_cache_bytes = Gauge("coinfer_kv_cache_bytes", "KV cache bytes held: live sessions and caches kept for prefix reuse", registry=r)
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
        self.batch_size = Histogram("coinfer_batch_size", "Decode steps per batched forward",
                                    buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64), registry=r)
        self.prefill_chunks = Counter("coinfer_prefill_chunks", "Prefill chunks run (long prompts are split so "
                                      "decoding sessions are not held up)", registry=r)
        self.kv_budget_bytes = Gauge("coinfer_kv_budget_bytes", "KV cache budget", registry=r)
        self.kv_kept_caches = Gauge("coinfer_kv_kept_caches", "Finished sessions' caches kept for reuse",
                                    registry=r)
        self.evictions = Counter("coinfer_kv_evictions", "KV caches evicted, by kind (live session, kept cache, "
                                 "idle timeout)", ["kind"], registry=r)
        self.prefix_hits = Counter("coinfer_prefix_hits", "Sessions opened on a kept prefix", registry=r)
        self.prefix_tokens = Counter("coinfer_prefix_reused_tokens", "Positions reused from kept caches",
                                     registry=r)
        self.prefix_bytes_saved = Counter("coinfer_prefix_saved_bytes", "Uplink bytes the devices did not send "
                                          "thanks to reuse (reused positions x the session's frame bytes per "
                                          "position)", registry=r)
        self.sessions_opened = Counter("coinfer_sessions_opened", "Sessions opened on this replica: new (or a "
                                       "replay), or resumed from its own kept cache after a broken stream",
                                       ["how"], registry=r)
        self.session_misses = Counter("coinfer_session_misses", "Resumes asked for a session this replica does "
                                      "not hold (ran elsewhere, restart, eviction): each makes the device replay",
                                      registry=r)
        self.probe_bytes = Counter("coinfer_probe_bytes", "Probe reply payload bytes sent", registry=r)
        self.streams_ended = Counter("coinfer_streams_ended", "Streams ended because their device sent nothing "
                                     "within its deadline (first message or idle)", registry=r)
        self.queue_seconds = Histogram(
            "coinfer_queue_seconds", "Wait for the model per forward", buckets=LATENCY_BUCKETS, registry=r
        )
