"""Several edges: the device agent fails over to another edge mid-generation and replays there."""

from __future__ import annotations

from coinfer.model.sampling import SamplingParams
from device_agent.cli import build_app
from device_agent.config import AgentSettings
from device_agent.generate import GenerationRequest, Result
from tests.serving import address, edge_server, greedy_reference

PROMPT = [11, 40, 7, 23, 5, 88, 64, 3, 19]


def _engine(model_dir, edges, split):
    settings = AgentSettings(model_dir=str(model_dir), edge=",".join(address(e) for e in edges), split=str(split),
                             codec="f32", connect_timeout_seconds=2)
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
        n = sum(s.value for m in edge.service.metrics.registry.collect() if m.name == "coinfer_sessions"
                for s in m.samples if s.name == "coinfer_sessions_total")
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

            def kill(n):
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
        engine = build_app(AgentSettings(model_dir=str(tiny_dir), edge=f"{dead},{address(a)}", split="3",
                                         codec="f32", connect_timeout_seconds=2)).state.logic.engine
        assert engine.edge.address == address(a)
        got, result = _run(engine)
        assert got == greedy_reference(tiny_dir, PROMPT, 24) and result.stats.replays == 0


def test_a_full_edge_hands_the_request_to_another(tiny_dir):
    import threading

    from tests.unit.test_edge_at_scale import _hold_session

    with edge_server(tiny_dir, max_sessions=1) as a, edge_server(tiny_dir, max_sessions=1) as b:
        engine = _engine(tiny_dir, [a, b], 3)
        busy = a if engine.edge.address == address(a) else b
        release = threading.Event()
        holder = threading.Thread(target=_hold_session, args=(address(busy), busy.service.runner.fingerprint,
                                                              release))
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
