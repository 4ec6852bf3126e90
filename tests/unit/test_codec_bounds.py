"""Bounded work per frame: shapes whose product wraps in int64, uq frames whose escape count
claims a body past the cap, non-finite values, and frame_token_count (the header-only
check the edge runs before decoding) all end in CodecError, with no large allocation."""

from __future__ import annotations

import struct
import tracemalloc

import msgpack
import numpy as np
import pytest
import torch
import zstandard

from coinfer.codec import (
    DEFAULT_MAX_DECODED_BYTES,
    CodecError,
    NonFiniteState,
    decode,
    encode,
    frame_token_count,
)

D = 64
EMPTY = zstandard.ZstdCompressor(write_content_size=True).compress(b"")  # content size 0: what a wrapped
#                                                                          product of 0 elements expects


def rebuild(header, body: bytes) -> bytes:
    h = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<I", len(h)) + h + body


def split_v2(frame: bytes) -> tuple[list, bytes]:
    (n,) = struct.unpack_from("<I", frame)
    return msgpack.unpackb(frame[4 : 4 + n]), frame[4 + n :]


def rle_zstd(size: int) -> bytes:
    """A valid zstd frame of `size` zero bytes in a few bytes per 128 KiB (RLE blocks): a tiny
    frame that really decompresses to what it claims."""
    block = 128 << 10
    out = struct.pack("<IB", 0xFD2FB528, 0b11000000) + bytes([17 << 3]) + struct.pack("<Q", size)  # 8-byte size,
    while size:  #                                                              window 128 MiB (not single-segment)
        n, size = min(block, size), size - min(block, size)
        out += struct.pack("<I", (size == 0) | (1 << 1) | (n << 3))[:3] + b"\0"
    return out


def peak_bytes(fn) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    try:
        fn()
        err = None
    except BaseException as e:  # noqa: BLE001 - the test inspects the type
        err = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, err


# ---------------------------------------------------------------- shape product


@pytest.mark.parametrize("shape, cap", [
    ([2**26] * 4, DEFAULT_MAX_DECODED_BYTES),  # every dim under the cap; int64 product 2**104 wraps to 0
    ([2**40, 2**40], 1 << 62),
    ([2**31] * 4, 1 << 62),
    ([2**32, 2**32, 2**32], 1 << 62),  # wraps to 0 as well
    ([2**63 - 1, 3], 1 << 63),  # wraps to a negative product
    ([2**64 - 1], 1 << 62),  # the largest msgpack integer
    ([-4, D], DEFAULT_MAX_DECODED_BYTES),
    ([True, D], DEFAULT_MAX_DECODED_BYTES),
    ([False, D], DEFAULT_MAX_DECODED_BYTES),
    ([0, D], DEFAULT_MAX_DECODED_BYTES),
    ([4.0, D], DEFAULT_MAX_DECODED_BYTES),
])  # fmt: skip
def test_huge_or_bad_shapes_are_codec_errors(shape, cap):
    frame = rebuild([2, "f32", shape, None, None], EMPTY)
    with pytest.raises(CodecError, match="cap|positive"):
        decode(frame, max_decoded_bytes=cap)
    with pytest.raises(CodecError, match="cap|positive"):
        frame_token_count(frame, max_decoded_bytes=cap)


# ---------------------------------------------------------------- uq body within the cap


def _uq_claim(shape: list[int], escapes: int) -> bytes:
    rows = int(np.prod(shape[:-1]))
    scales = np.ones(rows, dtype=np.float16).tobytes()
    return rebuild([2, "uq20", shape, scales, escapes], rle_zstd(int(np.prod(shape)) + 8 * escapes))


def test_uq_escapes_claiming_a_body_past_the_cap_are_refused_before_decompression():
    # the tensor is exactly the cap (16 Mi values, 64 MiB); one escape per value makes the body 144 MiB
    frame = _uq_claim([16, 1 << 20], 1 << 24)
    assert len(frame) < 8 << 10
    peak, err = peak_bytes(lambda: decode(frame))
    assert isinstance(err, CodecError) and "over the cap" in str(err), err
    assert peak < 8 << 20
    with pytest.raises(CodecError, match="over the cap"):
        frame_token_count(frame)


def test_a_tiny_uq_frame_claiming_a_gib_allocates_little():
    frame = _uq_claim([128, 1 << 20], 1 << 27)  # 512 MiB tensor, 1.1 GiB body, both over the default cap
    peak, err = peak_bytes(lambda: decode(frame, max_decoded_bytes=512 << 20))
    assert isinstance(err, CodecError) and "over the cap" in str(err), err
    assert peak < 8 << 20


def test_uq_body_cap_boundary():
    """40 % of the values far out: 26 of 64 escape, 64 + 8 * 26 = 272 body bytes for a 256-byte
    tensor. The body's bytes count against the cap as the tensor's do."""
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    x[0, ::5] = 1e4
    x[0, 1::5] = -1e4
    frame = encode(x, "uq20")
    assert split_v2(frame)[0][4] == 26
    with pytest.raises(CodecError, match="body would decompress to 272 bytes"):
        decode(frame, max_decoded_bytes=256)
    y = decode(frame, max_decoded_bytes=272)
    assert (y - x).abs().max() < 1.0


def test_uq_escape_count_over_numel_is_refused():
    frame = _uq_claim([1, D], D + 1)
    with pytest.raises(CodecError, match="escapes"):
        decode(frame)


# ---------------------------------------------------------------- non-finite values and odd aux fields


def _f32(values: np.ndarray) -> bytes:
    return rebuild(
        [2, "f32", list(values.shape), None, None],
        zstandard.ZstdCompressor().compress(values.astype(np.float32).tobytes()),
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_frames_are_refused(bad):
    a = np.zeros((2, D), dtype=np.float32)
    a[1, 5] = bad
    with pytest.raises(NonFiniteState, match="NaN or Inf"):
        decode(_f32(a), hidden_size=D)
    assert frame_token_count(_f32(a), hidden_size=D) == 2  # the header is fine: the values are decode's job


def test_int8_scales_that_overflow_to_inf_are_refused():
    h, body = split_v2(encode(torch.full((1, D), 100.0), "int8"))  # every value quantizes to 127
    frame = rebuild([*h[:3], np.full(1, 3e38, dtype=np.float32).tobytes(), "f32"], body)
    with pytest.raises(NonFiniteState):
        decode(frame, hidden_size=D)


@pytest.mark.parametrize("aux", [[1], {"a": 1}, b"f16", 1.5, True])
@pytest.mark.parametrize("codec", ["int8", "uq20"])
def test_odd_aux_fields_are_codec_errors(codec, aux):
    h, body = split_v2(encode(torch.randn(2, D), codec))
    with pytest.raises(CodecError):
        decode(rebuild([*h[:4], aux], body), hidden_size=D)


def test_nonfinite_state_is_a_codec_error_and_a_value_error():
    assert issubclass(NonFiniteState, CodecError) and issubclass(NonFiniteState, ValueError)


# ---------------------------------------------------------------- frame_token_count


@pytest.mark.parametrize("codec", ["f32", "f16", "int8", "int4", "uq10"])
@pytest.mark.parametrize("t", [1, 7])
def test_frame_token_count_reads_t_from_the_header(codec, t):
    assert frame_token_count(encode(torch.randn(t, D), codec), hidden_size=D) == t


def test_version_1_headers_are_refused():
    body = zstandard.ZstdCompressor().compress(np.zeros((3, D), dtype=np.float32).tobytes())
    frame = rebuild({"v": 1, "codec": "f32", "shape": [3, D], "dtype": "f32", "scales": None,
                     "body_len": len(body), "extras": {}}, body)  # fmt: skip
    for fn in (decode, frame_token_count):
        with pytest.raises(CodecError, match="unsupported frame version"):
            fn(frame, hidden_size=D)


def test_frame_token_count_does_not_touch_the_body():
    frame = rebuild([2, "f32", [1 << 20, D], None, None], rle_zstd(4 * D << 20))  # a 256 MiB body
    peak, err = peak_bytes(lambda: frame_token_count(frame, hidden_size=D, max_decoded_bytes=256 << 20))
    assert err is None and peak < 1 << 20
    corrupt = rebuild([2, "f32", [2, D], None, None], b"not zstd at all")
    assert frame_token_count(corrupt, hidden_size=D) == 2  # decode is what checks the body
    with pytest.raises(CodecError):
        decode(corrupt, hidden_size=D)


@pytest.mark.parametrize("frame, message", [
    (b"", "truncated"),
    ("frame", "bytes"),
    (b"\x03\x00\x00\x00\xc1\xc1\xc1", "msgpack"),
    (rebuild([2, "f32", [D], None, None], EMPTY), r"\[T, d\]"),  # rank 1
    (rebuild([2, "f32", [1, 2, D], None, None], EMPTY), r"\[T, d\]"),  # rank 3
    (rebuild([2, "f32", [2, 32], None, None], EMPTY), "hidden size"),
    (rebuild([2, "f32", [1 << 20, D], None, None], EMPTY), "cap"),
    (rebuild([2, "f32", "2x64", None, None], EMPTY), "shape"),
    (rebuild([2, "int3", [2, D], None, None], EMPTY), "unknown codec"),
    (rebuild([2, "int8", [2, D], None, "f16"], EMPTY), "scales"),
    (rebuild([2, "uq20", [2, D], b"\0\0" * 2, 2 * D + 1], EMPTY), "escapes"),
    (rebuild({"v": 1, "codec": "f32", "shape": [2, D], "dtype": "f64"}, EMPTY), "unsupported frame version"),
    (rebuild({"v": 3}, EMPTY), "unsupported frame version"),
    (rebuild([3, "f32", [2, D], None, None], EMPTY), "unsupported frame version"),
])  # fmt: skip
def test_frame_token_count_refuses_malformed_headers(frame, message):
    with pytest.raises(CodecError, match=message):
        frame_token_count(frame, hidden_size=D)
