"""The real prepared SmolLM2-135M-Instruct: reference logits, exact splits, tokenizer, loading."""

import time

import pytest
import torch

from coinfer import codec
from coinfer.model import load_slice, read_fingerprint
from coinfer.model.generation import generate, model_step
from coinfer.model.prepare import file_sha256
from coinfer.model.tokenizer import IncrementalDecoder, Tokenizer
from coinfer.pipeline import LocalSplit

pytestmark = pytest.mark.integration

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Ünïcode ✓ 日本語\n\n  spaces\ttabs"}],
]  # fmt: skip
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his father "
    "had taught him, and lit the great lamp that warned the fishing boats away from the rocks below."
)


@pytest.fixture(scope="module")
def whole(real_model_dir):
    return load_slice(real_model_dir)


@pytest.fixture(scope="module")
def hf(real_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(real_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(real_model_dir):
    return Tokenizer(real_model_dir)


@pytest.fixture(scope="module")
def prompt(tok):
    ids = tok.encode(TEXT) + tok.encode_chat(CHATS[0])
    assert len(ids) >= 64
    return ids


def test_matches_transformers_prefill_and_16_decode_steps(whole, hf, prompt):
    from transformers import DynamicCache

    ids = torch.tensor([prompt])
    assert ids.shape[1] >= 64
    cache = whole.new_cache()
    with torch.inference_mode():
        ref = hf(ids, past_key_values=DynamicCache(), use_cache=True)
        diffs = [(whole(ids, cache) - ref.logits).abs().max().item()]
        token = ref.logits[0, -1].argmax().view(1, 1)
        for _ in range(16):
            ref = hf(token, past_key_values=ref.past_key_values, use_cache=True)
            diffs.append((whole(token, cache) - ref.logits).abs().max().item())
            token = ref.logits[0, -1].argmax().view(1, 1)
    assert max(diffs) <= 1e-3, f"max abs logit diff per step: {diffs}"


@pytest.mark.parametrize("k", [0, 1, 7, 15, 29, 30])
def test_split_is_exact(real_model_dir, whole, prompt, k):
    head = load_slice(real_model_dir, 0, k, embed=True, head=False)
    tail = load_slice(real_model_dir, k, 30, embed=False, head=True)
    hc, tc, wc = head.new_cache(), tail.new_cache(), whole.new_cache()
    with torch.inference_mode():
        x = torch.tensor([prompt])
        for _ in range(3):  # prefill logits, then two decode steps, bit-equal
            frame = codec.encode(head(x, hc)[0], "f32")
            logits = tail(codec.decode(frame, hidden_size=576)[None], tc)
            assert torch.equal(logits, whole(x, wc))
            x = logits[:, -1:].argmax(-1)
    expected = [t for t, _ in generate(model_step(whole), prompt, 32)]
    got = [t for t, _ in generate(LocalSplit(real_model_dir, k, "f32").step_fn(), prompt, 32)]
    assert got == expected


def test_chat_template_and_tokens_match_transformers(real_model_dir, tok):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(real_model_dir))
    for chat in CHATS:
        for gen in (True, False):
            assert tok.render_chat(chat, gen) == ref.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=gen
            )
            ids = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
            assert tok.encode_chat(chat, gen) == (ids if isinstance(ids, list) else ids["input_ids"])
    assert tok.encode(TEXT) == ref(TEXT)["input_ids"]
    assert 2 in tok.eos_token_ids  # <|im_end|>


def test_incremental_decoding_rebuilds_the_text(tok):
    ids = tok.encode("Ünïcode ✓ 日本語 and emoji 🚀 in one line")
    d = IncrementalDecoder(tok)
    assert "".join(d.push(i) for i in ids) == tok.decode(ids)


def test_greedy_answer_is_sensible(real_model_dir, whole, tok):
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}])
    out = [t for t, _ in generate(model_step(whole), ids, 24, stop_ids=tok.eos_token_ids)]
    assert "Paris" in tok.decode(out)


def test_prepared_dir_loads_fast_and_fingerprint_is_the_file_hash(real_model_dir):
    t0 = time.perf_counter()
    load_slice(real_model_dir)
    assert time.perf_counter() - t0 < 5.0  # ~1 s here; generous for a loaded CI box
    assert read_fingerprint(real_model_dir) == file_sha256(real_model_dir / "model.safetensors")


def test_preparing_the_bundled_gguf_again_gives_the_same_fingerprint(real_model_dir, tmp_path):
    from coinfer.model.prepare import prepare

    again = prepare(None, tmp_path / "again", progress=False)
    assert read_fingerprint(again) == read_fingerprint(real_model_dir)
