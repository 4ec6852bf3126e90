"""Prometheus metrics of one edge server (own registry, so tests can run several in a process).

What the session store already counts (sessions, KV bytes, evictions, prefix hits) is read from
it at scrape time by StoreCollector, so no code has to remember to copy it into a metric; the
rest are events the servicer and scheduler record as they happen.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_server.sessions import SessionStore, StoreStats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)


class StoreCollector(Collector):
    """The session store's sizes (gauges) and stats (counters), read when scraped; zeros until a
    store is watched (the metric names exist from the start: the HPA and dashboards find them)."""

    def __init__(self) -> None:
        self.store: SessionStore | None = None

    def collect(self) -> Iterator[Metric]:
        return _store_families(self.store)

    def describe(self) -> Iterator[Metric]:
        return _store_families(None)


def _store_families(s: SessionStore | None) -> Iterator[Metric]:
    active, held, budget, kept = (len(s), s.used_bytes, s.budget, s.kept_count) if s is not None else (0, 0, 0, 0)
    st = s.stats if s is not None else StoreStats()
    yield GaugeMetricFamily("coinfer_active_sessions", "Open sessions", value=active)
    yield GaugeMetricFamily(
        "coinfer_kv_cache_bytes", "KV cache bytes held: live sessions and caches kept for prefix reuse", value=held
    )
    yield GaugeMetricFamily("coinfer_kv_budget_bytes", "KV cache budget", value=budget)
    yield GaugeMetricFamily("coinfer_kv_kept_caches", "Finished sessions' caches kept for reuse", value=kept)
    evictions = CounterMetricFamily(
        "coinfer_kv_evictions", "KV caches evicted, by kind (live session, kept cache, idle timeout)", labels=["kind"]
    )
    for kind, n in (("live", st.evicted_live), ("kept", st.evicted_kept), ("expired", st.expired)):
        evictions.add_metric([kind], n)
    yield evictions
    yield CounterMetricFamily("coinfer_prefix_hits", "Sessions opened on a kept prefix", value=st.prefix_hits)
    yield CounterMetricFamily(
        "coinfer_prefix_reused_tokens", "Positions reused from kept caches", value=st.prefix_tokens
    )


class EdgeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.store = StoreCollector()
        r.register(self.store)
        self.sessions = Counter("coinfer_sessions", "Generate sessions by outcome", ["outcome"], registry=r)
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
        self.batch_size = Histogram(
            "coinfer_batch_size",
            "Decode steps per batched forward",
            buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64),
            registry=r,
        )
        self.prefill_chunks = Counter(
            "coinfer_prefill_chunks",
            "Prefill chunks run (long prompts are split so decoding sessions are not held up)",
            registry=r,
        )
        self.prefix_bytes_saved = Counter(
            "coinfer_prefix_saved_bytes",
            "Uplink bytes the devices did not send "
            "thanks to reuse (reused positions x the session's frame bytes per "
            "position)",
            registry=r,
        )
        self.sessions_opened = Counter(
            "coinfer_sessions_opened",
            "Sessions opened on this replica: new (or a "
            "replay), or resumed from its own kept cache after a broken stream",
            ["how"],
            registry=r,
        )
        self.session_misses = Counter(
            "coinfer_session_misses",
            "Resumes asked for a session this replica does "
            "not hold (ran elsewhere, restart, eviction): each makes the device replay",
            registry=r,
        )
        self.probe_bytes = Counter("coinfer_probe_bytes", "Probe reply payload bytes sent", registry=r)
        self.streams_ended = Counter(
            "coinfer_streams_ended",
            "Streams ended because their device sent nothing within its deadline (first message or idle)",
            registry=r,
        )
        self.queue_seconds = Histogram(
            "coinfer_queue_seconds", "Wait for the model per forward", buckets=LATENCY_BUCKETS, registry=r
        )

    def watch(self, store: SessionStore) -> None:
        """Export `store`'s sizes and stats from now on."""
        self.store.store = store
