"""Tensor frames: round-trip error bounds per codec, sizes, and a corpus of bad frames."""

import random
import struct

import msgpack
import numpy as np
import pytest
import torch
import zstandard

from coinfer.codec import CODECS, CodecError, decode, encode, peek_header

D = 576


def hidden(t=16, seed=0, outliers=True):
    x = torch.randn(t, D, generator=torch.Generator().manual_seed(seed)) * 2
    if outliers:  # like real middle layers: a few channels carry huge activations
        x[:, [7, 300]] = torch.tensor([2.5e4, -1.2e4])
    return x


def rebuild(header, body: bytes) -> bytes:
    h = msgpack.packb(header, use_bin_type=True)
    return struct.pack("<I", len(h)) + h + body


def split_v2(frame: bytes) -> tuple[list, bytes]:
    """(the header array [2, codec, shape, scales, aux], body): the bad-frame corpus edits it."""
    (n,) = struct.unpack_from("<I", frame)
    return msgpack.unpackb(frame[4 : 4 + n]), frame[4 + n :]


def group_bound(x: torch.Tensor, group: int, qmax: int) -> torch.Tensor:
    """Per-element bound: half a quantization step of the element's group (+ f16 scale rounding)."""
    flat = torch.nn.functional.pad(x.flatten(), (0, -x.numel() % group)).view(-1, group)
    step = flat.abs().amax(1, keepdim=True) / qmax
    return (step * 0.5 * (1 + 2e-3) + 1e-6).expand_as(flat).flatten()[: x.numel()].view_as(x)


def test_f32_is_bit_exact():
    x = hidden()
    assert torch.equal(decode(encode(x, "f32"), hidden_size=D), x)


def test_f16_relative_error():
    x = hidden()
    y = decode(encode(x, "f16"), hidden_size=D)
    assert ((y - x).abs() <= x.abs() * 2**-11 + 1e-7).all()


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_group_quantization_error_bound(name):
    c, x = CODECS[name], hidden()
    y = decode(encode(x, name), hidden_size=D)
    assert ((y - x).abs() <= group_bound(x, c.group, c.qmax)).all()
    # outliers stay in their own groups: the rest of the row keeps its precision
    assert (y[:, 64:128] - x[:, 64:128]).abs().max() < 8 / c.qmax


@pytest.mark.parametrize("name", ["uq10", "uq20", "uq40"])
def test_uniform_step_error_bound_and_exact_outliers(name):
    c, x = CODECS[name], hidden()
    y = decode(encode(x, name), hidden_size=D)
    rms = torch.from_numpy(np.sqrt(np.median(x.numpy() ** 2, axis=1, keepdims=True)))  # numpy's median, as encode
    step = rms * (1 + 2e-3) * c.step  # f16 rounding of the stored RMS
    assert ((y - x).abs() <= step / 2 + 1e-6).all()
    # the massive channels go apart, whole steps: their error is no larger than anyone's
    assert (y[:, [7, 300]] - x[:, [7, 300]]).abs().max() <= step.max() / 2 + 1e-3
    assert peek_header(encode(x, name)).aux == 2 * x.shape[0]


def test_uniform_step_trades_bytes_for_error():
    x = hidden(t=64)
    sizes = [len(encode(x, n)) for n in ("uq10", "uq20", "uq40")]
    errors = [(decode(encode(x, n), hidden_size=D) - x).pow(2).mean().item() for n in ("uq10", "uq20", "uq40")]
    assert sizes[0] > sizes[1] > sizes[2] and errors[0] < errors[1] < errors[2]
    assert sizes[1] < len(encode(x, "int8"))  # same outliers: cheaper than int8 per group


@pytest.mark.parametrize("shape", [(1, D), (3, 1, D), (5, 100), (7,)])
def test_odd_shapes_round_trip(shape):
    x = torch.randn(shape)
    for name in CODECS:
        assert decode(encode(x, name)).shape == shape


def test_zeros_and_tiny_values_survive():
    x = torch.zeros(2, D)
    x[1, :64] = 1e-9
    for name in CODECS:
        y = decode(encode(x, name), hidden_size=D)
        assert (y - x).abs().max() <= 1e-4


def test_bytes_per_token_shrink_with_the_codec(capsys):
    x = hidden(t=64, outliers=False)
    per_token = {name: len(encode(x, name)) / 64 for name in CODECS}
    with capsys.disabled():
        print("\nbytes/token on gaussian hidden states (d=576, f32 raw = 2304):",
              ", ".join(f"{k} {v:.0f}" for k, v in per_token.items()))  # fmt: skip
    assert per_token["f32"] <= D * 4 * 1.01
    assert per_token["f16"] <= D * 2 * 1.01
    assert per_token["int8"] <= D * 1.1 and per_token["int4"] <= D * 0.6
    assert peek_header(encode(x, "int8")).codec == "int8"


def test_encode_rejects_bad_tensors():
    for bad, msg in [
        (torch.tensor([1.0, float("nan")]), "NaN"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
        (torch.ones(2, 3, dtype=torch.int64), "floating-point"),
        (torch.ones(0, D), "zero dimension"),
        (torch.full((2, D), 1e5), "f16"),
    ]:
        with pytest.raises(CodecError, match=msg):
            encode(bad, "f16" if msg == "f16" else "f32")
    with pytest.raises(CodecError, match="unknown codec"):
        encode(torch.ones(1, D), "int3")


# ---------------------------------------------------------------- bad frames


def good(name="int8"):
    return encode(hidden(t=4), name)


def bad_frames() -> dict[str, tuple[bytes, str]]:
    frame = good()
    h, body = split_v2(frame)
    f32h, f32body = split_v2(good("f32"))
    fh, fbody = split_v2(good("f16"))
    nan = np.zeros(4 * D, dtype=np.float32)
    nan[5] = np.nan
    inf_scales = np.full(len(h[3]) // 2, np.inf, dtype=np.float16).tobytes()
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (4 * D * 4))
    return {
        "empty": (b"", "truncated"),
        "short length": (b"\x01\x00", "truncated"),
        "truncated header": (frame[:10], "truncated"),
        "truncated body": (frame[:-5], "corrupt|expected|zstd"),
        "huge header length": (struct.pack("<I", 1 << 30) + b"x", "exceeds"),
        "header not msgpack": (struct.pack("<I", 3) + b"\xc1\xc1\xc1", "msgpack"),
        "header not an array": (rebuild("int8", body), "unsupported frame version"),
        "too few fields": (rebuild(h[:4], body), "unsupported frame version"),
        "too many fields": (rebuild([*h, None], body), "unsupported frame version"),
        "wrong version": (rebuild([3, *h[1:]], body), "unsupported frame version"),
        "bool version": (rebuild([True, *h[1:]], body), "unsupported frame version"),
        "version-1 frame": (_v1_frame(), "unsupported frame version"),
        "map claiming version 2": (rebuild({"v": 2, "codec": "f16"}, body), "unsupported frame version"),
        "unknown codec": (rebuild([2, "int3", *h[2:]], body), "unknown codec"),
        "codec not a string": (rebuild([2, [1], *h[2:]], body), "unknown codec"),
        "shape mismatch": (rebuild([2, h[1], [4, 512], *h[3:]], body), "hidden size"),
        "shape negative": (rebuild([2, h[1], [-4, D], *h[3:]], body), "positive"),
        "shape not ints": (rebuild([2, h[1], [4.0, D], *h[3:]], body), "positive"),
        "shape bools": (rebuild([2, h[1], [True, D], *h[3:]], body), "positive"),
        "shape too big": (rebuild([2, h[1], [1 << 20, D], *h[3:]], body), "cap"),
        "shape rank 0": (rebuild([2, h[1], [], *h[3:]], body), "shape"),
        "scales short": (rebuild([*h[:3], h[3][:-2], h[4]], body), "scales"),
        "scales inf": (rebuild([*h[:3], inf_scales, h[4]], body), "finite"),
        "scales missing": (rebuild([*h[:3], None, h[4]], body), "scales"),
        "scale dtype": (rebuild([*h[:4], "f8"], body), "scale dtype"),
        "scales on f32": (rebuild([*f32h[:3], b"\0\0", None], f32body), "no scales"),
        "aux on f32": (rebuild([*f32h[:4], 3], f32body), "no aux"),
        "aux on f16": (rebuild([*fh[:4], "f16"], fbody), "no aux"),
        "body longer": (frame + b"\0\0\0", "trailing"),
        "body cut": (rebuild(h, body[:-3]), "corrupt|expected|zstd"),
        "body not zstd": (rebuild(h, b"\x00" * len(body)), "zstd"),
        "zstd bomb over the cap": (rebuild(f32h, bomb), "expected"),
        "no content size": (rebuild(f32h, no_size), "content size"),
        "trailing zstd frame": (rebuild(f32h, f32body * 2), "trailing"),
        "nan in f32 body": (_f32_frame(nan), "NaN"),
        **_bad_uq_frames(),
    }


def _v1_frame() -> bytes:
    """A well-formed frame of version 1 (a map header naming every field): no longer read."""
    body = zstandard.ZstdCompressor().compress(np.zeros(4 * D, dtype=np.float32).tobytes())
    return rebuild({"v": 1, "codec": "f32", "shape": [4, D], "dtype": "f32", "scales": None, "body_len": len(body),
                    "extras": {}}, body)  # fmt: skip


def _uq_frame(header: list, raw: bytes) -> bytes:
    return rebuild(header, zstandard.ZstdCompressor().compress(raw))


def _bad_uq_frames() -> dict[str, tuple[bytes, str]]:
    frame = good("uq20")  # hidden(t=4): 8 escaped values
    h, body = split_v2(frame)
    raw = zstandard.ZstdDecompressor().decompress(body)
    numel, n = 4 * D, h[4]
    q, idx, vals = bytearray(raw[:numel]), raw[numel : numel + 4 * n], raw[numel + 4 * n :]
    unmarked = bytearray(q)
    unmarked[7] = 3
    backwards = idx[4:8] + idx[:4] + idx[8:]
    outside = struct.pack("<I", numel + 5) + idx[4:]
    small = struct.pack("<i", 5) + vals[4:]
    return {
        "uq escapes not int": (rebuild([*h[:4], "8"], body), "escapes"),
        "uq escapes negative": (rebuild([*h[:4], -1], body), "escapes"),
        "uq escapes too many": (rebuild([*h[:4], numel + 1], body), "escapes"),
        "uq escapes miscounted": (rebuild([*h[:4], n - 1], body), "expected"),
        "uq scales per row": (rebuild([*h[:3], h[3][:-2], h[4]], body), "one per row"),
        "uq marker missing": (_uq_frame(h, bytes(unmarked) + idx + vals), "do not match"),
        "uq indices unordered": (_uq_frame(h, bytes(q) + backwards + vals), "increasing"),
        "uq index outside": (_uq_frame(h, bytes(q) + outside + vals), "inside"),
        "uq escaped value small": (_uq_frame(h, bytes(q) + idx + small), "do not match"),
    }


def _f32_frame(values: np.ndarray) -> bytes:
    return rebuild([2, "f32", [4, D], None, None], zstandard.ZstdCompressor().compress(values.tobytes()))


@pytest.mark.parametrize("case", list(bad_frames()))
def test_bad_frame_raises_codec_error(case):
    frame, message = bad_frames()[case]
    with pytest.raises(CodecError, match=message):
        decode(frame, hidden_size=D, max_decoded_bytes=16 << 20)


def test_not_bytes_is_rejected():
    with pytest.raises(CodecError, match="bytes"):
        decode("frame")  # type: ignore[arg-type]


def test_random_corruption_only_ever_raises_codec_error():
    rng = random.Random(5)
    frames = [good(n) for n in CODECS]
    for _ in range(3000):
        f = bytearray(rng.choice(frames))
        for _ in range(rng.randint(1, 4)):
            f[rng.randrange(len(f))] = rng.randrange(256)
        if rng.random() < 0.3:
            f = f[: rng.randrange(len(f))]
        try:
            y = decode(bytes(f), hidden_size=D)
        except CodecError:
            continue
        assert torch.isfinite(y).all() and y.shape[-1] == D
