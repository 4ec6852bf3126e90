"""The wire contract beside edge.proto (coinfer/wire.py): trailers read back what was written, the
two ends' channel options agree, and metadata helpers speak the formats the proxies and the edge read."""

from __future__ import annotations

import grpc
import pytest

from coinfer import wire
from device_agent.edge.client import EdgeAuth, EdgeError
from edge_server import security
from tests.support.grpc_fakes import FakeRpcError


@pytest.mark.parametrize("code", list(grpc.StatusCode))
@pytest.mark.parametrize("retry_after", [None, 0.0, 0.25, 1.5, 30.0])
def test_error_trailers_round_trip(code, retry_after):
    extra = ((wire.REPLAY_KEY, wire.SESSION_MISSING),)
    trailers = wire.error_trailers(code, retry_after, extra)
    assert (wire.STATUS_KEY, code.name) in trailers and extra[0] in trailers
    told = wire.parse_error_trailers(trailers)
    assert told.code == code
    assert told.retry_after == (None if retry_after is None else pytest.approx(retry_after, abs=1e-3))


@pytest.mark.parametrize("metadata", [
    None, (), [("other", "x")], ((wire.STATUS_KEY, "NOT_A_CODE"),), ((wire.STATUS_KEY, b"\x00"),),
    ((wire.RETRY_AFTER_KEY, "soon"),), ((wire.RETRY_AFTER_KEY, ""),), 42, [("only-a-key",)], [(1, 2)],
])  # fmt: skip
def test_unreadable_trailers_tell_nothing(metadata):
    assert wire.parse_error_trailers(metadata) == wire.ErrorTrailers()


def test_the_device_reads_what_the_edge_writes():
    """edge_server writes wire.error_trailers; EdgeError.from_rpc reads them, also after a proxy
    replaced the status with CANCELLED."""
    full = wire.error_trailers(grpc.StatusCode.RESOURCE_EXHAUSTED, 0.7)
    e = EdgeError.from_rpc(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", full))
    assert (e.code, e.retry_after) == (grpc.StatusCode.RESOURCE_EXHAUSTED, pytest.approx(0.7))
    e = EdgeError.from_rpc(
        FakeRpcError(grpc.StatusCode.CANCELLED, "reset", wire.error_trailers(grpc.StatusCode.ABORTED))
    )
    assert e.code == grpc.StatusCode.ABORTED and e.retry_after is None


def test_keepalive_of_the_device_is_within_what_the_edge_permits():
    device = dict(wire.channel_options(1 << 20))
    edge = dict(wire.server_options(1 << 20, 60))
    assert device["grpc.keepalive_time_ms"] >= edge["grpc.http2.min_ping_interval_without_data_ms"]
    for key in ("grpc.max_send_message_length", "grpc.max_receive_message_length"):
        assert device[key] == edge[key] == 1 << 20
    assert edge["grpc.max_connection_idle_ms"] == 60_000 and edge["grpc.so_reuseport"] == 0


def test_bearer_and_affinity_metadata():
    md = EdgeAuth(token="t-1").metadata()
    assert md == wire.bearer_metadata("t-1") == (("authorization", "Bearer t-1"),)
    assert wire.bearer_token(md) == "t-1" and security.TokenAuth(["t-1"]).allows(md)
    assert EdgeAuth().metadata() == () and wire.bearer_token((("authorization", "Basic t-1"),)) is None
    assert dict(wire.affinity_metadata("conv-7")) == {"x-session-id": "conv-7", "session_id": "conv-7"}


@pytest.mark.parametrize("split, want", [(0, wire.TOKEN_IDS), (3, "int8"), (6, wire.NO_EDGE), (7, wire.NO_EDGE)])
def test_split_codec(split, want):
    assert wire.split_codec(split, 6, "int8") == want
