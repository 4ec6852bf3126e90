"""Head [0, k) -> tensor codec -> tail [k, N) in one process.

The reference for the networked split (its output is what device + edge must
reproduce), and what `coinfer generate` runs to try a cut and a codec offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from coinfer import codec
from coinfer.model import ModelConfig, TensorReader, load_slice
from coinfer.model.generation import StepFn
from coinfer.model.weights import WEIGHTS_FILE


@dataclass
class LinkStats:
    frames: int = 0
    tokens: int = 0
    bytes: int = 0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0


class LocalSplit:
    """The model cut at `split`: head = embedding + layers [0, split), tail = the rest + lm_head."""

    def __init__(self, model_dir: str | Path, split: int, codec_name: str = "f32") -> None:
        self.cfg = ModelConfig.from_dir(model_dir)
        if not 0 <= split <= self.cfg.num_layers:
            raise ValueError(f"split must be in 0..{self.cfg.num_layers}, got {split}")
        codec.get_codec(codec_name)
        reader = TensorReader(Path(model_dir) / WEIGHTS_FILE)  # one open file for both slices
        self.head = load_slice(model_dir, 0, split, embed=True, head=False, reader=reader)
        self.tail = load_slice(model_dir, split, self.cfg.num_layers, embed=False, head=True, reader=reader)
        self.split, self.codec = split, codec_name
        self.stats = LinkStats()

    def send(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [1, T, d] through encode -> bytes -> decode, counting bytes."""
        frame = codec.encode(hidden[0], self.codec)
        self.stats.frames += 1
        self.stats.tokens += hidden.shape[1]
        self.stats.bytes += len(frame)
        return codec.decode(frame, hidden_size=self.cfg.hidden_size)[None]

    def step_fn(self) -> StepFn:
        """A next-token-logits function with fresh caches on both sides."""
        head_cache, tail_cache = self.head.new_cache(), self.tail.new_cache()

        def step(ids: torch.Tensor) -> torch.Tensor:
            hidden = self.head(ids, head_cache)  # [1, T, d]
            return self.tail(self.send(hidden), tail_cache, last_only=True)[0, -1]

        return step
