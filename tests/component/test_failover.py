"""Several edges: the device agent fails over to another edge mid-generation and replays there;
a pool whose edges are all silent keeps its active edge. (All edges full, against a fake clock:
tests/unit/test_failover.py.)"""

from __future__ import annotations

import grpc

from coinfer.model.sampling import SamplingParams
from coinfer.v1 import edge_pb2 as pb
from device_agent.cli import build_app
from device_agent.config import AgentSettings
from device_agent.edge.client import EdgeError, Exchange
from device_agent.edge.pool import EdgePool
from device_agent.generate import GenerationRequest, Result
from tests.support.edge import address, edge_server, hold_session
from tests.support.reference import greedy_reference

PROMPT = [11, 40, 7, 23, 5, 88, 64, 3, 19]


def _engine(model_dir, edges, split):
    settings = AgentSettings(
        model_dir=str(model_dir),
        edge=",".join(address(e) for e in edges),
        split=str(split),
        codec="f32",
        connect_timeout_seconds=2,
    )
    return build_app(settings).state.logic.engine


def _run(engine, on_token=None):
    got, result = [], None
    for ev in engine.stream(GenerationRequest(PROMPT, 24, SamplingParams(), ignore_eos=True)):
        if isinstance(ev, Result):
            result = ev
        elif ev.token_id >= 0:
            got.append(ev.token_id)
            if on_token:
                on_token(len(got))
    return got, result


def _sessions_opened(edge, at_least: int = 1) -> float:
    """Sessions the edge has finished (counted when its handler ends, a moment after the device saw Done)."""
    import time

    deadline = time.monotonic() + 5
    while True:
        n = sum(
            s.value
            for m in edge.service.metrics.registry.collect()
            if m.name == "coinfer_sessions"
            for s in m.samples
            if s.name == "coinfer_sessions_total"
        )
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.01)


def test_serving_edge_dies_mid_stream_and_another_finishes_identically(tiny_dir):
    expected = greedy_reference(tiny_dir, PROMPT, 24)
    for split in (0, 3):
        with edge_server(tiny_dir) as a, edge_server(tiny_dir) as b:
            engine = _engine(tiny_dir, [a, b], split)
            first = engine.edge.active
            serving = a if first.address == address(a) else b
            other = b if serving is a else a

            def kill(n, serving=serving):
                if n == 6:
                    serving.stop(0)

            got, result = _run(engine, kill)
            assert got == expected
            assert result.stats.replays == 1 and engine.edge.active is not first
            assert _sessions_opened(other) == 1  # the replay ran on the other edge
            # the next request goes straight to the live edge
            assert _run(engine)[0] == expected and engine.edge.active is not first


def test_an_edge_down_at_start_is_skipped(tiny_dir):
    with edge_server(tiny_dir) as a:
        with edge_server(tiny_dir) as b:
            dead = address(b)
        engine = build_app(
            AgentSettings(
                model_dir=str(tiny_dir), edge=f"{dead},{address(a)}", split="3", codec="f32", connect_timeout_seconds=2
            )
        ).state.logic.engine
        assert engine.edge.address == address(a)
        got, result = _run(engine)
        assert got == greedy_reference(tiny_dir, PROMPT, 24) and result.stats.replays == 0


def test_a_full_edge_hands_the_request_to_another(tiny_dir):
    import threading

    with edge_server(tiny_dir, max_sessions=1) as a, edge_server(tiny_dir, max_sessions=1) as b:
        engine = _engine(tiny_dir, [a, b], 3)
        busy = a if engine.edge.address == address(a) else b
        release = threading.Event()
        holder = threading.Thread(target=hold_session, args=(address(busy), busy.service.runner.fingerprint, release))
        holder.start()
        while len(busy.service.sessions) < 1:
            threading.Event().wait(0.01)
        got, result = _run(engine)
        release.set()
        holder.join()
        assert got == greedy_reference(tiny_dir, PROMPT, 24)
        assert result.stats.busy_retries >= 1 and not result.stats.fallback and engine.edge.address != address(busy)


def test_drain_lets_in_flight_sessions_finish_and_sends_new_ones_elsewhere(tiny_dir):
    import threading

    with edge_server(tiny_dir) as a, edge_server(tiny_dir) as b:
        engine = _engine(tiny_dir, [a, b], 3)
        first = a if engine.edge.address == address(a) else b
        other = b if first is a else a
        stopper, second = [], {}

        def drain_then_request(n):
            if n == 5 and not stopper:  # SIGTERM path: NOT_SERVING, refuse new sessions, let this one finish
                t = threading.Thread(target=first.stop, args=(30,))
                t.start()
                stopper.append(t)
                while not first.service.draining.is_set():
                    threading.Event().wait(0.005)
                second["run"] = _run(engine)

        long = GenerationRequest(PROMPT, 120, SamplingParams(), ignore_eos=True)
        got, result = [], None
        for ev in engine.stream(long):
            if isinstance(ev, Result):
                result = ev
            elif ev.token_id >= 0:
                got.append(ev.token_id)
                drain_then_request(len(got))
        stopper[0].join(30)
        assert got == greedy_reference(tiny_dir, PROMPT, 120) and result.stats.replays == 0  # finished in place
        got2, result2 = second["run"]
        assert got2 == greedy_reference(tiny_dir, PROMPT, 24) and _sessions_opened(other) == 1


def test_failover_reports_when_no_other_edge_answers_and_keeps_the_active_one(monkeypatch):
    pool = EdgePool(["127.0.0.1:9", "127.0.0.1:10", "127.0.0.1:11"], down_seconds=60)  # channels connect lazily
    answering = set()

    def describe_timed(i):
        def call(include_profile=False, timeout=None):
            if i not in answering:
                raise EdgeError(grpc.StatusCode.UNAVAILABLE, "no answer")
            return pb.DescribeResponse(), Exchange(2, 2, 0.001)

        return call

    for i, c in enumerate(pool.clients):
        monkeypatch.setattr(c, "describe_timed", describe_timed(i))
    active, generation = pool.active, pool.generation
    assert not pool.failover(why="lost")  # nobody answered: no blind rotation
    assert pool.active is active and pool.generation == generation
    pool._down_until = [0.0] * 3  # their down time is over; edge 2 answers now
    pool._active, answering = 1, {2}
    assert pool.failover(why="lost") and pool.active is pool.clients[2] and pool.generation == generation + 1
    pool.close()
