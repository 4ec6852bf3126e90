"""Property tests (hypothesis) against a live edge: random protobuf messages in random orders into
Generate only ever end in a gRPC status, and the edge keeps serving a healthy session throughout.
(The codec's frames and headers fuzzed without a server: tests/unit/test_fuzz.py.)"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc
from tests.support.edge import address, edge_server, open_msg, session
from tests.support.frames import FRAMES
from tests.support.reference import greedy_reference


@pytest.fixture(scope="module")
def edge(tiny_dir):
    with edge_server(tiny_dir, max_new_tokens=16) as srv:
        yield srv


def _message(draw, fp: str) -> pb.DeviceMessage:
    kind = draw(st.sampled_from(["open", "open", "prefill", "step", "empty"]))
    if kind == "open":
        return open_msg(
            draw(st.sampled_from([fp, "sha256:bad", ""])),
            draw(st.integers(0, 8)),
            draw(st.sampled_from(["f32", "int8", "uq20", "zip", ""])),
            max_new=draw(st.integers(0, 20)),
            session_id=draw(st.text(max_size=8)),
            prefix_hashes=draw(st.lists(st.binary(min_size=0, max_size=17), max_size=3)),
            prefix_lengths=draw(st.lists(st.integers(0, 80), max_size=3)),
        )
    if kind == "prefill":
        return pb.DeviceMessage(
            prefill=pb.Prefill(
                token_ids=draw(st.lists(st.integers(0, 2**32 - 1), max_size=20)),
                frame=draw(st.sampled_from([b"", FRAMES["f32"], FRAMES["uq20"], b"\x00garbage"])),
                block_hashes=draw(st.lists(st.binary(max_size=17), max_size=2)),
                chain_state=draw(st.binary(max_size=17)),
            )
        )
    if kind == "step":
        return pb.DeviceMessage(step=pb.Step(frame=draw(st.sampled_from([b"", FRAMES["f32"][:20], FRAMES["f32"]]))))
    return pb.DeviceMessage()


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_message_sequences_end_in_a_status(edge, tiny_dir, data):
    fp = edge.service.runner.fingerprint
    messages = [_message(data.draw, fp) for _ in range(data.draw(st.integers(0, 5)))]
    with grpc.insecure_channel(address(edge)) as ch:
        stub = edge_pb2_grpc.EdgeInferenceStub(ch)
        try:
            replies = list(stub.Generate(iter(messages), timeout=20))
        except grpc.RpcError as e:
            assert e.code() in {
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.ALREADY_EXISTS,
            }, e
            assert e.details()
            return
        kinds = [r.WhichOneof("kind") for r in replies]
        assert kinds[:1] in ([], ["opened"]) and all(k in ("opened", "token", "done") for k in kinds)


def test_the_edge_still_serves_correctly_after_the_fuzzing(edge, tiny_dir):
    ids = list(range(3, 20))
    with grpc.insecure_channel(address(edge)) as ch:
        replies = session(
            edge_pb2_grpc.EdgeInferenceStub(ch),
            [
                open_msg(edge.service.runner.fingerprint, 0, max_new=8, session_id="after"),
                pb.DeviceMessage(prefill=pb.Prefill(token_ids=ids)),
            ],
        )
    assert [r.token.id for r in replies if r.WhichOneof("kind") == "token"] == greedy_reference(tiny_dir, ids, 8)
    assert len(edge.service.sessions) == 0
