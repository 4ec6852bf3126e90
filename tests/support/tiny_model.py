"""Tiny random Llama-family models written as HF dirs (the fixtures in tests/conftest.py build them once
per run; a test that needs its own copy calls these)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from coinfer.model.prepare import file_sha256

TINY_VOCAB = 96

# name -> HF config overrides; "llama" is the default tiny model of the unit tests
TINY_VARIANTS = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),  # qkv bias, untied lm_head
    "llama3-rope": dict(
        model_type="llama",
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 50000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),  # fmt: skip
}


def tiny_tokenizer():
    """A word-level tokenizer with TINY_VOCAB entries and a chat template, as transformers saves it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    words = specials + [f"w{i}" for i in range(TINY_VOCAB - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
    )
    return fast


def make_tiny_hf_dir(path: Path, variant: str = "llama", num_layers: int = 6, seed: int = 0) -> Path:
    """An HF-format model dir (config, safetensors, tokenizer) with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    overrides = dict(TINY_VARIANTS[variant])
    model_type = overrides.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type, vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
        eos_token_id=2, **overrides,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb so tests see them
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path


def make_tiny_model_dir(path: Path, variant: str = "llama", num_layers: int = 6) -> Path:
    """A tiny model dir as `coinfer prepare` leaves it (HF files plus coinfer.json)."""
    make_tiny_hf_dir(path, variant, num_layers)
    meta = {"format": 1, "fingerprint": file_sha256(path / "model.safetensors"), "eos_token_ids": [2]}
    (path / "coinfer.json").write_text(json.dumps(meta))
    return path
