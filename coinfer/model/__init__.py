"""Llama-family model that can be cut at any layer: config, blocks, KV cache, weights, tokenizer."""

from coinfer.model.config import ConfigError, ModelConfig
from coinfer.model.kv_cache import KVCache
from coinfer.model.llama import ModelSlice
from coinfer.model.weights import TensorReader, load_head, load_slice, read_fingerprint

__all__ = [
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "ModelSlice",
    "TensorReader",
    "load_head",
    "load_slice",
    "read_fingerprint",
]
