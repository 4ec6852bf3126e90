"""Which status each failure of a session answers with (edge_server/service.py's STATUS_OF), and the
store's metrics read at scrape time. (A fault of a live edge answered as INTERNAL without its text:
tests/component/test_edge_statuses.py.)"""

from __future__ import annotations

import grpc
import pytest

from coinfer import wire
from coinfer.codec import CodecError, NonFiniteState
from edge_server.errors import Abort, BadInput
from edge_server.metrics import EdgeMetrics
from edge_server.scheduler import ShuttingDown
from edge_server.service import status_of
from edge_server.sessions import SessionEvicted, SessionExistsError, SessionLimitError, SessionStore

C = grpc.StatusCode


@pytest.mark.parametrize("error, code", [
    (BadInput("bad"), C.INVALID_ARGUMENT),
    (CodecError("bad frame"), C.INVALID_ARGUMENT),
    (NonFiniteState("nan"), C.INVALID_ARGUMENT),  # the session's own state: its bad input
    (SessionLimitError("full", 0.25), C.RESOURCE_EXHAUSTED),
    (SessionExistsError("open"), C.ALREADY_EXISTS),
    (SessionEvicted("gone"), C.ABORTED),
    (ShuttingDown("stop"), C.UNAVAILABLE),
    (Abort(C.NOT_FOUND, "missing", trailers=((wire.REPLAY_KEY, wire.SESSION_MISSING),)), C.NOT_FOUND),
])  # fmt: skip
def test_status_table(error, code):
    got, details, trailers = status_of(error)
    assert got == code and details == str(error)
    told = wire.parse_error_trailers(trailers)
    assert told.code == code and told.retry_after == getattr(error, "retry_after", None)
    if isinstance(error, Abort):
        assert (wire.REPLAY_KEY, wire.SESSION_MISSING) in trailers


@pytest.mark.parametrize("error", [ValueError("a bug"), RuntimeError("a bug"), KeyError("a bug"), IndexError()])
def test_anything_else_is_a_fault_of_the_edge(error):
    assert status_of(error) is None


def test_store_metrics_are_read_at_scrape_time():
    metrics, store = EdgeMetrics(), SessionStore(max_sessions=4, budget_bytes=1 << 20)
    value = metrics.registry.get_sample_value
    assert value("coinfer_active_sessions") == 0  # exported before any store: the HPA's metric
    metrics.watch(store)
    store.stats.prefix_hits, store.stats.prefix_tokens, store.stats.evicted_kept = 2, 32, 1
    assert value("coinfer_prefix_hits_total") == 2 and value("coinfer_prefix_reused_tokens_total") == 32
    assert value("coinfer_kv_evictions_total", {"kind": "kept"}) == 1
    assert value("coinfer_kv_evictions_total", {"kind": "live"}) == 0
    assert value("coinfer_kv_budget_bytes") == 1 << 20
    store.stats.prefix_hits += 1  # no bookkeeping in between: the next scrape sees it
    assert value("coinfer_prefix_hits_total") == 3
