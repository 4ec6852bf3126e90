"""Issue 20 item 4: streams that never speak. The edge fixture runs with max_streams 6 (10 workers), a
1 s first-message deadline and a 1.5 s idle deadline."""

from __future__ import annotations

import queue
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coinfer import wire
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc
from tests.hostile.conftest import PROMPT, open_, ops, prefill_ids, tokens
from tests.support.edge import session, stub
from tests.support.reference import greedy_reference


def _silent(ch: grpc.Channel, first: pb.DeviceMessage | None = None):
    """A stream that sends `first` (or nothing) and then never another message, nor a half-close."""
    out: queue.Queue = queue.Queue()
    if first is not None:
        out.put(first)
    return edge_pb2_grpc.EdgeInferenceStub(ch).Generate(iter(out.get, None), timeout=30), out


def _ended(call) -> grpc.StatusCode:
    try:
        for _ in call:
            pass
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _quick_unary(edge) -> float:
    """Seconds for health + Describe."""
    t0 = time.monotonic()
    with grpc.insecure_channel(edge.ready["grpc"]) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        edge_pb2_grpc.EdgeInferenceStub(ch).Describe(pb.DescribeRequest(), timeout=5)
    assert ops(edge, "/healthz").status_code == 200
    return time.monotonic() - t0


def test_silent_streams_are_capped_and_ended_while_health_and_honest_sessions_go_on(edge, fp, tiny_dir):
    with grpc.insecure_channel(edge.ready["grpc"]) as attacker:
        calls = [_silent(attacker)[0] for _ in range(12)]  # twice max_streams, never a message
        t0 = time.monotonic()
        assert _quick_unary(edge) < 2.0  # health and Describe still have threads
        codes = [_ended(c) for c in calls]
        took = time.monotonic() - t0
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert refused >= 6, codes  # beyond max_streams: refused at once, holding no thread
    assert all(c in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED) for c in codes), codes
    assert took < 1.0 + 2.0, f"silent streams held for {took:.1f} s (first-message deadline 1 s)"
    with stub(edge.ready["grpc"]) as s:  # and the edge serves again
        assert tokens(
            session(s, [open_(fp, max_new=4, session_id="h-after"), prefill_ids(PROMPT)])
        ) == greedy_reference(tiny_dir, PROMPT, 4)


def test_open_only_streams_free_their_session_slots(edge, fp):
    with grpc.insecure_channel(edge.ready["grpc"]) as attacker:
        calls = [_silent(attacker, open_(fp, split=2, session_id=f"o{i}"))[0] for i in range(4)]
        for c in calls:
            assert next(c).WhichOneof("kind") == "opened"
        assert len(ops(edge, "/v1/sessions").json()["sessions"]) == 4
        t0 = time.monotonic()
        codes = [_ended(c) for c in calls]
        assert time.monotonic() - t0 < 1.5 + 1.5
    assert codes == [grpc.StatusCode.CANCELLED] * 4
    deadline = time.monotonic() + 3
    while ops(edge, "/v1/sessions").json()["sessions"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ops(edge, "/v1/sessions").json()["sessions"] == []
    metrics = ops(edge, "/metrics").text
    assert "coinfer_streams_ended_total" in metrics


def test_a_device_that_never_half_closes_after_done_is_let_go(edge, fp):
    with grpc.insecure_channel(edge.ready["grpc"]) as ch:
        call, out = _silent(ch, open_(fp, max_new=2, session_id="no-close"))
        out.put(prefill_ids(PROMPT))  # k = 0: the edge generates, sends Done, then waits for the half-close
        t0 = time.monotonic()
        replies = []
        try:
            for r in call:
                replies.append(r)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.CANCELLED
        assert [r.WhichOneof("kind") for r in replies] == ["opened", "token", "token", "done"]
        assert time.monotonic() - t0 < 1.5 + 2.0


def test_one_client_cannot_take_every_stream(tiny_dir, fp):
    """With per-device tokens and max_streams_per_client, a device's silent streams are refused beyond
    its share, and another device's session goes through meanwhile."""
    from coinfer.tools.launcher import start_edge

    edge = start_edge(
        tiny_dir,
        args=[
            "--profile",
            "false",
            "--auth-tokens",
            "evil,honest",
            "--max-streams",
            "6",
            "--workers",
            "10",
            "--max-streams-per-client",
            "3",
            "--first-message-seconds",
            "5",
            "--torch-threads",
            "1",
        ],
    )
    try:
        with grpc.insecure_channel(edge.ready["grpc"]) as ch:
            stub_ = edge_pb2_grpc.EdgeInferenceStub(ch)
            evil = [
                stub_.Generate(iter(queue.Queue().get, None), timeout=30, metadata=wire.bearer_metadata("evil"))
                for _ in range(5)
            ]
            time.sleep(0.5)
            honest = list(
                stub_.Generate(
                    iter([open_(fp, max_new=3, session_id="ok"), prefill_ids(PROMPT)]),
                    timeout=30,
                    metadata=wire.bearer_metadata("honest"),
                )
            )
            assert tokens(honest) == greedy_reference(tiny_dir, PROMPT, 3)
            codes = [_ended(c) for c in evil]
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 2, codes
    finally:
        edge.stop()
