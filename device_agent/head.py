"""HeadRunner: the device's part of the model, embedding + layers [0, k), with its own KV caches.

The device loads layers [0, D) once (D = max_device_layers); a request at split k <= D runs a
parameter-sharing view of [0, k). When D = N the head also holds norm + lm_head, so split N
runs the whole model on the device (and is the fallback when no edge is reachable).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from coinfer.model import ModelConfig, load_slice
from coinfer.model.kv_cache import KVCache
from coinfer.model.llama import ModelSlice
from coinfer.model.weights import read_fingerprint


class HeadRunner:
    def __init__(self, model_dir: str | Path, max_layers: int = -1) -> None:
        self.cfg = ModelConfig.from_dir(model_dir)
        n = self.cfg.num_layers
        self.max_layers = n if max_layers < 0 else min(max_layers, n)
        self.fingerprint = read_fingerprint(model_dir)
        self.model = load_slice(model_dir, 0, self.max_layers, embed=True, head=self.max_layers == n)
        self._lock = threading.Lock()  # one forward at a time: concurrent ones only share the same cores
        self.compute_seconds = 0.0

    @property
    def holds_all_layers(self) -> bool:
        return self.max_layers == self.cfg.num_layers

    def view(self, split: int) -> ModelSlice:
        if not 0 <= split <= self.max_layers:
            raise ValueError(f"split {split} is out of range: this device holds layers 0..{self.max_layers}")
        return self.model.narrow(0, split)

    def forward(self, view: ModelSlice, ids: list[int], cache: KVCache, last_only: bool = False) -> tuple[torch.Tensor, float]:
        """ids -> hidden states [1, T, d] (or logits [1, 1, V] for the whole model); returns (out, seconds)."""
        with self._lock:
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = view(torch.tensor([ids]), cache, last_only=last_only)
            dt = time.perf_counter() - t0
        return out, dt
