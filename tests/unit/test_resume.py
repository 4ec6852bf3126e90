"""Resume without sockets: which reopen the edge's store resumes, how a device reads a stream reset by
a proxy, and which resume token a device presents (scripted edges, no network). The same paths over
real gRPC, through a link that breaks: tests/component/test_resume.py."""

from __future__ import annotations

import time
import types

import grpc
import pytest

from coinfer.v1 import edge_pb2 as pb
from coinfer.wire import RESUME_TOKEN_BYTES as TOKEN_BYTES
from device_agent.config import AgentSettings
from device_agent.edge import session_runner as remote
from device_agent.edge.client import EdgeError
from device_agent.generate import GenerationRequest, RunStats
from device_agent.metrics import AgentMetrics
from edge_server.sessions import SessionStore
from tests.support.grpc_fakes import FakeRpcError
from tests.support.kv_store import PER_CHUNK, keep_finished, tail_session


def test_store_resumes_only_the_same_session_of_the_same_client_with_its_token_at_a_held_position():
    store = SessionStore(max_sessions=8, budget_bytes=64 * PER_CHUNK)
    ids, token = list(range(100, 140)), b"k" * TOKEN_BYTES  # 40 positions
    with store.hold("s1", a := tail_session("s1")):
        a.owner, a.resume_token = "peer:one", token
        keep_finished(store, a, ids)
    stranger, other_split, too_far, guess = (
        tail_session("s1"),
        tail_session("s1", split=2),
        tail_session("s1"),
        tail_session("s1"),
    )
    stranger.owner, other_split.owner, too_far.owner, guess.owner = "peer:two", "peer:one", "peer:one", "peer:one"
    assert not store.resume(stranger, 10, token) and not store.resume(other_split, 10, token)
    assert not store.resume(too_far, 41, token) and not store.resume(guess, 10, bytes(TOKEN_BYTES))
    assert store.stats.missing == 4
    again = tail_session("s1")
    again.owner = "peer:one"
    with store.hold("s1", again):
        assert store.resume(again, 37, token)  # any position it holds, not only block boundaries
        assert again.cache.length == 37 and len(again.chain_blocks) == 2
    assert store.kept_count == 0 and store.stats.resumed == 1


@pytest.mark.parametrize(
    "code,details",
    [
        (grpc.StatusCode.INTERNAL, "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"),  # nginx
        (grpc.StatusCode.UNKNOWN, "Stream removed (Data frame with END_STREAM flag received)"),  # HAProxy
    ],
)
def test_a_stream_reset_by_a_proxy_counts_as_a_lost_session(code, details):
    e = EdgeError.from_rpc(FakeRpcError(code, details))
    assert e.code == grpc.StatusCode.UNAVAILABLE and e.retryable
    assert not EdgeError.from_rpc(FakeRpcError(grpc.StatusCode.INTERNAL, "protocol error: bad frame")).retryable


def test_the_edges_status_survives_a_proxy_that_resets_the_stream():
    # HAProxy answers an edge's NOT_FOUND as CANCELLED (RST_STREAM) but passes the trailing metadata on
    reset = "Stream removed (RST_STREAM (Received RST_STREAM with error code 8))"
    e = EdgeError.from_rpc(
        FakeRpcError(
            grpc.StatusCode.CANCELLED, reset, (("coinfer-status", "NOT_FOUND"), ("coinfer-replay", "session-missing"))
        )
    )
    assert e.code == grpc.StatusCode.NOT_FOUND
    e = EdgeError.from_rpc(FakeRpcError(grpc.StatusCode.CANCELLED, reset, (("coinfer-status", "INVALID_ARGUMENT"),)))
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
        self.clients = [self]  # the EdgePool interface: a pool of one, with nobody to fail over to

    def failover(self, failed=None, why=None) -> bool:
        return False

    def open(self, msg: pb.Open, affinity: str = ""):
        self.opens.append(msg)
        if len(self.opens) == 1 and self.unreachable:
            raise EdgeError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        if len(self.opens) == 1:
            return _Stream([pb.Token(id=5), EdgeError(grpc.StatusCode.UNAVAILABLE, "reset")]), pb.Opened(
                session_id=msg.session_id, resume_token=b"first-secret"
            )
        return _Stream([pb.Token(id=6, finish_reason=pb.FINISH_REASON_LENGTH), pb.Done()]), pb.Opened(
            session_id=msg.session_id, cached_tokens=msg.resume_tokens, resumed=True, resume_token=b"second-secret"
        )


def _run_fake(monkeypatch, edge: _Edge) -> tuple[list[int], RunStats]:
    monkeypatch.setattr(
        remote,
        "time",
        types.SimpleNamespace(sleep=lambda s: None, monotonic=time.monotonic, perf_counter=time.perf_counter),
    )
    model = types.SimpleNamespace(precision="fp32")
    head = types.SimpleNamespace(fingerprint="fp", holds_all_layers=False, model=model)
    planner = types.SimpleNamespace(quiet=lambda n: 0.0, observe=lambda *a: None)
    s = AgentSettings(edge="")
    runner = remote.EdgeRunner(
        s.resilience, s.prefix, s.connection.max_message_bytes, head, edge, planner, AgentMetrics()
    )
    stats = RunStats(0, "token_ids", "requested")
    got = runner.tokens(
        GenerationRequest(list(range(20)), 2), 0, "token_ids", frozenset(), stats, lambda history, max_new: iter(())
    )
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
