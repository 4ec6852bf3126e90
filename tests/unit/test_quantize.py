"""Weight precision per slice: fp32 stays exact, bf16, int8 and int4 load, generate and stay close.
(A quantized edge and device serving a request: tests/component/test_quantize.py.)"""

import pytest
import torch

from coinfer.model import load_slice
from coinfer.model.generation import generate, model_step
from coinfer.model.quantize import (
    GroupInt8Linear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    apply_precision,
    quantize_groups_int4,
    quantize_groups_int8,
    weight_bytes,
)

PROMPT = [5, 9, 17, 33, 8, 61, 20, 7, 44, 12]


def logits(model, ids=PROMPT):
    with torch.inference_mode():
        return model(torch.tensor([ids]), model.new_cache()).float()


@pytest.mark.parametrize("variant", ["llama", "qwen2", "llama3-rope"])
@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_each_precision_loads_generates_and_stays_close(tiny_dirs, variant, precision):
    d = tiny_dirs[variant]
    ref, q = load_slice(d), load_slice(d, precision=precision)
    assert q.precision == precision
    out = [t for t, _ in generate(model_step(q), PROMPT, 12)]
    assert len(out) == 12 and all(0 <= t < 96 for t in out)
    a, b = logits(ref), logits(q)
    rel = (a - b).abs().max() / a.abs().max()
    # random weights have no Q4_1 grid to land on: int4 is a plain 4-bit rounding there
    assert rel < (0.25 if precision == "int4" else 0.05), f"{precision} logits drift {rel:.3f} of the logit range"
    assert weight_bytes(q) < (0.6 if precision == "bf16" else 0.4) * weight_bytes(ref)


def test_fp32_is_untouched(tiny_dir):
    assert torch.equal(logits(load_slice(tiny_dir)), logits(load_slice(tiny_dir, precision="fp32")))


def test_int8_modules(tiny_dir):
    m = load_slice(tiny_dir, precision="int8")  # the tiny llama ties embedding and lm_head
    assert isinstance(m.embed_tokens, Int8Embedding) and isinstance(m.lm_head, GroupInt8Linear)
    assert all(isinstance(b.mlp.w_down, Int8Linear) and b.mlp.w_down.q.dtype == torch.int8 for b in m.layers)
    assert m.new_cache().dtype == torch.float32  # int8 weights keep fp32 activations and KV cache
    assert load_slice(tiny_dir, precision="bf16").new_cache().dtype == torch.bfloat16


def q8_grid(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Values on a Q8_0 grid (per 32: scale * q, q in -127..127) with bf16-exact scales."""
    g = torch.Generator().manual_seed(seed)
    scale = (torch.rand(rows, cols // 32, 1, generator=g) * 1e-3 + 1e-4).bfloat16().float()
    q = torch.randint(-127, 128, (rows, cols // 32, 32), generator=g).float()
    q[..., 0] = 127  # every group reaches the top, so amax / 127 is the scale
    return (q * scale).reshape(rows, cols)


def test_group_int8_embedding_and_lm_head_reproduce_a_q8_0_grid():
    w = q8_grid(64, 96)  # [V, d]
    q, scale = quantize_groups_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64, 3)
    emb = Int8Embedding(q, scale)
    ids = torch.tensor([[3, 0, 63], [7, 7, 1]])
    assert torch.equal(emb(ids), w[ids])  # lookups are exact
    lm = GroupInt8Linear(q, scale)  # two 4-bit planes through the int4 kernel
    x = torch.randn(2, 3, 96, generator=torch.Generator().manual_seed(4))
    ref = x @ w.t()
    assert lm(x).shape == (2, 3, 64) and ((lm(x) - ref).norm() / ref.norm()) < 0.01  # bf16 activations only
    hi_only = GroupInt8Linear(q - q.remainder(16).to(torch.int8), scale)  # low plane zero: high plane alone
    assert ((hi_only(x) - x @ ((q - q.remainder(16)) * scale.repeat_interleave(32, 1)).t()).norm() / ref.norm()) < 0.01
    odd_q, odd_scale = quantize_groups_int8(torch.randn(5, 40))  # width no multiple of 32: one scale per row
    assert odd_scale.shape == (5, 1) and odd_q.shape == (5, 40)


def test_int4_layers_and_int8_embedding_and_lm_head(tiny_dir):
    """int4 replaces the layers' Linears the kernel can take; embedding and lm_head are int8 per group."""
    m = load_slice(tiny_dir, precision="int4")
    assert isinstance(m.embed_tokens, Int8Embedding) and isinstance(m.lm_head, GroupInt8Linear)
    for b in m.layers:
        for lin in (b.attn.wqkv, b.attn.wo, b.mlp.w_gate, b.mlp.w_up, b.mlp.w_down):
            assert isinstance(lin, Int4Linear) and lin.packed.dtype == torch.uint8
    assert m.new_cache().dtype == torch.float32


def q4_grid(out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Weights already on a Q4_1 grid (per 32 inputs: min + step * q, q in 0..15, every level used),
    with step and min exactly representable in bf16, as SmolLM2's bundled GGUF stores its layers."""
    g = torch.Generator().manual_seed(seed)
    step = (torch.rand(out, d_in // 32, 1, generator=g) * 0.01 + 0.001).bfloat16().float()
    low = (-8 * step + torch.randn(out, d_in // 32, 1, generator=g) * 0.002).bfloat16().float()
    levels = [torch.randperm(32, generator=g) % 16 for _ in range(out * d_in // 32)]  # each of 0..15 twice
    q = torch.stack(levels).reshape(out, d_in // 32, 32)
    return (low + step * q).reshape(out, d_in)


def test_int4_reproduces_a_q4_1_grid_and_bounds_the_error_elsewhere():
    w = q4_grid(48, 96)
    q, sz = quantize_groups_int4(w)
    scale, zero = sz[..., 0].float().t().repeat_interleave(32, 1), sz[..., 1].float().t().repeat_interleave(32, 1)
    assert q.min() >= 0 and q.max() <= 15
    assert torch.allclose((q - 8) * scale + zero, w, rtol=0, atol=1e-6)  # the source grid, exactly
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    q, sz = quantize_groups_int4(w)
    scale, zero = sz[..., 0].float().t().repeat_interleave(32, 1), sz[..., 1].float().t().repeat_interleave(32, 1)
    assert ((q - 8) * scale + zero - w).abs().max() <= 0.51 * scale.max()  # half a step (+ bf16 rounding)


def test_int4_kernel_matches_the_dequantized_weights():
    w = q4_grid(64, 128, seed=2)
    lin = Int4Linear(w, bias=None)
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(3))
    y = lin(x)
    assert y.shape == (3, 5, 64) and y.dtype == torch.float32
    ref = x @ w.t()
    assert ((y - ref).norm() / ref.norm()) < 0.01  # bf16 activations: ~0.3%


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_split_views_and_mixed_precision_sides(tiny_dir, precision):
    """A quantized device head feeding an fp32 edge tail (and the reverse) runs through f32 hidden states."""
    head = load_slice(tiny_dir, 0, 3, precision=precision)
    tail = load_slice(tiny_dir, 3, 6)
    whole = load_slice(tiny_dir, precision=precision)
    with torch.inference_mode():
        hidden = head(torch.tensor([PROMPT])).float()
        split_logits = tail(hidden)
        view = whole.narrow(0, 3)
        assert torch.equal(view(torch.tensor([PROMPT])).float(), hidden)
    assert split_logits.shape == (1, len(PROMPT), 96)


def test_unknown_precision_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="fp32, bf16, int8, int4"):
        apply_precision(load_slice(tiny_dir), "int3")
