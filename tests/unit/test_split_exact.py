"""Cutting the model at any layer, with an f32 frame in between, changes nothing (bit for bit)."""

import pytest
import torch

from coinfer import codec
from coinfer.model import ModelConfig, load_slice
from coinfer.model.generation import generate, model_step
from coinfer.pipeline import LocalSplit

N = 6  # layers of the tiny model


def prompt(n=40, seed=3):
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k", range(N + 1))
def test_head_frame_tail_equals_whole_model_bitwise(tiny_dir, k):
    whole = load_slice(tiny_dir)
    head = load_slice(tiny_dir, 0, k, embed=True, head=False)
    tail = load_slice(tiny_dir, k, N, embed=False, head=True)
    ids, steps = prompt(), [5, 17, 42]
    wc, hc, tc = whole.new_cache(), head.new_cache(), tail.new_cache()
    with torch.inference_mode():
        for x in [ids] + [torch.tensor([[t]]) for t in steps]:  # prefill, then decode steps
            hidden = codec.decode(codec.encode(head(x, hc)[0], "f32"), hidden_size=64)[None]
            assert torch.equal(tail(hidden, tc), whole(x, wc))


@pytest.mark.parametrize("k", range(N + 1))
def test_split_greedy_continuation_equals_whole_model(tiny_dir, k):
    ids = prompt()[0].tolist()
    expected = [t for t, _ in generate(model_step(load_slice(tiny_dir)), ids, 32)]
    split = LocalSplit(tiny_dir, k, "f32")
    got = [t for t, _ in generate(split.step_fn(), ids, 32)]
    assert got == expected
    assert split.stats.tokens == len(ids) + 31  # the prompt, then one token per step after the first
    # f32 on the wire: about the raw hidden state (zstd gains little on float mantissas; a header per frame)
    assert 0.8 * 64 * 4 < split.stats.bytes_per_token < 64 * 4 + 40


def test_k0_edge_takes_token_ids_and_matches(tiny_dir):
    # split 0 on the wire means the edge runs everything from token ids
    whole, edge = load_slice(tiny_dir), load_slice(tiny_dir, 0, N, embed=True, head=True)
    ids = prompt()
    with torch.inference_mode():
        assert torch.equal(edge(ids), whole(ids))


def test_lossy_codecs_stay_close_at_middle_cut(tiny_dir):
    ids = prompt()[0].tolist()
    expected = [t for t, _ in generate(model_step(load_slice(tiny_dir)), ids, 16)]
    sizes = {}
    for name in ["f16", "int8"]:
        split = LocalSplit(tiny_dir, N // 2, name)
        got = [t for t, _ in generate(split.step_fn(), ids, 16)]
        agree = sum(a == b for a, b in zip(got, expected, strict=True)) / len(expected)
        assert agree >= 0.75, f"{name} agreement {agree}"
        sizes[name] = split.stats.bytes_per_token
    assert sizes["int8"] < sizes["f16"]


def test_bad_split_rejected(tiny_dir):
    with pytest.raises(ValueError, match="split must be in 0..6"):
        LocalSplit(tiny_dir, 7)
    with pytest.raises(codec.CodecError, match="unknown codec"):
        LocalSplit(tiny_dir, 3, "int3")
    with pytest.raises(ValueError, match="outside"):
        load_slice(tiny_dir, 4, 2)
    assert ModelConfig.from_dir(tiny_dir).num_layers == N
