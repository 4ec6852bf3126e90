"""What the attacker sends that takes building: Opens padded to just under the edge's message limit,
and poison frames (NaN, and finite values near the f32 maximum)."""

from __future__ import annotations

from coinfer.v1 import edge_pb2 as pb


def maximal_opens(fp: str, limit: int, vocab: int) -> dict[str, bytes]:
    """Serialized DeviceMessages with one Open each, padded to just under `limit` bytes."""
    target = limit - 1024

    def fit(make) -> bytes:
        per_item = make(20000).ByteSize() / 20000
        n = int(target / per_item)
        for _ in range(20):
            blob = make(n).SerializeToString()
            if len(blob) <= target:
                return blob
            n -= int((len(blob) - target) / per_item) + 1
        return blob

    def hashes(n: int) -> pb.DeviceMessage:
        return pb.DeviceMessage(
            open=pb.Open(
                session_id="flood-hashes",
                fingerprint=fp,
                split=0,
                max_new_tokens=8,
                prefix_hashes=[i.to_bytes(32, "little") for i in range(n)],
                prefix_lengths=[16 * (1 + i % 4096) for i in range(n)],
            )
        )

    def stops(n: int) -> pb.DeviceMessage:
        return pb.DeviceMessage(
            open=pb.Open(
                session_id="flood-stops",
                fingerprint=fp,
                split=0,
                max_new_tokens=8,
                stop_ids=[(i * 7919) % vocab for i in range(n)],
            )
        )

    def sid(n: int) -> pb.DeviceMessage:
        return pb.DeviceMessage(open=pb.Open(session_id="s" * n, fingerprint=fp, split=0, max_new_tokens=8))

    return {"prefix_hashes": fit(hashes), "stop_ids": fit(stops), "session_id": fit(sid)}


def poison_frames(hidden: int) -> dict[str, bytes]:
    """A finite prefill frame (8 tokens), a Step frame of NaN (the codec's encoder refuses NaN, so the
    body is written by hand, as a hostile device would) and one of finite values near the f32 maximum."""
    import numpy as np
    import torch
    import zstandard

    from coinfer import codec

    torch.manual_seed(0)
    prefill = codec.encode(torch.randn(8, hidden), "f32")
    ok = codec.encode(torch.zeros(1, hidden), "f32")
    hlen = int.from_bytes(ok[:4], "little")
    body = zstandard.ZstdCompressor(write_content_size=True).compress(np.full(hidden, np.nan, np.float32).tobytes())
    nan_frame = ok[: 4 + hlen] + body
    huge = codec.encode(torch.full((1, hidden), 3.0e38), "f32")
    return {"prefill_frame": prefill, "nan_frame": nan_frame, "huge_frame": huge}
