"""The edge's load tracker: recent queue wait and busy share over a sliding window. (The gRPC service
itself: tests/component/test_edge_service.py.)"""

from __future__ import annotations

import pytest


def test_load_tracker_reports_recent_queue_and_busy_share():
    from edge_server.tail import LoadTracker

    t = LoadTracker(window=2.0)
    assert t.snapshot(now=100.0) == (0.0, 0.0)
    t.record(0.3, 0.5, now=100.0)
    t.record(0.1, 0.5, now=101.0)
    assert t.snapshot(now=101.5) == pytest.approx((0.2, 0.5))
    assert t.snapshot(now=102.5) == pytest.approx((0.1, 0.25))  # the first item left the window
    assert t.snapshot(now=110.0) == (0.0, 0.0)  # idle: no queue
