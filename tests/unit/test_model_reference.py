"""Our model against transformers' own implementation on the same (tiny, random) weights."""

import pytest
import torch

from coinfer.model import load_slice

pytestmark = pytest.mark.parametrize("variant", ["llama", "qwen2", "llama3-rope"])


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_prefill_logits_match_transformers(tiny_dirs, variant):
    ours, ref = load_slice(tiny_dirs[variant]), hf_model(tiny_dirs[variant])
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 70), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-5, f"max abs logit diff {diff}"


def test_incremental_decode_matches_transformers(tiny_dirs, variant):
    from transformers import DynamicCache

    ours, ref = load_slice(tiny_dirs[variant]), hf_model(tiny_dirs[variant])
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 64), generator=g)
    steps = torch.randint(0, ours.cfg.vocab_size, (16,), generator=g)
    cache, past = ours.new_cache(chunk=16), DynamicCache()  # small chunk: the cache grows mid-run
    with torch.inference_mode():
        out = ref(ids, past_key_values=past, use_cache=True)
        diffs = [(ours(ids, cache) - out.logits).abs().max().item()]
        for t in steps:
            x = t.view(1, 1)
            out = ref(x, past_key_values=out.past_key_values, use_cache=True)
            diffs.append((ours(x, cache) - out.logits).abs().max().item())
    assert cache.length == 64 + 16
    assert max(diffs) <= 1e-5, f"max abs logit diff per step {diffs}"
