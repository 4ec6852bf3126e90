"""HeadRunner: the device's part of the model, embedding + layers [0, k), with its own KV caches.

The device loads layers [0, D) once (D = max_device_layers); a request at split k <= D runs a
parameter-sharing view of [0, k). When D = N the head also holds norm + lm_head, so split N
runs the whole model on the device (and is the fallback when no edge is reachable).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from coinfer import codec, compute, profile
from coinfer.model import ModelConfig, compiled, load_head
from coinfer.model.kv_cache import KVCache
from coinfer.model.llama import ModelSlice
from coinfer.model.sampling import Sampler
from coinfer.model.weights import read_fingerprint
from coinfer.planning.cost_profile import CostProfile


class HeadRunner:
    """All torch work runs on the process's compute thread (see coinfer.compute for why)."""

    def __init__(
        self,
        model_dir: str | Path,
        max_layers: int = -1,
        weights: str = "fp32",
        slowdown: float = 1.0,
        compile_decode: bool = False,
    ) -> None:
        self.cfg = ModelConfig.from_dir(model_dir)
        n = self.cfg.num_layers
        self.max_layers = n if max_layers < 0 else min(max_layers, n)
        self.fingerprint = read_fingerprint(model_dir)
        self.model = compute.run(load_head, model_dir, self.max_layers, weights)
        self.compile_seconds = compute.run(compiled.compile_decode, self.model) if compile_decode else None
        self.slowdown = slowdown  # benchmarks only: emulate a slower device by sleeping after each forward

    def cost_profile(self, cache_dir: str | None) -> CostProfile:
        """Per-layer costs of this device (cached per host), frame sizes per codec, scaled by the slowdown."""
        return profile.device_profile(self.model, self.fingerprint, cache_dir, self.slowdown)

    def _slow(self, seconds: float) -> float:
        if self.slowdown > 1.0:
            time.sleep((self.slowdown - 1.0) * seconds)
        return seconds * self.slowdown

    @property
    def holds_all_layers(self) -> bool:
        return self.max_layers == self.cfg.num_layers

    def view(self, split: int) -> ModelSlice:
        if not 0 <= split <= self.max_layers:
            raise ValueError(f"split {split} is out of range: this device holds layers 0..{self.max_layers}")
        return self.model.narrow(0, split)

    def hidden_frame(self, view: ModelSlice, ids: list[int], cache: KVCache, codec_name: str) -> tuple[bytes, float]:
        """ids -> hidden states [T, d] after layers [0, k) -> an encoded frame; returns (frame, seconds)."""

        def work() -> bytes:
            with torch.inference_mode():
                return codec.encode(view(torch.tensor([ids]), cache)[0], codec_name)

        frame, _, seconds = compute.run_timed(work)
        return frame, self._slow(seconds)

    def next_token(
        self, view: ModelSlice, ids: list[int], cache: KVCache, sampler: Sampler
    ) -> tuple[int, float, float]:
        """The whole model on the device: ids -> (next token, its logprob, seconds)."""

        def work() -> tuple[int, float]:
            with torch.inference_mode():
                return sampler(view(torch.tensor([ids]), cache, last_only=True)[0, -1])

        (token, logprob), _, seconds = compute.run_timed(work)
        return token, logprob, self._slow(seconds)
