"""Weight precision of a loaded model slice: fp32 (exact), bf16, or int8 weight-only.

int8: every Linear keeps int8 weights [out, in] with one scale per output channel and runs
PyTorch's weight-only kernel `torch._weight_int8pack_mm` (what gpt-fast / torchao use on CPU)
on bf16 activations; the residual stream, norms, attention and the KV cache stay fp32.
The embedding is int8 per row; when embedding and lm_head are tied, both use one int8
tensor (per-row scales of the embedding are per-output-channel scales of the lm_head).
Measured on SmolLM2 (benchmarks/decode_speed.py): see the README for speed and agreement.
Why not dynamic int8 (activations quantized too, fbgemm): it was faster per matmul but fell
to 94.5% greedy agreement even with SmoothQuant-style scaling folded into the weights; a
few channels carry activations above 20,000.
"""

from __future__ import annotations

import torch
from torch import nn

from coinfer.model.llama import Linear, ModelSlice

PRECISIONS = ("fp32", "bf16", "int8")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, cols] float -> (int8 [rows, cols], fp32 scale per row), symmetric, max |q| = 127."""
    scale = (w.abs().amax(dim=1).float() / 127.0).clamp(min=1e-10)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    return q, scale


class Int8Linear(nn.Module):
    """Weight-only int8 linear: y = x @ (q * scale).T, computed by the int8 weight-pack kernel."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("q", q)  # [out, in] int8
        self.register_buffer("scale", scale.to(torch.bfloat16))  # [out]
        self.bias = bias
        self.d_out = q.shape[0]

    @classmethod
    def from_linear(cls, lin: Linear) -> "Int8Linear":
        q, scale = quantize_rows(lin.weight.t())  # our Linear stores [in, out]
        return cls(q, scale, lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.q, self.scale)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.d_out)  # [..., in] -> [..., out]
        return y if self.bias is None else y + self.bias


class Int8Embedding(nn.Module):
    """Token embedding stored int8 per row; a lookup dequantizes only the rows it reads."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q)  # [V, d] int8
        self.register_buffer("row_scale", scale)  # [V] fp32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].float() * self.row_scale[ids].unsqueeze(-1)  # [B, T] -> [B, T, d]


def _int8(model: ModelSlice) -> None:
    shared = None
    if model.embed_tokens is not None:
        q, scale = quantize_rows(model.embed_tokens.weight)
        model.embed_tokens = Int8Embedding(q, scale)
        if model.cfg.tie_word_embeddings and model.lm_head is not None:
            shared = Int8Linear(q, scale, None)
    for block in model.layers:
        for parent, name in ((block.attn, "wqkv"), (block.attn, "wo"),
                             (block.mlp, "w_gate"), (block.mlp, "w_up"), (block.mlp, "w_down")):
            setattr(parent, name, Int8Linear.from_linear(getattr(parent, name)))
    if model.lm_head is not None:
        model.lm_head = shared or Int8Linear.from_linear(model.lm_head)


def apply_precision(model: ModelSlice, precision: str) -> ModelSlice:
    """Convert a freshly loaded fp32 slice in place; the fp32 weights it replaces are freed."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown weight precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        model.to(torch.bfloat16)
    elif precision == "int8":
        if not hasattr(torch, "_weight_int8pack_mm"):
            raise RuntimeError(f"int8 weights need torch._weight_int8pack_mm (torch {torch.__version__} lacks it)")
        _int8(model)
    model.precision = precision
    return model


def weight_bytes(model: ModelSlice) -> int:
    """Bytes of parameters and buffers, counting a tensor shared by two modules once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
