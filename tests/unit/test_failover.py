"""A pool whose edges are all full makes the device wait its busy budget, then give up or finish
locally, never spin: the session runner against a scripted pool and a fake clock. (Failover between
live edges: tests/component/test_failover.py.)"""

from __future__ import annotations

import types

import grpc
import pytest

from device_agent.config import AgentSettings
from device_agent.edge import session_runner as remote
from device_agent.edge.client import EdgeError
from device_agent.generate import GenerationRequest, RunStats
from device_agent.metrics import AgentMetrics


class _FakeTime:
    """The session runner's clock: sleeps advance it, nothing really waits."""

    def __init__(self) -> None:
        self.now, self.slept = 1000.0, []

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


class _FullPool:
    """Every edge answers RESOURCE_EXHAUSTED; failover always claims to have moved (the worst case)."""

    def __init__(self, n: int) -> None:
        self.clients, self.opens = [object()] * n, 0

    def open(self, msg, affinity=""):
        self.opens += 1
        raise EdgeError(grpc.StatusCode.RESOURCE_EXHAUSTED, "edge is full", retry_after=0.5)

    def failover(self, why=None) -> bool:
        return True


@pytest.mark.parametrize("holds_all", [False, True])
def test_all_edges_full_waits_the_busy_budget_then_gives_up_or_finishes_here(monkeypatch, holds_all):
    clock, pool = _FakeTime(), _FullPool(3)
    monkeypatch.setattr(remote, "time", clock)
    settings = AgentSettings(prefix_reuse=False, busy_wait_seconds=3.0, edge="")
    head = types.SimpleNamespace(fingerprint="fp", holds_all_layers=holds_all)
    runner = remote.EdgeRunner(
        settings.resilience, settings.prefix, settings.connection.max_message_bytes, head, pool, None, AgentMetrics()
    )
    stats = RunStats(0, "token_ids", "requested")
    local = lambda history, max_new: iter([(7, 0.0, "length")])  # noqa: E731
    source = runner.tokens(GenerationRequest([1, 2, 3], 4), 0, "f32", frozenset(), stats, local)
    if holds_all:
        assert list(source) == [(7, 0.0, "length")] and stats.fallback
    else:
        with pytest.raises(EdgeError) as e:
            list(source)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    waits = len(clock.slept)
    assert waits >= 1 and pool.opens <= 3 * (1 + waits)
    assert 3.0 - 1e-9 <= sum(clock.slept) <= 3.0 + 1.0
    assert stats.busy_retries == pool.opens - 1 and stats.replays == 0
