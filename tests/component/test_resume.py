"""Session affinity and resume over real gRPC: a stream that breaks on the way (a proxy restarts, a
connection resets: the Shaper cuts it) goes on from the edge's own cache without a replay; a reopen
that lands on a replica without the session gets NOT_FOUND + `coinfer-replay: session-missing` and the
device replays. Output is identical either way. (The store's and the device's rules alone:
tests/unit/test_resume.py.)"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from coinfer.model.sampling import SamplingParams
from coinfer.tools.shaper import Shaper
from coinfer.v1 import edge_pb2 as pb
from coinfer.wire import RESUME_TOKEN_BYTES as TOKEN_BYTES
from device_agent.generate import GenerationRequest, Result
from edge_server.sessions import SessionStore
from tests.support.agent_app import edge_engine
from tests.support.edge import edge_server, open_msg, stub
from tests.support.kv_store import PER_CHUNK, tail_session
from tests.support.reference import greedy_reference

PROMPT = [11, 40, 7, 23, 5, 88, 64, 3, 19, 42, 17, 9, 30, 31, 2, 6, 8, 77, 12, 13]


def _run_and_break(engine, n: int, at: int, on_break) -> tuple[list[int], Result]:
    got, result = [], None
    for ev in engine.stream(GenerationRequest(PROMPT, n, SamplingParams())):
        if isinstance(ev, Result):
            result = ev
        elif ev.token_id >= 0:
            got.append(ev.token_id)
            if len(got) == at:
                on_break()
    return got, result


def _relink(links: list[Shaper], target: int, port: int) -> None:
    """Cut every connection through the current link, then listen on the same port towards `target`."""
    links[-1].stop()
    links.append(Shaper(("127.0.0.1", target), listen=("127.0.0.1", port)))
    links[-1].start()


def _metric(server, name: str, **labels) -> float:
    return server.service.metrics.registry.get_sample_value(name, labels or None) or 0.0


@pytest.mark.parametrize("split", [0, 3])
def test_a_broken_stream_resumes_from_the_edges_cache_without_replay(tiny_dirs, split):
    d = tiny_dirs["qwen2"]
    with edge_server(d) as srv:
        link = Shaper(("127.0.0.1", srv.grpc_port))
        port = link.start()
        engine = edge_engine(d, port, split)
        expected = greedy_reference(d, PROMPT, 24, engine.tokenizer.eos_token_ids)
        links = [link]
        try:  # every connection through the link drops; a new link to the same edge opens on the same port
            got, result = _run_and_break(engine, 24, 6, lambda: _relink(links, srv.grpc_port, port))
        finally:
            links[-1].stop()
        assert got == expected
        assert result.stats.resumes == 1 and result.stats.replays == 0
        assert _metric(srv, "coinfer_sessions_opened_total", how="resumed") == 1
        assert _metric(srv, "coinfer_session_misses_total") == 0


@pytest.mark.parametrize("split", [0, 3])
def test_a_reopen_on_a_replica_without_the_session_replays(tiny_dirs, split):
    d = tiny_dirs["qwen2"]
    with edge_server(d) as a, edge_server(d) as b:
        link = Shaper(("127.0.0.1", a.grpc_port))
        port = link.start()
        engine = edge_engine(d, port, split)
        expected = greedy_reference(d, PROMPT, 24, engine.tokenizer.eos_token_ids)
        links = [link]
        try:  # the route now leads to replica b, which never saw the session
            got, result = _run_and_break(engine, 24, 6, lambda: _relink(links, b.grpc_port, port))
        finally:
            links[-1].stop()
        assert got == expected
        assert result.stats.replays == 1 and result.stats.resumes == 0
        assert _metric(b, "coinfer_session_misses_total") == 1
        assert _metric(b, "coinfer_sessions_opened_total", how="new") == 1


def test_resume_of_an_unknown_session_is_not_found_with_the_replay_hint(tiny_dir):
    with edge_server(tiny_dir) as srv, stub(f"127.0.0.1:{srv.grpc_port}") as s:
        fp = srv.service.runner.fingerprint
        call = s.Generate(
            iter([open_msg(fp, 0, session_id="nobody", resume_tokens=5, resume_token=bytes(TOKEN_BYTES))]), timeout=10
        )
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "replay" in e.value.details()
        assert dict(e.value.trailing_metadata())["coinfer-replay"] == "session-missing"
        with pytest.raises(grpc.RpcError) as e:
            list(s.Generate(iter([open_msg(fp, 0, resume_tokens=1 << 30)]), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "resume_tokens" in e.value.details()
        assert s.Describe(pb.DescribeRequest(), timeout=10).fingerprint == fp  # still serving


def test_reopen_waits_for_the_old_stream_of_the_session_to_end():
    store = SessionStore(max_sessions=8, budget_bytes=64 * PER_CHUNK)
    old = tail_session("s1")
    old.resume_token = b"k" * TOKEN_BYTES
    done = threading.Event()

    def hold_a_while() -> None:
        with store.hold("s1", old):
            done.wait(0.3)

    t = threading.Thread(target=hold_a_while)
    t.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    store.wait_released("s1", old.owner, bytes(TOKEN_BYTES), timeout=5)  # without its token: stops nothing
    assert time.monotonic() - t0 < 0.1 and len(store) == 1
    store.wait_released("s1", old.owner, old.resume_token, timeout=5)
    assert 0.1 < time.monotonic() - t0 < 2 and len(store) == 0
    t.join()
