"""Llama-family transformer blocks and a model *slice* [start, stop) that can be cut anywhere.

Shapes: B batch, T new tokens, P past positions, d hidden, H query heads,
KV key/value heads, D head dim, F MLP width, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, overload

import torch
import torch.nn.functional as F
from torch import nn

from coinfer.model.config import ModelConfig
from coinfer.model.kv_cache import KVCache

if TYPE_CHECKING:
    from coinfer.model.compiled import GroupedDecode


class Linear(nn.Module):
    """y = x @ weight + bias, with weight stored [in, out] (the transpose of nn.Linear's).

    Decoding is a row vector times a matrix, which MKL runs faster over row-major [in, out]
    weights than over nn.Linear's [out, in].
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight  # [..., in] -> [..., out]
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [T, D] for the given absolute positions [T] (half-split layout, as in HF)."""
    freqs = positions[:, None].float() * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] rotated by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        # q, k and v projections fused into one matmul: fewer kernel launches per decode step
        self.wqkv = Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)
        self.wo = Linear(q, cfg.hidden_size)

    def qkv(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> q [B, H, T, D], k and v [B, KV, T, D], q and k rotated."""
        B, T, _ = x.shape
        H, KV = self.n_head, self.n_kv
        qkv = self.wqkv(x).view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)  # [B, H+2KV, T, D]
        qk = apply_rope(qkv[:, : H + KV], cos, sin)  # q and k rotated in one go
        return qk[:, :H], qk[:, H:], qkv[:, H + KV :]

    def decode_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query token against its cache: q [B, H, 1, D], k/v [B, KV, P, D] -> [B, 1, H*D].

        Each KV head's query group is folded into one "sequence": no GQA expansion of k and v;
        SDPA runs the whole batch in one fused call instead of matmul + softmax + matmul.
        """
        B, KV = q.shape[0], self.n_kv
        y = F.scaled_dot_product_attention(q.reshape(B, KV, self.n_head // KV, self.head_dim), k, v)
        return y.reshape(B, 1, -1)

    def forward(self, x, cos, sin, cache: KVCache | None, layer: int, mask: torch.Tensor | None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)  # [B, H|KV|KV, T, D]
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)  # [B, KV, P+T, D]
        if T == 1:
            return self.wo(self.decode_one(q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and past == 0, enable_gqa=True
        )  # [B, H, T, D]
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # gate and up stay two matmuls: on this 2-core CPU one fused [2F, d] matrix-vector
        # product timed slower in isolation (~285 us) than two [F, d] ones (~2 x 100 us);
        # in a whole decode step the difference was within run-to-run noise
        self.w_gate = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w_up = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.w_down = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # [B, T, F] -> [B, T, d]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        # the compiled decode of a run of blocks, when enabled (coinfer.model.compiled); shared by all blocks
        self.compiled_decode: GroupedDecode | None = None

    def forward(self, x, cos, sin, cache, layer, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.mlp_norm(x))

    def decode_token(self, x, cos, sin, keys: torch.Tensor, values: torch.Tensor, length: int) -> torch.Tensor:
        """One new token x [B, 1, d] at position `length`; keys / values [B, KV, capacity, D] are
        this layer's cache storage, written in place. Tensors and an int in, no cache object or
        layer index: one compiled graph serves every layer and every split."""
        q, k, v = self.attn.qkv(self.attn_norm(x), cos, sin)  # [B, H|KV|KV, 1, D]
        k, v = KVCache.write(keys, values, length, k, v)  # [B, KV, length + 1, D]
        x = x + self.attn.wo(self.attn.decode_one(q, k, v))
        return x + self.mlp(self.mlp_norm(x))

    def forward_rows(self, x, cos, sin, caches: list[KVCache], layers: list[int]):
        """One decode token for each of B sessions: x [B, 1, d], cos/sin [B, 1, 1, D].

        Row b reads and writes caches[b] at its layer index layers[b]. The matmuls run once
        for the whole batch (weights are read once: the point of batching on a memory-bound
        CPU); attention runs per row, since every session has its own length (ragged).
        """
        q, k, v = self.attn.qkv(self.attn_norm(x), cos, sin)  # [B, H|KV|KV, 1, D]
        ys = []
        for qb, kb, vb, cache, layer in zip(q.split(1), k.split(1), v.split(1), caches, layers, strict=True):
            kb, vb = cache.update(layer, kb, vb)  # [1, KV, P_b+1, D]
            ys.append(self.attn.decode_one(qb, kb, vb))
        x = x + self.attn.wo(torch.cat(ys))  # [B, 1, H*D] -> [B, 1, d]
        return x + self.mlp(self.mlp_norm(x))


def decode_layers(blocks: list[Block], x, cos, sin, keys: list[torch.Tensor], values: list[torch.Tensor], length: int):
    """One new token x [B, 1, d] at position `length` through consecutive blocks; keys[i] / values[i]
    are block i's cache storage. What coinfer.model.compiled compiles, a few blocks per graph."""
    for block, k, v in zip(blocks, keys, values, strict=True):
        x = block.decode_token(x, cos, sin, k, v, length)  # [B, 1, d]
    return x


def causal_mask(past: int, new: int) -> torch.Tensor | None:
    """Boolean mask [T, P+T] for T new queries after P cached positions (None when SDPA needs none)."""
    if new == 1 or past == 0:
        return None  # one query sees everything; no past -> SDPA's own is_causal
    q_pos = torch.arange(past, past + new)[:, None]
    return torch.arange(past + new)[None, :] <= q_pos


class Blocks(nn.ModuleList):
    """An nn.ModuleList of Blocks: the same container, typed so that its items are Blocks."""

    if TYPE_CHECKING:

        def __iter__(self) -> Iterator[Block]: ...

        @overload
        def __getitem__(self, idx: slice) -> Blocks: ...

        @overload
        def __getitem__(self, idx: int) -> Block: ...

        def __getitem__(self, idx: int | slice) -> Block | Blocks: ...


class ModelSlice(nn.Module):
    """Layers [start, stop) of a model, optionally with the token embedding in front
    and the final norm + lm_head behind. The whole model is ModelSlice(cfg, 0, N, True, True).

    forward(x): x is token ids [B, T] (with embedding) or hidden states [B, T, d];
    returns logits [B, T, V] (with head) or hidden states [B, T, d].
    """

    def __init__(self, cfg: ModelConfig, start: int, stop: int, embed: bool, head: bool) -> None:
        super().__init__()
        if not 0 <= start <= stop <= cfg.num_layers:
            raise ValueError(f"slice [{start}, {stop}) is outside 0..{cfg.num_layers}")
        self.cfg, self.start, self.stop = cfg, start, stop
        self.has_embed, self.has_head = embed, head
        # the weights come from the file (coinfer.model.weights): no random init, which on the meta
        # device would import torch's reference kernels (see inv_freq below)
        self.embed_tokens = (
            nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.hidden_size)) if embed else None
        )
        self.layers = Blocks(Block(cfg) for _ in range(start, stop))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if head else None
        # a Linear, or its int8 replacement (coinfer.model.quantize)
        self.lm_head: nn.Module | None = Linear(cfg.hidden_size, cfg.vocab_size) if head else None
        # a plain attribute, not a buffer: .to(bfloat16) on the model must not round the RoPE frequencies.
        # On the CPU even when the weights are built on the meta device: pow on meta tensors imports ~800
        # modules of torch's reference kernels, 67 MiB of RSS in every process that loads a slice
        with torch.device("cpu"):
            self.inv_freq = cfg.rope_inv_freq()
        self.precision = "fp32"  # weights: fp32, bf16, int8 or int4 (coinfer.model.quantize)

    @property
    def num_layers(self) -> int:
        return self.stop - self.start

    @property
    def compiled(self) -> bool:
        """Whether its blocks decode through torch.compile (coinfer.model.compiled)."""
        return any(b.compiled_decode is not None for b in self.layers)

    def narrow(self, start: int, stop: int) -> ModelSlice:
        """Layers [start, stop) of this slice as a new slice that shares its parameters.

        It keeps the embedding only when it starts where this slice starts, and
        norm + lm_head only when it stops where this one stops: one loaded edge
        tail [m, N) serves every split k >= m without a copy.
        """
        if not self.start <= start <= stop <= self.stop:
            raise ValueError(f"[{start}, {stop}) is not inside this slice [{self.start}, {self.stop})")
        with torch.device("meta"):
            view = ModelSlice(self.cfg, start, start, embed=False, head=False)
        view.stop = stop
        view.layers = Blocks(self.layers[start - self.start : stop - self.start])
        if start == self.start and self.has_embed:
            view.has_embed, view.embed_tokens = True, self.embed_tokens
        if stop == self.stop and self.has_head:
            view.has_head, view.norm, view.lm_head = True, self.norm, self.lm_head
        view.inv_freq, view.precision = self.inv_freq, self.precision
        return view

    @property
    def dtype(self) -> torch.dtype:
        """Activation and KV cache dtype: bf16 for bf16 weights, else fp32 (int8 keeps fp32 activations)."""
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def new_cache(self, batch: int = 1, chunk: int = 256) -> KVCache:
        dtype = self.dtype
        return KVCache(self.num_layers, self.cfg.num_kv_heads, self.cfg.head_dim, batch=batch, dtype=dtype, chunk=chunk)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        if self.embed_tokens is not None:
            x = self.embed_tokens(x)  # [B, T] -> [B, T, d]
        x = x.to(self.dtype)  # hidden states arrive as f32 frames whatever the weights are
        T = x.shape[1]
        past = cache.length if cache is not None else 0
        if self.layers:
            if cache is not None:
                cache.reserve(past + T)
            cos, sin = rope_cos_sin(self.inv_freq, torch.arange(past, past + T), x.dtype)  # [T, D]
            if cache is not None and T == 1:  # a decode step
                step: Callable[..., torch.Tensor] = self.layers[0].compiled_decode or decode_layers
                x = step(list(self.layers), x, cos, sin, cache.k, cache.v, past)  # [B, 1, d]
            else:
                mask = causal_mask(past, T)
                for i, block in enumerate(self.layers):
                    x = block(x, cos, sin, cache, i, mask)  # [B, T, d]
        if cache is not None:
            cache.advance(T)
        if self.lm_head is None or self.norm is None:  # both or neither
            return x
        if last_only:
            x = x[:, -1:]  # prefill needs only the next token's logits
        return self.lm_head(self.norm(x))  # [B, T, V]

    def decode_batch(self, inputs: list[torch.Tensor], starts: list[int], caches: list[KVCache]) -> torch.Tensor:
        """One decode step of B sessions through one forward; returns logits [B, V] in input order.

        Session b entered this slice's layers at absolute layer starts[b] (its split) with
        inputs[b]: a token id [1] when it starts at this slice's start and it has the embedding,
        else a hidden state [1, d]. caches[b] holds layers [starts[b], stop) (it came from
        narrow(starts[b], stop).new_cache()). Rows join the batch at their own layer, so
        sessions at different splits share every layer they have in common.
        """
        if self.lm_head is None or self.norm is None:  # both or neither
            raise ValueError("decode_batch needs the slice that ends with norm + lm_head")
        order = sorted(range(len(inputs)), key=lambda b: starts[b])
        rows = [self._row_input(inputs[b], starts[b]) for b in order]  # [1, d] each
        caches_o, starts_o = [caches[b] for b in order], [starts[b] for b in order]
        positions = torch.tensor([c.length for c in caches_o])  # [B]
        for c in caches_o:
            c.reserve(c.length + 1)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.dtype)  # [B, D]
        cos, sin = cos[:, None, None], sin[:, None, None]  # [B, 1, 1, D]: one position per row
        x, n = None, 0
        for i, block in enumerate(self.layers):
            layer = self.start + i
            while n < len(rows) and starts_o[n] == layer:  # sessions split here join the batch
                n += 1
                x = torch.stack(rows[:n]) if x is None else torch.cat([x, rows[n - 1][None]])  # [n, 1, d]
            if x is None:
                continue  # no session starts this early
            x = block.forward_rows(x, cos[:n], sin[:n], caches_o[:n], [layer - s for s in starts_o[:n]])
        if x is None or n < len(rows):  # sessions split after the last layer (head only)
            x = torch.stack(rows) if x is None else torch.cat([x, torch.stack(rows[n:])])
        for c in caches_o:
            c.advance(1)
        logits = self.lm_head(self.norm(x))[:, 0]  # [B, V]
        return logits[torch.tensor(order).argsort()]

    def _row_input(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """A session's decode input as a hidden state [1, d] at its entry layer."""
        if start < self.start or start > self.stop:
            raise ValueError(f"a session split at {start} cannot run in slice [{self.start}, {self.stop})")
        if x.dtype in (torch.int32, torch.int64):
            if start != self.start or self.embed_tokens is None:
                raise ValueError("token ids can only enter at the embedding")
            x = self.embed_tokens(x.view(1))  # [1] -> [1, d]
        return x.reshape(1, self.cfg.hidden_size).to(self.dtype)
