"""Per-session, per-slice key/value cache that grows in chunks."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer of one model slice for one session.

    Storage is preallocated in chunks of `chunk` positions so decoding one token
    writes in place instead of concatenating the whole history every step.
    Layout per layer: [batch, kv_heads, capacity, head_dim].
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        chunk: int = 256,
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.batch, self.dtype, self.chunk = batch, dtype, chunk
        self.length = 0  # positions already written and committed
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not just the used length)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def used_bytes(self) -> int:
        per_pos = 2 * self.num_layers * self.batch * self.num_kv_heads * self.head_dim
        return per_pos * self.length * self.dtype.itemsize

    def nbytes_at(self, length: int) -> int:
        """Bytes allocated once `length` positions are reserved (whole chunks; never shrinks)."""
        capacity = max(self.capacity, -(-length // self.chunk) * self.chunk)
        return 2 * self.num_layers * self.batch * self.num_kv_heads * self.head_dim * capacity * self.dtype.itemsize

    def clear(self) -> None:
        """Free all storage (an evicted session's cache)."""
        self.k, self.v, self.capacity, self.length = [], [], 0, 0

    def reserve(self, new_length: int) -> None:
        """Make room for `new_length` positions, growing by whole chunks."""
        if new_length <= self.capacity:
            return
        capacity = -(-new_length // self.chunk) * self.chunk
        shape = (self.batch, self.num_kv_heads, capacity, self.head_dim)
        grown_k, grown_v = [], []
        for i in range(self.num_layers):
            k, v = torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
            if self.capacity:
                k[:, :, : self.length] = self.k[i][:, :, : self.length]
                v[:, :, : self.length] = self.v[i][:, :, : self.length]
            grown_k.append(k)
            grown_v.append(v)
        self.k, self.v, self.capacity = grown_k, grown_v, capacity

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values [B, KV, T, D] after the committed length; return all of them."""
        return self.write(self.k[layer], self.v[layer], self.length, k, v)

    @staticmethod
    def write(keys: torch.Tensor, values: torch.Tensor, length: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, KV, T, D] into one layer's storage [B, KV, capacity, D] at `length`;
        return the views of positions [0, length + T). A static method so that a compiled decode
        step can take the layer's tensors and length instead of the cache object."""
        # narrow + copy_: fewer ops than slice assignment, which matters once per layer per token
        n, end = k.shape[2], length + k.shape[2]
        keys.narrow(2, length, n).copy_(k)
        values.narrow(2, length, n).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        """Commit `n` positions written by the last forward through all layers."""
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget positions from `length` on (rewind for replay or prefix reuse)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length
