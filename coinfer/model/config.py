"""Model hyper-parameters, read from a Hugging Face `config.json` (Llama family)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Architectures whose blocks are the same as ours: pre-norm, RoPE, GQA, SwiGLU.
SUPPORTED_MODEL_TYPES = {"llama": False, "qwen2": True, "mistral": False}  # -> default qkv bias
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3"}


class ConfigError(ValueError):
    """The config describes a model this implementation cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": ..., "factor": ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported (supported: {sorted(SUPPORTED_MODEL_TYPES)})"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        if model_type == "mistral" and hf.get("sliding_window"):
            raise ConfigError("mistral with sliding_window attention is not supported")
        heads = hf["num_attention_heads"]
        rope = _rope_params(hf)
        eos = hf.get("eos_token_id")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.pop("rope_theta")),
            rope_scaling=rope,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", SUPPORTED_MODEL_TYPES[model_type])),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {model_dir} a prepared model dir? (coinfer prepare)")
        return cls.from_hf(json.loads(path.read_text()))

    def to_dict(self) -> dict:
        return asdict(self)

    def rope_inv_freq(self) -> torch.Tensor:
        """Inverse RoPE frequencies [head_dim/2], with the config's scaling applied."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        kind = self.rope_scaling.get("rope_type", "default")
        if kind == "linear":
            return inv_freq / self.rope_scaling["factor"]
        if kind == "llama3":
            return _llama3_inv_freq(inv_freq, self.rope_scaling)
        return inv_freq


def _rope_params(hf: dict) -> dict:
    """RoPE settings from either transformers-5 `rope_parameters` or the older keys."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        params["rope_theta"] = hf.get("rope_theta", 10000.0)
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope type {params['rope_type']!r} is not supported (supported: {sorted(SUPPORTED_ROPE_TYPES)})"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported")
    return params


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)
