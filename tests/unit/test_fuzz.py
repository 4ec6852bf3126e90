"""Property tests (hypothesis) without a server: random and mutated tensor frames, and headers with
hostile fields, only ever raise CodecError. (Random message sequences into a live edge:
tests/component/test_fuzz.py.)"""

from __future__ import annotations

import struct

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coinfer.codec import CODECS, CodecError, decode, frame_token_count
from tests.support.frames import FRAMES, D


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_codec_error(data):
    try:
        y = decode(data, hidden_size=D, max_decoded_bytes=1 << 20)
    except CodecError:
        return
    assert torch.isfinite(y).all() and y.shape[-1] == D


@settings(max_examples=600, deadline=None, derandomize=True)
@given(
    st.sampled_from(sorted(CODECS)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.integers(0, 10_000),
    st.binary(max_size=16),
)
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


_DIM = st.one_of(
    st.integers(-2, 70),
    st.sampled_from([D, 2**26, 2**31, 2**32, 2**40, 2**63 - 1, 2**64 - 1]),
    st.booleans(),
    st.floats(allow_nan=True),
    st.none(),
)
_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                                st.text(max_size=8), st.binary(max_size=64)),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                  max_size=4),
                      max_leaves=8)  # fmt: skip


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    st.sampled_from(sorted(CODECS) + ["int3"]),
    st.one_of(st.lists(_DIM, max_size=5), _VALUE),
    st.one_of(st.binary(max_size=300), _VALUE),
    st.one_of(_VALUE, st.integers(-1, 10**12)),
    st.sampled_from(sorted(FRAMES)),
)
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


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.dictionaries(st.text(max_size=8), _VALUE, max_size=8), st.sampled_from(sorted(FRAMES)))
def test_map_headers_are_an_unsupported_version(header, body_of):
    """A map header (frame version 1, or anything shaped like it) is refused whatever it holds."""
    (n,) = struct.unpack_from("<I", FRAMES[body_of])
    h = msgpack.packb(header, use_bin_type=True)
    frame = struct.pack("<I", len(h)) + h + FRAMES[body_of][4 + n :]
    for fn in (decode, frame_token_count):
        with pytest.raises(CodecError, match="unsupported frame version|msgpack|exceeds"):
            fn(frame, hidden_size=D, max_decoded_bytes=1 << 20)
