"""Prefix hashes: names for "the KV cache of this token prefix", the same on device and edge.

A chain over the token ids: h_0 = H(fingerprint, split, codec, device weights), h_t =
H(h_{t-1}, id_t). Every BLOCK-th state is a block hash; a cache holding t positions is
known by the block hashes at 16, 32, ... <= t. The seed binds the hash to everything the
cached values depend on, so equal hashes mean an interchangeable cache. The edge never
needs the token ids to use a hash (at k > 0 it never sees them). At Open the device offers
a few prefixes it can go on from (`offer_lengths`); with its Prefill it sends the hashes of
the blocks that Prefill completes and the chain state at its end, from which the edge
extends the chain over the tokens it generates itself. A turn so sends ~18 bytes per new
16 tokens of names, and a handful of hashes to ask what the edge holds.
"""

from __future__ import annotations

import hashlib

from coinfer import wire

BLOCK = 16  # tokens per block: reuse is granular to 16 positions (at most 15 resent)
DIGEST = 16  # bytes per hash


def _h(*parts: bytes) -> bytes:
    return hashlib.blake2b(b"".join(parts), digest_size=DIGEST).digest()


def seed(fingerprint: str, split: int, codec: str, device_weights: str) -> bytes:
    # at k = 0 the edge computes everything from token ids: codec and device weights do not matter
    codec, device_weights = (wire.TOKEN_IDS, "-") if split == 0 else (codec, device_weights)
    return _h(f"coinfer-prefix-v1|{fingerprint}|{split}|{codec}|{device_weights}".encode())


class PrefixChain:
    """Running hash over a token sequence; `blocks[i]` names the prefix of (i + 1) * BLOCK tokens."""

    def __init__(self, state: bytes, length: int = 0, blocks: list[bytes] | None = None) -> None:
        self.state, self.length = state, length
        self.blocks: list[bytes] = list(blocks or [])

    @classmethod
    def over(cls, seed_hash: bytes, ids: list[int]) -> PrefixChain:
        chain = cls(seed_hash)
        chain.extend(ids)
        return chain

    def extend(self, ids: list[int]) -> None:
        for t in ids:
            self.state = _h(self.state, int(t).to_bytes(4, "little"))
            self.length += 1
            if self.length % BLOCK == 0:
                self.blocks.append(self.state)

    def blocks_within(self, length: int) -> list[bytes]:
        """Block hashes of the prefixes no longer than `length` tokens."""
        return self.blocks[: max(0, length) // BLOCK]


def offer_lengths(reusable: int, near: int = 2) -> list[int]:
    """Prefix lengths to offer, longest first: the longest reusable block boundary and the few
    below it (the edge may hold a little less), then halving (an older, shorter turn)."""
    top = reusable // BLOCK * BLOCK
    lengths = [top - BLOCK * i for i in range(near) if top - BLOCK * i > 0]
    n = top // 2 // BLOCK * BLOCK
    while n >= BLOCK:
        if n < lengths[-1]:
            lengths.append(n)
        n = n // 2 // BLOCK * BLOCK
    return lengths


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):  # the lists may differ in length
        if x != y:
            break
        n += 1
    return n
