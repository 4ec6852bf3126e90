"""Weight precision of a loaded model slice: fp32 (exact), bf16, int8 or int4 weight-only.

int8: every Linear keeps int8 weights [out, in] with one scale per output channel and runs
PyTorch's weight-only kernel `torch._weight_int8pack_mm` (what gpt-fast / torchao use on CPU)
on bf16 activations; the residual stream, norms, attention and the KV cache stay fp32.
Measured on SmolLM2 (benchmarks/decode_speed.py): see the README for speed and agreement.
Why not dynamic int8 (activations quantized too, fbgemm): it was faster per matmul but fell
to 94.5% greedy agreement even with SmoothQuant-style scaling folded into the weights; a
few channels carry activations above 20,000.

int4: the layers' Linears keep 4-bit weights per group of 32 inputs with a scale and a zero
per group (asymmetric min-max, the layout of GGUF's Q4_1) and run PyTorch's
`torch._weight_int4pack_mm_for_cpu` on bf16 activations. SmolLM2's bundled GGUF stores exactly
these layers as Q4_1, so for it int4 reproduces the source grid up to the kernel's bf16 scales
and zeros (0.2% weight error; fp32 is the dequantized Q4_1).

Embedding and lm_head (int8 and int4 alike): int8 per group of 32 with a scale per group (GGUF
Q8_0's layout, exact for SmolLM2's Q8_0 embedding). The lookup dequantizes only the rows it
reads; the lm_head runs the same int8 values through the int4 kernel as two 4-bit planes
(q = 16 * high + low: one call with twice the outputs, then a sum). Measured on SmolLM2 with
int4 layers: lm_head int8 per row 96.4% greedy agreement (KL 0.0018), per group 98.8% (KL
0.0006) at the same decode speed; 4 bits there cost ~11 points. A tied embedding and lm_head
are then two tensors (28 MiB more for SmolLM2, only in a slice that holds both).
"""

from __future__ import annotations

import torch
from torch import nn

from coinfer.model.llama import Linear, ModelSlice

PRECISIONS = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 32  # inputs per scale/zero: Q4_1's block
INT8_GROUP = 32  # values per scale of the embedding / lm_head: Q8_0's block


class Int8Linear(nn.Module):
    """Weight-only int8 linear: y = x @ (q * scale).T, computed by the int8 weight-pack kernel."""

    q: torch.Tensor  # buffers (register_buffer), declared for the type checker
    scale: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("q", q)  # [out, in] int8
        self.register_buffer("scale", scale.to(torch.bfloat16))  # [out]
        self.bias = bias
        self.d_out = q.shape[0]

    @classmethod
    def from_linear(cls, lin: Linear) -> Int8Linear:
        w = lin.weight.t()  # our Linear stores [in, out]
        q, scale = quantize_groups_int8(w, group=w.shape[1])  # one group per output channel
        return cls(q, scale[:, 0], lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), self.q, self.scale)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.d_out)  # [..., in] -> [..., out]
        return y if self.bias is None else y + self.bias


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> [N, out] in x's dtype (N = all leading dims): PyTorch's int4 kernel, which
    runs fast on bf16 activations only (fp32 input took 18x, fp16 28x longer here)."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    return torch._weight_int4pack_mm_for_cpu(x2, packed, group, scales_and_zeros).to(x.dtype)


def quantize_groups_int8(w: torch.Tensor, group: int = INT8_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, cols] -> (q int8 [rows, cols] in -127..127, fp32 scale [rows, cols/group]), w ~= q * scale."""
    rows, cols = w.shape
    group = group if cols % group == 0 else cols  # a width that is no multiple: one scale per row
    g = w.float().reshape(rows, cols // group, group)
    scale = (g.abs().amax(-1) / 127.0).clamp(min=1e-10)  # [rows, G]
    q = torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(rows, cols).contiguous(), scale  # the int8 kernel takes contiguous weights only


class Int8Embedding(nn.Module):
    """Token embedding stored int8 per group of 32; a lookup dequantizes only the rows it reads."""

    q: torch.Tensor  # buffers (register_buffer), declared for the type checker
    scale: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q)  # [V, d] int8
        self.register_buffer("scale", scale)  # [V, d/32] fp32
        self.d, self.group = q.shape[1], q.shape[1] // scale.shape[1]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.q[ids].view(*ids.shape, -1, self.group).float()  # [B, T] -> [B, T, G, 32]
        return (q * self.scale[ids].unsqueeze(-1)).view(*ids.shape, self.d)  # [B, T, d]


class GroupInt8Linear(nn.Module):
    """Weight-only linear with int8 weights per group of 32 inputs (no bias: an lm_head).

    PyTorch's int8 kernel takes one scale per output only; its int4 kernel takes one per group.
    So q = 16 * high + low (high -8..7, low 0..15) becomes two 4-bit planes stacked as 2 x out
    outputs: plane 1 is (high + 8 - 8) * 16 s, plane 2 (low - 8) * s + 8 s, and y sums the halves.
    """

    packed: torch.Tensor  # buffers (register_buffer), declared for the type checker
    scales_and_zeros: torch.Tensor

    def __init__(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        d_out, d_in = q.shape
        q = q.to(torch.int32)
        high = torch.div(q, 16, rounding_mode="floor")  # -8..7
        planes = torch.cat([high + 8, q - 16 * high])  # [2 out, in], 0..15 each
        s = scale.to(torch.bfloat16).float().t()  # [G, out]; 16 * s stays exact in bf16
        sz = torch.cat([torch.stack([16 * s, torch.zeros_like(s)], -1), torch.stack([s, 8 * s], -1)], dim=1)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(planes, 1))  # [2 out, in/2]
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16).contiguous())  # [G, 2 out, 2]
        self.d_out, self.group = d_out, d_in // scale.shape[1]

    @staticmethod
    def fits(d_in: int, d_out: int) -> bool:
        return hasattr(torch, "_weight_int4pack_mm_for_cpu") and d_in % INT8_GROUP == 0 and d_out % 8 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_matmul(x, self.packed, self.group, self.scales_and_zeros)  # [N, 2 out]
        y = y[:, : self.d_out] + y[:, self.d_out :]  # the two planes: [N, 2 out] -> [N, out]
        return y.reshape(*x.shape[:-1], self.d_out)


def quantize_groups_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int32 [out, in] in 0..15, scales_and_zeros [in/group, out, 2]) with
    w ~= (q - 8) * scale + zero per group of `group` inputs; scale and zero are bf16 values,
    since the kernel reads them in bf16: rounding them after fitting would shift every weight.
    """
    d_out, d_in = w.shape
    g = w.float().reshape(d_out, d_in // group, group)  # [out, G, group]
    lo, hi = g.amin(-1), g.amax(-1)  # [out, G]
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15)
    # least-squares zero for the rounded scale: the error of a bf16 scale is spread around 0
    zero = (g - (q - 8) * scale[..., None]).mean(-1).to(torch.bfloat16).float()
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15)
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()  # [G, out, 2]
    return q.reshape(d_out, d_in).to(torch.int32), sz


class Int4Linear(nn.Module):
    """Weight-only int4 linear, groups of 32 inputs: y = x @ ((q - 8) * scale + zero).T."""

    packed: torch.Tensor  # buffers (register_buffer), declared for the type checker
    scales_and_zeros: torch.Tensor

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        q, sz = quantize_groups_int4(w)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))  # [out, in/2] uint8
        self.register_buffer("scales_and_zeros", sz)
        self.bias = bias
        self.d_out = w.shape[0]

    @staticmethod
    def fits(lin: Linear) -> bool:
        """The kernel needs whole groups of inputs and outputs in multiples of 16."""
        d_in, d_out = lin.weight.shape
        return d_in % INT4_GROUP == 0 and d_out % 16 == 0

    @classmethod
    def from_linear(cls, lin: Linear) -> Int4Linear:
        return cls(lin.weight.t(), lin.bias)  # our Linear stores [in, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_matmul(x, self.packed, INT4_GROUP, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.d_out)  # [..., in] -> [..., out]
        return y if self.bias is None else y + self.bias


def _embedding_and_lm_head(model: ModelSlice) -> None:
    if model.embed_tokens is not None:
        model.embed_tokens = Int8Embedding(*quantize_groups_int8(model.embed_tokens.weight))
    head = model.lm_head
    if head is not None:
        if not isinstance(head, Linear):
            raise TypeError(f"lm_head is already quantized ({type(head).__name__}): quantize float weights once")
        d_in, d_out = head.weight.shape
        if GroupInt8Linear.fits(d_in, d_out) and head.bias is None:
            model.lm_head = GroupInt8Linear(*quantize_groups_int8(head.weight.t()))
        else:
            model.lm_head = Int8Linear.from_linear(head)


def _quantize(model: ModelSlice, layer_linear) -> None:
    _embedding_and_lm_head(model)
    for block in model.layers:
        for parent, name in (
            (block.attn, "wqkv"),
            (block.attn, "wo"),
            (block.mlp, "w_gate"),
            (block.mlp, "w_up"),
            (block.mlp, "w_down"),
        ):
            setattr(parent, name, layer_linear(getattr(parent, name)))


def apply_precision(model: ModelSlice, precision: str) -> ModelSlice:
    """Convert a freshly loaded fp32 slice in place; the fp32 weights it replaces are freed."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown weight precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        model.to(torch.bfloat16)
    elif precision == "int8":
        if not hasattr(torch, "_weight_int8pack_mm"):
            raise RuntimeError(f"int8 weights need torch._weight_int8pack_mm (torch {torch.__version__} lacks it)")
        _quantize(model, Int8Linear.from_linear)
    elif precision == "int4":
        if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            raise RuntimeError(
                f"int4 weights need torch._weight_int4pack_mm_for_cpu (torch {torch.__version__} lacks it)"
            )
        # a Linear whose shape the kernel cannot take (a toy model's) stays int8
        _quantize(
            model, lambda lin: Int4Linear.from_linear(lin) if Int4Linear.fits(lin) else Int8Linear.from_linear(lin)
        )
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
