"""A fault of the edge (a runner that raises) answers INTERNAL without its text, is logged with the
session id, and the edge keeps serving. (The status table itself: tests/unit/test_edge_statuses.py.)"""

from __future__ import annotations

import logging

import grpc
import pytest

from coinfer import wire
from coinfer.v1 import edge_pb2 as pb
from edge_server.service import INTERNAL_DETAILS
from tests.support.edge import address, edge_server, open_msg, session, stub
from tests.support.reference import greedy_reference

C = grpc.StatusCode
PROMPT = [5, 9, 17, 33, 8, 61, 20, 7]


@pytest.fixture(scope="module")
def edge(tiny_dir):
    with edge_server(tiny_dir, profile=False) as srv:
        yield srv


@pytest.mark.parametrize("bug", [RuntimeError, ValueError])
def test_an_internal_error_answers_internal_and_the_edge_keeps_serving(edge, tiny_dir, caplog, bug):
    """A runner that raises (a plain RuntimeError, or a ValueError that is no validation's) answers
    INTERNAL: the device must not take it for its own bad input. The text stays in the edge's log."""
    runner, fp = edge.service.runner, edge.service.runner.fingerprint
    original = runner.prefill_input

    def failing(s, frame, ids, t):
        if s.session_id == "victim-of-a-bug":
            raise bug("secret internal detail")
        return original(s, frame, ids, t)

    runner.prefill_input = failing
    try:
        with stub(address(edge)) as s, caplog.at_level(logging.INFO, logger="coinfer.edge"):
            with pytest.raises(grpc.RpcError) as e:
                session(
                    s,
                    [
                        open_msg(fp, 0, max_new=4, session_id="victim-of-a-bug"),
                        pb.DeviceMessage(prefill=pb.Prefill(token_ids=PROMPT)),
                    ],
                )
            replies = session(
                s,
                [open_msg(fp, 0, max_new=4, session_id="next"), pb.DeviceMessage(prefill=pb.Prefill(token_ids=PROMPT))],
            )
    finally:
        runner.prefill_input = original
    assert e.value.code() == C.INTERNAL and e.value.details() == INTERNAL_DETAILS
    assert "secret" not in e.value.details()
    assert wire.parse_error_trailers(e.value.trailing_metadata()).code == C.INTERNAL
    logged = [r for r in caplog.records if "victim-of-a-bug" in r.getMessage()]
    assert logged and logged[0].exc_info and "secret internal detail" in str(logged[0].exc_info[1])
    assert [r.token.id for r in replies[1:-1]] == greedy_reference(tiny_dir, PROMPT, 4)
    assert edge.service.metrics.registry.get_sample_value("coinfer_sessions_total", {"outcome": "internal"}) >= 1


@pytest.mark.parametrize("call", ["Describe", "Probe"])
def test_a_fault_in_a_unary_call_answers_internal_without_its_text(edge, caplog, call, monkeypatch):
    """grpc's own answer to a handler that raises is UNKNOWN with the exception's text; ours is
    INTERNAL without it, logged, and the next call is served."""

    def broken(*_):
        raise RuntimeError("secret internal detail")

    target = (edge.service.runner.load, "snapshot") if call == "Describe" else (edge.service.metrics.probe_bytes, "inc")
    request = pb.DescribeRequest() if call == "Describe" else pb.ProbeRequest(reply_bytes=8)
    with stub(address(edge)) as s, caplog.at_level(logging.INFO, logger="coinfer.edge"):
        with monkeypatch.context() as m:
            m.setattr(*target, broken)
            with pytest.raises(grpc.RpcError) as e:
                getattr(s, call)(request, timeout=10)
        assert e.value.code() == C.INTERNAL and e.value.details() == INTERNAL_DETAILS
        assert wire.parse_error_trailers(e.value.trailing_metadata()).code == C.INTERNAL
        assert any(call in r.getMessage() and r.exc_info for r in caplog.records)
        assert getattr(s, call)(request, timeout=10) is not None  # still serving
