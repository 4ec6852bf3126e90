"""Optional `torch.compile` of every block's one-token decode step (the device's `compile` setting).

Why: with int4 weights the matmuls are a minority of a decode step on a small CPU; the rest is
eager PyTorch running ~60 small ops per layer (norms, RoPE, residuals, dtype casts). Inductor
fuses those into a few C++ kernels and calls the int4 / int8 kernels as they are. Measured on
SmolLM2, 2 cores (benchmarks/compiled_decode.py, eager and compiled alternating): int4 1.12x,
int8 1.07x, fp32 1.03x tokens/s. Not bit-exact with eager.

One graph serves all layers and all splits: `Block.decode_token` takes tensors and an int,
not the cache object or a layer index, and modules passed as arguments do not pin the graph
to one layer. Compiled with automatic dynamic shapes: the first call specialises, the second
length and the first grown cache make those two sizes symbolic, and the token that fills the
cache gets its own graph (4 compiles in all, done by `compile_decode`'s warm-up before the
first request). `dynamic=True` from the start compiled once but ran no faster than eager. The whole-model alternative (one graph per split, static
cache) ran 12.8 vs 17.7 ms a token but compiled for 27 s and again whenever the cache grew.

Needs a C++ compiler (Inductor's CPU backend); when compiling fails the blocks stay eager.
"""

from __future__ import annotations

import logging
import time

import torch

from coinfer.model.llama import Block, ModelSlice, rope_cos_sin

log = logging.getLogger("coinfer.compile")


def compile_decode(model: ModelSlice) -> float | None:
    """Compile the decode step of every block of `model` (and of its views, which share them) and
    warm it up. Returns the seconds it took, or None when it failed (the model stays eager)."""
    if not model.layers:
        return 0.0
    t0 = time.perf_counter()
    # graphs are cached per function, across models: 4 per model, past torch's default of 8 once a
    # process (a benchmark, the tests) compiles a few models; past the limit torch goes eager silently
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    step = torch.compile(Block.decode_token, dynamic=None)
    try:
        _warm_up(model.layers[0], step, model)
    except Exception as e:  # no compiler, an unsupported op: serve eagerly rather than not at all
        log.warning("torch.compile of the decode step failed, decoding eagerly: %s", str(e).splitlines()[0][:300])
        return None
    for block in model.layers:
        block.compiled_decode = step
    return time.perf_counter() - t0


def _warm_up(block: Block, step, model: ModelSlice) -> None:
    """Run the compiled step at the sizes that trigger its compiles: a first length, a second one,
    a grown cache; under inference_mode, as the servers run it."""
    cfg, dtype, chunk = model.cfg, model.dtype, model.new_cache().chunk  # the caches it will decode with
    with torch.inference_mode():  # tensors made outside it would be guarded as another kind
        x = torch.zeros(1, 1, cfg.hidden_size, dtype=dtype)
        # the last: the token that fills the cache, a size relation the graph specialises on
        for capacity, length in ((chunk, 0), (chunk, 1), (2 * chunk, chunk + 1), (2 * chunk, 2 * chunk - 1)):
            keys = torch.zeros(1, cfg.num_kv_heads, capacity, cfg.head_dim, dtype=dtype)
            values = torch.zeros_like(keys)
            cos, sin = rope_cos_sin(model.inv_freq, torch.tensor([length]), dtype)
            step(block, x, cos, sin, keys, values, length)
