"""What the model computes without any server: the unsplit greedy continuation and a head's frame."""

from __future__ import annotations

from pathlib import Path

from coinfer import codec
from coinfer.model import load_slice
from coinfer.model.generation import generate, model_step


def hidden_frame(model_dir: Path, ids: list[int], k: int, codec_name: str = "f32") -> bytes:
    """The frame a device at split k sends for `ids` (the head's hidden states, encoded)."""
    import torch

    head = load_slice(model_dir, 0, k, embed=True, head=False)
    with torch.inference_mode():
        return codec.encode(head(torch.tensor([ids]))[0], codec_name)


def greedy_reference(model_dir: Path, ids: list[int], n: int, stop_ids=()) -> list[int]:
    """Greedy continuation of the whole, unsplit model."""
    return [t for t, _ in generate(model_step(load_slice(model_dir)), ids, n, stop_ids=stop_ids)]
