"""The compiled decode path without compiling: grouped decode calls, and a model left eager when
torch.compile fails. (Real compiles, marked slow: tests/component/test_compiled_decode.py.)"""

import torch

from coinfer.model import load_slice
from coinfer.model.compiled import GroupedDecode, compile_decode
from coinfer.model.generation import generate, model_step

PROMPT = [5, 9, 17, 33, 8, 61, 20, 7, 44, 12]


def test_grouped_decode_runs_whole_groups_then_single_blocks():
    calls = []

    def step(blocks, x, cos, sin, keys, values, length):
        assert len(keys) == len(values) == len(blocks) and length == 7
        calls.append(blocks)
        return x + len(blocks)

    blocks = list(range(12))
    x = GroupedDecode(step, 5)(blocks, torch.zeros(1), None, None, blocks, blocks, 7)
    assert calls == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10], [11]] and x.item() == 12
    calls.clear()
    GroupedDecode(step, 5)(blocks[:4], torch.zeros(1), None, None, blocks[:4], blocks[:4], 7)
    assert calls == [[0], [1], [2], [3]]  # a split below one group: single blocks only


def test_failed_compile_leaves_the_model_eager(tiny_dir, monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    m = load_slice(tiny_dir)
    assert compile_decode(m) is None and not m.compiled
    ref = load_slice(tiny_dir)
    assert [t for t, _ in generate(model_step(m), PROMPT, 8)] == [t for t, _ in generate(model_step(ref), PROMPT, 8)]
