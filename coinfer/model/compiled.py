"""Optional `torch.compile` of the one-token decode step (the device's `compile` setting).

Why: with int4 weights the matmuls are a minority of a decode step on a small CPU; the rest is
eager PyTorch running ~60 small ops per layer (norms, RoPE, residuals, dtype casts) and, once
compiled, the fixed cost of entering a compiled graph (guards, wrappers), paid once per call.
So the blocks are compiled a few at a time: `decode_layers` over GROUP consecutive blocks is one
graph, in which Inductor also fuses across the blocks' seams, and the blocks left over after the
last whole group (a split that is no multiple of GROUP) run one per call through the graph of a
single block. Groups pay the entry cost a few times a token instead of once per block; one graph
over all layers would pay it once but needs a graph per split and minutes of compiling. The
speed-ups are measured by benchmarks/compiled_decode.py (benchmarks/README.md).

Two graphs serve all layers and all splits: `Block.decode_token` takes tensors and an int, not
the cache object or a layer index, and modules passed as arguments do not pin a graph to its
layers. Compiled with automatic dynamic shapes: each graph specialises on the first length, the
second length and the first grown cache make those sizes symbolic, and the token that fills the
cache gets its own graph (4 compiles per graph, all done by `compile_decode`'s warm-up before the
first request). `dynamic=True` from the start compiled once but ran no faster than eager. Not
bit-exact with eager.

Needs a C++ compiler (Inductor's CPU backend); when compiling fails the blocks stay eager.
"""

from __future__ import annotations

import logging
import time

import torch

from coinfer.model.llama import Block, ModelSlice, decode_layers, rope_cos_sin

log = logging.getLogger("coinfer.compile")

GROUP = 5  # blocks per compiled graph (see above)


class GroupedDecode:
    """decode_layers(blocks, ...) run as compiled graphs of `group` blocks, then single blocks."""

    def __init__(self, step, group: int) -> None:
        self.step, self.group = step, group

    def spans(self, n: int) -> list[tuple[int, int]]:
        """[start, stop) of the blocks each graph call runs, for n blocks."""
        whole = n - n % self.group
        return [(i, i + self.group) for i in range(0, whole, self.group)] + [(i, i + 1) for i in range(whole, n)]

    def __call__(self, blocks: list[Block], x, cos, sin, keys, values, length: int) -> torch.Tensor:
        for i, j in self.spans(len(blocks)):
            x = self.step(blocks[i:j], x, cos, sin, keys[i:j], values[i:j], length)
        return x  # [B, 1, d]


def compile_decode(model: ModelSlice, group: int = GROUP) -> float | None:
    """Compile the decode step of `model`'s blocks (and of its views, which share them) and warm
    it up. Returns the seconds it took, or None when it failed (the model stays eager)."""
    if not model.layers:
        return 0.0
    t0 = time.perf_counter()
    # graphs are cached per function, across models: 8 per model, past torch's default of 8 once a
    # process (a benchmark, the tests) compiles a few models; past the limit torch goes eager silently
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    step = GroupedDecode(torch.compile(decode_layers, dynamic=None), group)
    try:
        for n in {min(group, len(model.layers)), 1}:  # the graphs a split of this slice can use
            _warm_up(list(model.layers[:n]), step.step, model)
    except Exception as e:  # no compiler, an unsupported op: serve eagerly rather than not at all
        log.warning("torch.compile of the decode step failed, decoding eagerly: %s", str(e).splitlines()[0][:300])
        return None
    for block in model.layers:
        block.compiled_decode = step
    return time.perf_counter() - t0


def _warm_up(blocks: list[Block], step, model: ModelSlice) -> None:
    """Run the compiled step at the sizes that trigger its compiles: a first length, a second one,
    a grown cache; under inference_mode, as the servers run it."""
    cfg, dtype, chunk = model.cfg, model.dtype, model.new_cache().chunk  # the caches it will decode with
    with torch.inference_mode():  # tensors made outside it would be guarded as another kind
        x = torch.zeros(1, 1, cfg.hidden_size, dtype=dtype)
        # the last: the token that fills the cache, a size relation the graph specialises on
        for capacity, length in ((chunk, 0), (chunk, 1), (2 * chunk, chunk + 1), (2 * chunk, 2 * chunk - 1)):
            shape = (1, cfg.num_kv_heads, capacity, cfg.head_dim)
            keys = [torch.zeros(shape, dtype=dtype) for _ in blocks]
            values = [torch.zeros(shape, dtype=dtype) for _ in blocks]
            cos, sin = rope_cos_sin(model.inv_freq, torch.tensor([length]), dtype)
            step(blocks, x, cos, sin, keys, values, length)
