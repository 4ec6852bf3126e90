"""Property tests (hypothesis): random and mutated tensor frames, and headers with hostile fields,
only ever raise CodecError; random protobuf messages in random orders into Generate only ever end
in a gRPC status; the edge keeps serving a healthy session throughout."""

from __future__ import annotations

import struct

import grpc
import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coinfer.codec import CODECS, CodecError, decode, encode, frame_token_count
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc
from tests.serving import address, edge_server, greedy_reference, open_msg, session

D = 64  # the tiny model's hidden size
FRAMES = {name: encode(torch.randn(3, D, generator=torch.Generator().manual_seed(1)) * 3, name) for name in CODECS}


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_codec_error(data):
    try:
        y = decode(data, hidden_size=D, max_decoded_bytes=1 << 20)
    except CodecError:
        return
    assert torch.isfinite(y).all() and y.shape[-1] == D


@settings(max_examples=600, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(CODECS)), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                 min_size=1, max_size=6),
       st.integers(0, 10_000), st.binary(max_size=16))
def test_mutated_frames_only_raise_codec_error(name, edits, cut, tail):
    frame = bytearray(FRAMES[name])
    for pos, value in edits:
        frame[pos % len(frame)] = value
    frame = bytes(frame[: max(1, cut % (len(frame) + 1))]) + tail
    try:
        y = decode(frame, hidden_size=D, max_decoded_bytes=1 << 20)
    except CodecError:
        return
    assert torch.isfinite(y).all() and y.shape[-1] == D


_DIM = st.one_of(st.integers(-2, 70), st.sampled_from([D, 2**26, 2**31, 2**32, 2**40, 2**63 - 1, 2**64 - 1]),
                 st.booleans(), st.floats(allow_nan=True), st.none())
_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                                st.text(max_size=8), st.binary(max_size=64)),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                  max_size=4),
                      max_leaves=8)  # fmt: skip


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(CODECS) + ["int3"]), st.one_of(st.lists(_DIM, max_size=5), _VALUE),
       st.one_of(st.binary(max_size=300), _VALUE), st.one_of(_VALUE, st.integers(-1, 10**12)),
       st.sampled_from(sorted(FRAMES)))
def test_structured_headers_only_raise_codec_error(name, shape, scales, aux, body_of):
    """Well-formed msgpack with hostile fields (wrapping shapes, unhashable aux, huge escape
    counts) reaches every check past parsing; decode and frame_token_count only raise CodecError."""
    (n,) = struct.unpack_from("<I", FRAMES[body_of])
    h = msgpack.packb([2, name, shape, scales, aux], use_bin_type=True)
    frame = struct.pack("<I", len(h)) + h + FRAMES[body_of][4 + n :]
    for fn in (decode, frame_token_count):
        try:
            fn(frame, hidden_size=D, max_decoded_bytes=1 << 20)
        except CodecError:
            pass


@pytest.fixture(scope="module")
def edge(tiny_dir):
    with edge_server(tiny_dir, max_new_tokens=16) as srv:
        yield srv


def _message(draw, fp: str) -> pb.DeviceMessage:
    kind = draw(st.sampled_from(["open", "open", "prefill", "step", "empty"]))
    if kind == "open":
        return open_msg(draw(st.sampled_from([fp, "sha256:bad", ""])), draw(st.integers(0, 8)),
                        draw(st.sampled_from(["f32", "int8", "uq20", "zip", ""])), max_new=draw(st.integers(0, 20)),
                        session_id=draw(st.text(max_size=8)),
                        prefix_hashes=draw(st.lists(st.binary(min_size=0, max_size=17), max_size=3)),
                        prefix_lengths=draw(st.lists(st.integers(0, 80), max_size=3)))
    if kind == "prefill":
        return pb.DeviceMessage(prefill=pb.Prefill(
            token_ids=draw(st.lists(st.integers(0, 2**32 - 1), max_size=20)),
            frame=draw(st.sampled_from([b"", FRAMES["f32"], FRAMES["uq20"], b"\x00garbage"])),
            block_hashes=draw(st.lists(st.binary(max_size=17), max_size=2)),
            chain_state=draw(st.binary(max_size=17))))
    if kind == "step":
        return pb.DeviceMessage(step=pb.Step(frame=draw(st.sampled_from([b"", FRAMES["f32"][:20], FRAMES["f32"]]))))
    return pb.DeviceMessage()


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_message_sequences_end_in_a_status(edge, tiny_dir, data):
    fp = edge.service.runner.fingerprint
    messages = [_message(data.draw, fp) for _ in range(data.draw(st.integers(0, 5)))]
    with grpc.insecure_channel(address(edge)) as ch:
        stub = edge_pb2_grpc.EdgeInferenceStub(ch)
        try:
            replies = list(stub.Generate(iter(messages), timeout=20))
        except grpc.RpcError as e:
            assert e.code() in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                                grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ALREADY_EXISTS}, e
            assert e.details()
            return
        kinds = [r.WhichOneof("kind") for r in replies]
        assert kinds[:1] in ([], ["opened"]) and all(k in ("opened", "token", "done") for k in kinds)


def test_the_edge_still_serves_correctly_after_the_fuzzing(edge, tiny_dir):
    ids = list(range(3, 20))
    with grpc.insecure_channel(address(edge)) as ch:
        replies = session(edge_pb2_grpc.EdgeInferenceStub(ch), [
            open_msg(edge.service.runner.fingerprint, 0, max_new=8, session_id="after"),
            pb.DeviceMessage(prefill=pb.Prefill(token_ids=ids))])
    assert [r.token.id for r in replies if r.WhichOneof("kind") == "token"] == greedy_reference(tiny_dir, ids, 8)
    assert len(edge.service.sessions) == 0
