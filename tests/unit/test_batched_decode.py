"""Decode steps of many sessions in one forward give the same logits as each session alone."""

import pytest
import torch

from coinfer.model import load_slice

N = 6  # layers of the tiny model


def _sessions(model, splits, lengths, seed=0):
    """Per session: (split, cache after its prompt, the next decode input)."""
    g = torch.Generator().manual_seed(seed)
    whole = load_slice_cached["whole"]
    out = []
    with torch.inference_mode():
        for k, n in zip(splits, lengths, strict=True):
            ids = torch.randint(0, 96, (1, n + 1), generator=g)
            view = model.narrow(k, N)
            cache = view.new_cache(chunk=8)
            if k == 0:
                view(ids[:, :n], cache)
                nxt = ids[0, n:]  # token id [1]
            else:
                head = whole.narrow(0, k)
                h = head(ids)  # [1, n+1, d]: the device's hidden states
                view(h[:, :n], cache)
                nxt = h[0, n:]  # [1, d]
            out.append((k, cache, nxt))
    return out


load_slice_cached: dict = {}


@pytest.fixture(scope="module")
def tail(tiny_dir):
    load_slice_cached["whole"] = load_slice(tiny_dir)
    return load_slice(tiny_dir, 0, N, embed=True, head=True)


def _solo(tail, k, cache, x):
    view = tail.narrow(k, N)
    inp = x.view(1, 1) if k == 0 else x.view(1, 1, -1)
    with torch.inference_mode():
        return view(inp, cache)[0, -1]


@pytest.mark.parametrize("splits", [[0] * 8, [3] * 8, [0, 5, 2, 3, 0, 1, 4, 2]])
def test_batch_equals_each_session_alone(tail, splits):
    lengths = [3, 17, 8, 30, 1, 12, 25, 9]  # ragged: every session has its own past length
    batched = _sessions(tail, splits, lengths)
    alone = _sessions(tail, splits, lengths)
    with torch.inference_mode():
        logits = tail.decode_batch([x for _, _, x in batched], [k for k, _, _ in batched], [c for _, c, _ in batched])
    assert logits.shape == (8, tail.cfg.vocab_size)
    for b, (k, cache, x) in enumerate(alone):
        ref = _solo(tail, k, cache, x)
        torch.testing.assert_close(logits[b], ref, rtol=1e-5, atol=1e-5)
        assert int(logits[b].argmax()) == int(ref.argmax())
        assert batched[b][1].length == cache.length == lengths[b] + 1


def test_batched_greedy_runs_match_solo_runs_for_32_tokens(tail):
    splits, lengths = [0, 2, 4, 0, 3, 5, 1, 2], [4, 9, 15, 22, 6, 11, 3, 18]
    batched, alone = _sessions(tail, splits, lengths, seed=1), _sessions(tail, splits, lengths, seed=1)
    whole = load_slice_cached["whole"]
    head_caches = {}
    tokens_b, tokens_s = [[] for _ in splits], [[] for _ in splits]
    # device side is not modelled here: a session at k > 0 feeds the next token's hidden
    # state from the whole model's first k layers run on the token alone (its own head cache)
    with torch.inference_mode():
        for _ in range(32):
            logits = tail.decode_batch([x for _, _, x in batched], splits, [c for _, c, _ in batched])
            for b in range(len(splits)):
                tokens_b[b].append(int(logits[b].argmax()))
                k, cache, x = alone[b]
                tokens_s[b].append(int(_solo(tail, k, cache, x).argmax()))
            batched = [
                (k, c, _next_input(whole, k, t[-1], head_caches, ("b", b)))
                for b, ((k, c, _), t) in enumerate(zip(batched, tokens_b, strict=True))
            ]
            alone = [
                (k, c, _next_input(whole, k, t[-1], head_caches, ("s", b)))
                for b, ((k, c, _), t) in enumerate(zip(alone, tokens_s, strict=True))
            ]
    assert tokens_b == tokens_s


def _next_input(whole, k, token, head_caches, key):
    if k == 0:
        return torch.tensor([token])
    head = whole.narrow(0, k)
    cache = head_caches.setdefault(key, head.new_cache())
    return head(torch.tensor([[token]]), cache)[0, -1:]


def test_bad_rows_are_refused(tail):
    with pytest.raises(ValueError, match="embedding"):
        tail.decode_batch([torch.tensor([1])], [2], [tail.narrow(2, N).new_cache()])
    with pytest.raises(ValueError, match="lm_head"):
        tail.narrow(0, 3).decode_batch([torch.tensor([1])], [0], [tail.narrow(0, 3).new_cache()])
