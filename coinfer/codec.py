"""Tensor frames: how hidden states cross the link between head and tail.

A frame is `u32 header length | msgpack header | zstd body`. The header is the msgpack
array `[2, codec, shape, scales, aux]` (2: the frame version): `aux` is the escape count
of a `uq*` frame, the scale dtype of an `int8` / `int4` one, else nil; the dtype (f32),
the body length (the rest of the frame), a uq step and a group size are implied by the
codec, so a one-token step frame spends its bytes on values, not on names. The body is
the quantized tensor, zstd-compressed. Codecs: `f32` (bit-exact), `f16`, `int8`
(symmetric, per group of 64) and `int4` (symmetric, per group of 32, two values a byte),
and the `uq*` family: a uniform step per token, `step` x the token's robust RMS (root of
the median square, so the few massive-activation channels do not set it), every value
rounded to a whole number of steps, one byte each with the rare values past +-127
(those channels) sent apart exactly, and zstd's entropy coder packing the bytes to
about their entropy. Per-group absmax scaling spends its range on the outliers of a
group; a step set by the typical value does not (benchmarks/codec_frontier.py).

Frames come from the network, so `decode` trusts nothing: every inconsistency
raises `CodecError` (never another exception type) before any allocation larger than
the caller's cap. The cap bounds both the decoded tensor and the decompressed body
(a uq frame's body grows with the escape count its header claims), and the shape's
product is computed exactly, so huge dimensions cannot wrap around to a small size.
`frame_token_count` runs the same header checks without touching the body, so the edge
can refuse a step of the wrong length or a prompt over its context before decoding.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
import zstandard

FRAME_VERSION = 2  # the one version encode writes and decode reads
MAX_HEADER_BYTES = 1 << 16
DEFAULT_MAX_DECODED_BYTES = 64 << 20  # cap on the decoded tensor, whatever the frame claims
MAX_RANK = 4
ZSTD_LEVEL = 3
F16_MAX = 65504.0
F16_TINY = 2.0**-14  # smallest normal f16: floor for scales so they never flush to zero

_LEN = struct.Struct("<I")


class CodecError(ValueError):
    """A tensor frame that cannot be encoded or decoded; the message says what is wrong."""


class NonFiniteState(CodecError):
    """A session's hidden states or logits hold NaN or infinite values (or could not be sampled).

    Raised by `decode` for a frame of such values and by the edge's scheduler for one row of
    a decode batch: the session that sent them fails alone (INVALID_ARGUMENT, as any
    CodecError), while the rest of its batch is sampled as if it were not there."""


@dataclass(frozen=True)
class Codec:
    name: str
    bits: int  # bits per value in the body
    group: int = 0  # values per scale; 0 = not quantized
    lossless: bool = False
    step: float = 0.0  # uq codecs: quantization step as a fraction of each token's robust RMS

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1  # symmetric: int8 -> 127, int4 -> 7

    def padded(self, numel: int) -> int:
        return -(-numel // self.group) * self.group if self.group else numel

    def body_bytes(self, numel: int) -> int:
        return self.padded(numel) * self.bits // 8


CODECS: dict[str, Codec] = {
    "f32": Codec("f32", 32, lossless=True),
    "f16": Codec("f16", 16),
    "int8": Codec("int8", 8, group=64),
    "int4": Codec("int4", 4, group=32),
    "uq10": Codec("uq10", 8, step=0.10),
    "uq20": Codec("uq20", 8, step=0.20),
    "uq40": Codec("uq40", 8, step=0.40),
}
ESCAPE = -128  # uq body byte of a value sent apart (|q| > 127)
SCALE_DTYPES = {"f16": np.float16, "f32": np.float32}


def get_codec(name: str) -> Codec:
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r} (known: {', '.join(CODECS)})") from None


# ---------------------------------------------------------------- encode


def _quantize(x: np.ndarray, codec: Codec) -> tuple[bytes, bytes, str]:
    """x flat f32 -> (body, scales, scale dtype). Symmetric absmax per group."""
    padded = np.zeros(codec.padded(x.size), dtype=np.float32)
    padded[: x.size] = x
    groups = padded.reshape(-1, codec.group)  # [n_groups, group]
    scale = np.abs(groups).max(axis=1) / codec.qmax
    scale_dtype = "f16" if scale.max(initial=0.0) <= F16_MAX else "f32"  # f16 halves scale bytes
    stored = np.maximum(scale, F16_TINY).astype(SCALE_DTYPES[scale_dtype])
    q = np.clip(np.rint(groups / stored.astype(np.float32)[:, None]), -codec.qmax, codec.qmax).astype(np.int8)
    if codec.bits == 4:
        u = (q.reshape(-1) + 8).astype(np.uint8)  # -7..7 -> 1..15
        body = (u[0::2] | (u[1::2] << 4)).tobytes()
    else:
        body = q.tobytes()
    return body, stored.tobytes(), scale_dtype


def _uq_encode(a: np.ndarray, width: int, codec: Codec) -> tuple[bytes, bytes, int]:
    """a flat f32, rows of `width` -> (raw body, f16 robust RMS per row, escape count)."""
    rows = a.reshape(-1, width)
    rms = np.maximum(np.sqrt(np.median(rows * rows, axis=1)), F16_TINY)
    if rms.max() > F16_MAX:
        raise CodecError(f"typical values above {F16_MAX} do not fit the {codec.name} scale; use f32")
    stored = rms.astype(np.float16)
    step = stored.astype(np.float32)[:, None] * np.float32(codec.step)
    q = np.rint(rows / step).reshape(-1)
    far = np.flatnonzero(np.abs(q) > 127)
    if far.size and np.abs(q[far]).max() >= 2**31:
        raise CodecError(f"values too far above their token's RMS for {codec.name}; use f32")
    body = np.clip(q, -127, 127).astype(np.int8)
    body[far] = ESCAPE
    raw = body.tobytes() + far.astype(np.uint32).tobytes() + q[far].astype(np.int32).tobytes()
    return raw, stored.tobytes(), int(far.size)


def encode(x: torch.Tensor, codec: str = "f32", level: int = ZSTD_LEVEL) -> bytes:
    """Tensor (e.g. hidden states [T, d]) -> frame bytes."""
    c = get_codec(codec)
    if not torch.is_floating_point(x):
        raise CodecError(f"only floating-point tensors can be encoded, got {x.dtype}")
    if not 1 <= x.dim() <= MAX_RANK or x.numel() == 0:
        raise CodecError(f"tensor shape {tuple(x.shape)} must have rank 1..{MAX_RANK} and no zero dimension")
    a = x.detach().to("cpu", torch.float32).contiguous().numpy().reshape(-1)
    if not np.isfinite(a).all():
        raise CodecError("tensor holds NaN or Inf values")
    scales: bytes | None = None
    aux: int | str | None = None  # what the codec does not imply: escape count, scale dtype
    if c.name == "f32":
        raw = a.tobytes()
    elif c.name == "f16":
        if np.abs(a).max() > F16_MAX:
            raise CodecError(f"values above {F16_MAX} do not fit f16; use f32 or int8")
        raw = a.astype(np.float16).tobytes()
    elif c.step:
        raw, scales, aux = _uq_encode(a, x.shape[-1], c)
    else:
        raw, scales, aux = _quantize(a, c)
    body = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    packed = msgpack.packb([FRAME_VERSION, c.name, list(x.shape), scales, aux], use_bin_type=True)
    return _LEN.pack(len(packed)) + packed + body


# ---------------------------------------------------------------- decode


@dataclass(frozen=True)
class Header:
    """A frame's header as parsed, not yet validated (fields hold whatever msgpack decoded)."""

    codec: Any
    shape: Any
    scales: Any
    aux: Any  # uq: escape count; int8 / int4: scale dtype; others: None


def _parse_header(frame: bytes) -> tuple[Header, memoryview]:
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise CodecError(f"a frame must be bytes, got {type(frame).__name__}")
    view = memoryview(frame)
    if len(view) < _LEN.size:
        raise CodecError(f"frame of {len(view)} bytes is truncated: no header length")
    (hlen,) = _LEN.unpack_from(view)
    if hlen > MAX_HEADER_BYTES:
        raise CodecError(f"header length {hlen} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if _LEN.size + hlen > len(view):
        raise CodecError(f"frame of {len(view)} bytes is truncated: header says {hlen} header bytes")
    try:
        header = msgpack.unpackb(
            view[_LEN.size : _LEN.size + hlen], raw=False, strict_map_key=True,
            max_str_len=256, max_bin_len=MAX_HEADER_BYTES, max_array_len=MAX_RANK * 4, max_map_len=32, max_ext_len=0,
        )  # fmt: skip
    except Exception as e:  # msgpack raises many types on garbage
        raise CodecError(f"header is not valid msgpack: {e}") from None
    if isinstance(header, dict):
        raise CodecError(
            f"unsupported frame version: a map header (version {header.get('v')!r}); this side "
            f"reads version {FRAME_VERSION}, the array [{FRAME_VERSION}, codec, shape, scales, aux]"
        )
    if not isinstance(header, list) or len(header) != 5 or header[0] != FRAME_VERSION or not _is_int(header[0]):
        fields = f"{len(header)} fields starting {header[:1]!r}" if isinstance(header, list) else type(header).__name__
        raise CodecError(
            f"unsupported frame version: the header must be the array [{FRAME_VERSION}, codec, shape, "
            f"scales, aux], got {fields}"
        )
    return Header(*header[1:]), view[_LEN.size + hlen :]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_shape(shape, hidden_size: int | None, max_decoded_bytes: int) -> tuple[tuple[int, ...], int]:
    """(shape, element count). The product is taken over Python ints, which do not wrap: numpy's
    int64 product of e.g. [2**26] * 4 is 0, and a zero-sized claim would pass the cap."""
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_RANK:
        raise CodecError(f"shape must be a list of 1..{MAX_RANK} dimensions, got {shape!r}")
    if not all(_is_int(s) and 0 < s <= max_decoded_bytes for s in shape):
        raise CodecError(
            f"shape dimensions must be positive integers, each within the cap of {max_decoded_bytes}, got {shape!r}"
        )
    if hidden_size is not None and shape[-1] != hidden_size:
        raise CodecError(f"shape {shape} does not match the model's hidden size {hidden_size}")
    numel = math.prod(shape)
    if numel * 4 > max_decoded_bytes:
        raise CodecError(f"decoded tensor would be {numel * 4} bytes, over the cap of {max_decoded_bytes}")
    return tuple(shape), numel


def _check_scales(header: Header, c: Codec, numel: int, width: int) -> np.ndarray | None:
    scales, aux = header.scales, header.aux
    if c.step:
        if not _is_int(aux) or not 0 <= aux <= numel:
            raise CodecError(f"escapes must be an integer in 0..{numel}, got {aux!r}")
        if not isinstance(scales, bytes) or len(scales) != numel // width * 2:
            raise CodecError(f"scales must be {numel // width} f16 values, one per row")
        return _finite_scales(np.frombuffer(scales, dtype=np.float16))
    if not c.group:
        if aux is not None:
            raise CodecError(f"codec {c.name} carries no aux field, got {aux!r}")
        if scales:
            raise CodecError(f"codec {c.name} carries no scales")
        return None
    dt = SCALE_DTYPES.get(aux) if isinstance(aux, str) else None  # a list or map is unhashable
    if dt is None:
        raise CodecError(f"unknown scale dtype {aux!r} (known: {', '.join(SCALE_DTYPES)})")
    n_groups = c.padded(numel) // c.group
    if not isinstance(scales, bytes) or len(scales) != n_groups * np.dtype(dt).itemsize:
        raise CodecError(f"scales must be {n_groups} {aux} values")
    return _finite_scales(np.frombuffer(scales, dtype=dt))


def _finite_scales(stored: np.ndarray) -> np.ndarray:
    s = stored.astype(np.float32)
    if not np.isfinite(s).all() or (s < 0).any():
        raise CodecError("scales must be finite and non-negative")
    return s


def _decompress(body: memoryview, expected: int) -> bytes:
    try:
        # our encoder always writes the content size: checking it first bounds the allocation
        size = zstandard.frame_content_size(bytes(body[:18]))
    except zstandard.ZstdError as e:
        raise CodecError(f"body is not a zstd frame: {e}") from None
    if size != expected:
        raise CodecError(f"body decompresses to {size} bytes, expected {expected} (content size missing or wrong)")
    obj = zstandard.ZstdDecompressor().decompressobj()
    try:
        raw = obj.decompress(bytes(body))
    except zstandard.ZstdError as e:
        raise CodecError(f"body is corrupt: {e}") from None
    if len(raw) != expected or not obj.eof or obj.unused_data:
        raise CodecError(f"body decompresses to {len(raw)} bytes with trailing data; expected exactly {expected}")
    return raw


def _uq_body_bytes(escapes: int, numel: int) -> int:
    return numel + 8 * escapes  # int8 per value + (u32 index, i32 value) per escape


def _check_header(
    header: Header, hidden_size: int | None, max_decoded_bytes: int
) -> tuple[Codec, tuple[int, ...], int, np.ndarray | None, int]:
    """Every check that needs only the header: (codec, shape, numel, scales, decompressed body bytes).

    The body size is held to the cap as well as the tensor: a uq frame claiming one escape
    per value would otherwise decompress to 9 bytes per value, 2.25x the cap."""
    c = get_codec(header.codec)
    shape, numel = _check_shape(header.shape, hidden_size, max_decoded_bytes)
    scales = _check_scales(header, c, numel, shape[-1])
    expected = _uq_body_bytes(header.aux, numel) if c.step else c.body_bytes(numel)
    if expected > max_decoded_bytes:
        raise CodecError(f"body would decompress to {expected} bytes, over the cap of {max_decoded_bytes}")
    return c, shape, numel, scales, expected


def _uq_dequantize(raw: bytes, c: Codec, rms: np.ndarray | None, numel: int, width: int) -> np.ndarray:
    if rms is None:  # _check_scales returns them for every quantized codec
        raise CodecError(f"codec {c.name} needs scales")
    n = (len(raw) - numel) // 8
    q = np.frombuffer(raw, dtype=np.int8, count=numel).astype(np.float32)
    idx = np.frombuffer(raw, dtype=np.uint32, count=n, offset=numel).astype(np.int64)
    vals = np.frombuffer(raw, dtype=np.int32, count=n, offset=numel + 4 * n)
    if n and ((idx >= numel).any() or (np.diff(idx) <= 0).any()):
        raise CodecError("escape indices must be increasing and inside the tensor")
    if int((q == ESCAPE).sum()) != n or (n and ((q[idx] != ESCAPE).any() or (np.abs(vals) <= 127).any())):
        raise CodecError("escape markers and escaped values do not match")
    q[idx] = vals
    step = rms * np.float32(c.step)
    return (q.reshape(-1, width) * step[:, None]).reshape(-1)


def _dequantize(raw: bytes, c: Codec, scales: np.ndarray | None, numel: int) -> np.ndarray:
    if c.name == "f32":
        return np.frombuffer(raw, dtype=np.float32).copy()
    if c.name == "f16":
        return np.frombuffer(raw, dtype=np.float16).astype(np.float32)
    if c.bits == 4:
        u = np.frombuffer(raw, dtype=np.uint8)
        q = np.empty(u.size * 2, dtype=np.int8)
        q[0::2], q[1::2] = (u & 0x0F).astype(np.int8) - 8, (u >> 4).astype(np.int8) - 8
    else:
        q = np.frombuffer(raw, dtype=np.int8)
    if scales is None:  # _check_scales returns them for every quantized codec
        raise CodecError(f"codec {c.name} needs scales")
    x = q.reshape(-1, c.group).astype(np.float32) * scales[:, None]
    return x.reshape(-1)[:numel]


def decode(
    frame: bytes, *, hidden_size: int | None = None, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> torch.Tensor:
    """Frame bytes -> float32 tensor, after checking every field. Raises CodecError on any fault,
    NaN and infinite values included: one check over the decoded values costs little next to
    the decompression, and lets no non-finite state into a shared decode batch."""
    header, body = _parse_header(frame)
    c, shape, numel, scales, expected = _check_header(header, hidden_size, max_decoded_bytes)
    raw = _decompress(body, expected)
    with np.errstate(over="ignore", invalid="ignore"):  # huge scales overflow to inf: refused just below
        x = _uq_dequantize(raw, c, scales, numel, shape[-1]) if c.step else _dequantize(raw, c, scales, numel)
    if not np.isfinite(x).all():
        raise NonFiniteState("decoded tensor holds NaN or Inf values")
    return torch.from_numpy(x).reshape(shape)


def frame_token_count(
    frame: bytes, *, hidden_size: int | None = None, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> int:
    """T of a hidden-state frame [T, d], from its header alone; raises CodecError unless the frame
    is rank 2 and its header passes every check `decode` makes before touching the body.

    Why: the edge must refuse a step that is not one token, or a prompt over its context,
    before it spends the decompression (up to the cap) on it. The body can still be corrupt:
    `decode` checks that."""
    header, _ = _parse_header(frame)
    _, shape, _, _, _ = _check_header(header, hidden_size, max_decoded_bytes)
    if len(shape) != 2:
        raise CodecError(f"expected hidden states [T, d], got shape {list(shape)}")
    return shape[0]


def peek_header(frame: bytes) -> Header:
    """The frame's header, for logs and tests (not validated beyond parsing)."""
    return _parse_header(frame)[0]
