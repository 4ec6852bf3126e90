"""Session affinity and resume: a stream that breaks on the way (a proxy restarts, a connection
resets) goes on from the edge's own cache without a replay; a reopen that lands on a replica
without the session gets NOT_FOUND + `coinfer-replay: session-missing` and the device replays.
Output is identical either way."""

from __future__ import annotations

import threading
import time
import types

import grpc
import pytest

from coinfer.model.sampling import SamplingParams
from coinfer.shaper import Shaper
from coinfer.v1 import edge_pb2 as pb
from device_agent import remote
from device_agent.cli import build_app
from device_agent.config import AgentSettings
from device_agent.edge_client import EdgeError
from device_agent.generate import GenerationRequest, Result, RunStats
from device_agent.metrics import AgentMetrics
from edge_server.service import TOKEN_BYTES
from edge_server.sessions import SessionStore
from tests.serving import edge_server, greedy_reference, open_msg, stub
from tests.unit.test_session_store import PER_CHUNK, _finish, _session

PROMPT = [11, 40, 7, 23, 5, 88, 64, 3, 19, 42, 17, 9, 30, 31, 2, 6, 8, 77, 12, 13]


def _engine(model_dir, port: int, split: int):
    settings = AgentSettings(model_dir=str(model_dir), edge=f"127.0.0.1:{port}", split=str(split), codec="f32",
                             replays=3, connect_timeout_seconds=10)
    return build_app(settings).state.logic.engine


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
        engine = _engine(d, port, split)
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
        engine = _engine(d, port, split)
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
        call = s.Generate(iter([open_msg(fp, 0, session_id="nobody", resume_tokens=5,
                                         resume_token=bytes(TOKEN_BYTES))]), timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "replay" in e.value.details()
        assert dict(e.value.trailing_metadata())["coinfer-replay"] == "session-missing"
        with pytest.raises(grpc.RpcError) as e:
            list(s.Generate(iter([open_msg(fp, 0, resume_tokens=1 << 30)]), timeout=10))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "resume_tokens" in e.value.details()
        assert s.Describe(pb.DescribeRequest(), timeout=10).fingerprint == fp  # still serving


def test_store_resumes_only_the_same_session_of_the_same_client_with_its_token_at_a_held_position():
    store = SessionStore(max_sessions=8, budget_bytes=64 * PER_CHUNK)
    ids, token = list(range(100, 140)), b"k" * TOKEN_BYTES  # 40 positions
    with store.hold("s1", a := _session("s1")):
        a.owner, a.resume_token = "peer:one", token
        _finish(store, a, ids)
    stranger, other_split, too_far, guess = (_session("s1"), _session("s1", split=2), _session("s1"),
                                             _session("s1"))
    stranger.owner, other_split.owner, too_far.owner, guess.owner = "peer:two", "peer:one", "peer:one", "peer:one"
    assert not store.resume(stranger, 10, token) and not store.resume(other_split, 10, token)
    assert not store.resume(too_far, 41, token) and not store.resume(guess, 10, bytes(TOKEN_BYTES))
    assert store.stats.missing == 4
    again = _session("s1")
    again.owner = "peer:one"
    with store.hold("s1", again):
        assert store.resume(again, 37, token)  # any position it holds, not only block boundaries
        assert again.cache.length == 37 and len(again.chain_blocks) == 2
    assert store.kept_count == 0 and store.stats.resumed == 1


def test_reopen_waits_for_the_old_stream_of_the_session_to_end():
    store = SessionStore(max_sessions=8, budget_bytes=64 * PER_CHUNK)
    old = _session("s1")
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


class _Broken(grpc.RpcError):
    def __init__(self, code, details, trailers=()) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


@pytest.mark.parametrize("code,details", [
    (grpc.StatusCode.INTERNAL, "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"),  # nginx
    (grpc.StatusCode.UNKNOWN, "Stream removed (Data frame with END_STREAM flag received)"),  # HAProxy
])
def test_a_stream_reset_by_a_proxy_counts_as_a_lost_session(code, details):
    e = EdgeError.from_rpc(_Broken(code, details))
    assert e.code == grpc.StatusCode.UNAVAILABLE and e.retryable
    assert not EdgeError.from_rpc(_Broken(grpc.StatusCode.INTERNAL, "protocol error: bad frame")).retryable


def test_the_edges_status_survives_a_proxy_that_resets_the_stream():
    # HAProxy answers an edge's NOT_FOUND as CANCELLED (RST_STREAM) but passes the trailing metadata on
    reset = "Stream removed (RST_STREAM (Received RST_STREAM with error code 8))"
    e = EdgeError.from_rpc(_Broken(grpc.StatusCode.CANCELLED, reset,
                                   (("coinfer-status", "NOT_FOUND"), ("coinfer-replay", "session-missing"))))
    assert e.code == grpc.StatusCode.NOT_FOUND
    e = EdgeError.from_rpc(_Broken(grpc.StatusCode.CANCELLED, reset, (("coinfer-status", "INVALID_ARGUMENT"),)))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and not e.retryable


class _Stream:
    """One scripted edge stream: replies in order (an EdgeError is raised where it stands)."""

    def __init__(self, replies: list) -> None:
        self.replies, self.replica = list(replies), "fake:1"
        self.bytes_up = self.bytes_down = self.messages_up = self.messages_down = 0

    def send(self, msg) -> None:
        pass

    def done_sending(self) -> None:
        pass

    def close(self) -> None:
        pass

    def recv(self, expect: str):
        r = self.replies.pop(0)
        if isinstance(r, Exception):
            raise r
        return r


class _Edge:
    """One edge: the first stream breaks after a token (or, `unreachable`, the first Open fails), the
    next finishes; every Open is kept."""

    def __init__(self, unreachable: bool = False) -> None:
        self.opens: list[pb.Open] = []
        self.unreachable = unreachable

    def open(self, msg: pb.Open, affinity: str = ""):
        self.opens.append(msg)
        if len(self.opens) == 1 and self.unreachable:
            raise EdgeError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        if len(self.opens) == 1:
            return _Stream([pb.Token(id=5), EdgeError(grpc.StatusCode.UNAVAILABLE, "reset")]), \
                pb.Opened(session_id=msg.session_id, resume_token=b"first-secret")
        return _Stream([pb.Token(id=6, finish_reason=pb.FINISH_REASON_LENGTH), pb.Done()]), \
            pb.Opened(session_id=msg.session_id, cached_tokens=msg.resume_tokens, resumed=True,
                      resume_token=b"second-secret")


def _run_fake(monkeypatch, edge: _Edge) -> tuple[list[int], RunStats]:
    monkeypatch.setattr(remote, "time", types.SimpleNamespace(sleep=lambda s: None, monotonic=time.monotonic,
                                                               perf_counter=time.perf_counter))
    model = types.SimpleNamespace(precision="fp32")
    head = types.SimpleNamespace(fingerprint="fp", holds_all_layers=False, model=model)
    planner = types.SimpleNamespace(quiet=lambda n: 0.0, observe=lambda *a: None)
    runner = remote.EdgeRunner(AgentSettings(edge=""), head, edge, planner, AgentMetrics())
    stats = RunStats(0, "token_ids", "requested")
    got = runner.tokens(GenerationRequest(list(range(20)), 2), 0, "token_ids", frozenset(), stats,
                        lambda history, max_new: iter(()))
    return [t for t, _, _ in got], stats


def test_a_resume_presents_the_secret_resume_token_of_the_last_stream(monkeypatch):
    edge = _Edge()
    got, stats = _run_fake(monkeypatch, edge)
    assert got == [5, 6] and stats.resumes == 1 and stats.replays == 0
    first, resume = edge.opens
    assert first.resume_tokens == 0 and first.resume_token == b""
    assert resume.session_id == first.session_id and resume.resume_tokens == 20
    assert resume.resume_token == b"first-secret"


def test_a_session_the_edge_never_opened_is_replayed_not_resumed(monkeypatch):
    edge = _Edge(unreachable=True)  # no Opened, no resume token: nothing to resume
    got, stats = _run_fake(monkeypatch, edge)
    assert got == [6] and stats.replays == 1 and stats.resumes == 0
    assert [o.resume_tokens for o in edge.opens] == [0, 0]
