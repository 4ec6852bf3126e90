"""Issue 20 item 6: each malformed message gets its status without a large allocation (the edge's RSS
stays within a bound over a flood of them), and one session's poison fails that session only."""

from __future__ import annotations

import struct

import grpc
import msgpack
import numpy as np
import pytest
import zstandard

from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc
from tests.hostile.conftest import PROMPT, Live, head_rows, in_thread, open_, prefill_ids, rss_kib, tokens
from tests.support.edge import session, stub
from tests.support.reference import greedy_reference

K = 2
HIDDEN = 64  # the tiny model's hidden size


def frame(shape: list, body: bytes = b"", codec_name: str = "f32", scales=None, aux=None) -> bytes:
    """A version-2 frame with any header, as a hostile device could write it."""
    packed = msgpack.packb([2, codec_name, shape, scales, aux], use_bin_type=True)
    z = zstandard.ZstdCompressor(write_content_size=True).compress(body) if body else b""
    return struct.pack("<I", len(packed)) + packed + z


def _prefill(f: bytes) -> pb.DeviceMessage:
    return pb.DeviceMessage(prefill=pb.Prefill(frame=f))


MALFORMED = {
    "shape product overflows int64": (open_, _prefill(frame([2**40, 2**40]))),
    "rank 3 frame hides its token count": (open_, _prefill(frame([1, 1 << 20, HIDDEN]))),
    "huge token count": (open_, _prefill(frame([1 << 30, HIDDEN]))),
    "uq frame claiming a huge body": (
        open_,
        _prefill(frame([1 << 16, HIDDEN], b"\0" * 64, "uq10", scales=b"\0" * 2, aux=1 << 30)),
    ),
    "negative dims": (open_, _prefill(frame([-1, HIDDEN]))),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_frames_get_invalid_argument_without_allocating(edge, fp, name):
    make_open, bad = MALFORMED[name]
    before = rss_kib(int(edge.ready["pid"]))
    with stub(edge.ready["grpc"]) as s:
        for i in range(20):
            with pytest.raises(grpc.RpcError) as e:
                session(s, [make_open(fp, split=K, session_id=f"m{i}"), bad], timeout=20)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert rss_kib(int(edge.ready["pid"])) - before < 64 << 10  # KiB: far below one decoded claim


def test_step_frames_must_be_one_token(edge, channel, tiny_dir, fp):
    live = Live(channel, open_(fp, split=K, session_id="two-tokens"))
    live.recv()
    live.send(pb.DeviceMessage(prefill=pb.Prefill(frame=head_rows(tiny_dir, PROMPT, K))))
    live.recv()
    live.send(pb.DeviceMessage(step=pb.Step(frame=head_rows(tiny_dir, PROMPT, K, len(PROMPT) - 2))))
    with pytest.raises(grpc.RpcError) as e:
        live.rest()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exactly 1 token" in e.value.details()


def test_stop_ids_are_capped(edge, fp):
    before = rss_kib(int(edge.ready["pid"]))
    big = open_(fp, session_id="stops", stop_ids=list(range(1 << 20)))  # ~3 MiB of ids
    with stub(edge.ready["grpc"]) as s:
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as e:
                session(s, [big, prefill_ids(PROMPT)], timeout=20)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "stop_ids" in e.value.details()
    assert rss_kib(int(edge.ready["pid"])) - before < 64 << 10


def test_probe_replies_are_capped(edge):
    with grpc.insecure_channel(edge.ready["grpc"], options=[("grpc.max_receive_message_length", 32 << 20)]) as ch:
        reply = edge_pb2_grpc.EdgeInferenceStub(ch).Probe(pb.ProbeRequest(reply_bytes=16 << 20), timeout=10)
    assert len(reply.payload) == 65536  # the fixture's --max-probe-bytes


def test_a_nan_session_fails_alone(edge, channel, tiny_dir, fp):
    """A frame of NaN fails its own session; a session decoding at the same time is untouched."""
    expected = greedy_reference(tiny_dir, PROMPT, 12)
    honest: list[int] = []

    def run_honest() -> None:
        with stub(edge.ready["grpc"]) as s:
            honest.extend(tokens(session(s, [open_(fp, max_new=12, session_id="honest"), prefill_ids(PROMPT)])))

    t = in_thread(run_honest)
    nan = np.full((1, HIDDEN), np.nan, dtype=np.float32).tobytes()
    for i in range(5):
        live = Live(channel, open_(fp, split=K, session_id=f"nan{i}"))
        live.recv()
        live.send(pb.DeviceMessage(prefill=pb.Prefill(frame=head_rows(tiny_dir, PROMPT, K))))
        live.recv()
        live.send(pb.DeviceMessage(step=pb.Step(frame=frame([1, HIDDEN], nan))))
        with pytest.raises(grpc.RpcError) as e:
            live.rest()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    t.join(30)
    assert honest == expected
