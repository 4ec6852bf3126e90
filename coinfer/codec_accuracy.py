"""How much each codec costs in accuracy at each cut: the table behind the accuracy budget.

`measure` runs a text through the whole model once (the reference), keeps the hidden state
after every layer, and for every codec and cut k sends that state through encode/decode and
the rest of the model: greedy-token agreement with the reference (teacher-forced, every
position) and mean KL(reference || codec), plus bytes per token of the whole text as one
frame. `coinfer calibrate` stores the table as codec_accuracy.json in the model dir (on the
built-in calibration text); the device's planner reads it and never picks a (cut, codec)
below the accuracy budget. benchmarks/codec_frontier.py measures the same on held-out text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from coinfer import codec as codecs
from coinfer.model.accuracy import compare
from coinfer.model.llama import ModelSlice, causal_mask, rope_cos_sin

FILE = "codec_accuracy.json"


@dataclass(frozen=True)
class Entry:
    bytes_per_token: float
    agreement: float
    mean_kl: float


@dataclass
class CodecAccuracy:
    fingerprint: str
    text: str  # which built-in text (or "custom")
    positions: int
    table: dict[str, dict[int, Entry]]  # codec -> cut -> entry

    def agreement(self, codec: str, k: int) -> float | None:
        e = self.table.get(codec, {}).get(k)
        return e.agreement if e is not None else None

    def agreements(self) -> dict[str, dict[int, float]]:
        """codec -> cut -> greedy agreement: what the partitioner's accuracy budget checks."""
        return {c: {k: e.agreement for k, e in row.items()} for c, row in self.table.items()}

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "text": self.text,
            "positions": self.positions,
            "table": {c: {str(k): vars(e) for k, e in row.items()} for c, row in self.table.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> CodecAccuracy:
        return cls(
            d["fingerprint"],
            d["text"],
            int(d["positions"]),
            {c: {int(k): Entry(**e) for k, e in row.items()} for c, row in d["table"].items()},
        )


def hidden_after_every_layer(model: ModelSlice, ids: list[int]) -> list[torch.Tensor]:
    """[hidden after layer k for k in 0..N-1] ([T, d] each; k = 0 is the embedding output)."""
    if model.embed_tokens is None:
        raise ValueError("hidden_after_every_layer needs a slice with the embedding")
    x = model.embed_tokens(torch.tensor([ids])).to(model.dtype)  # [1, T, d]
    T = x.shape[1]
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(T), x.dtype)
    states = [x[0].float()]
    for i, block in enumerate(model.layers[:-1]):
        x = block(x, cos, sin, None, i, causal_mask(0, T))
        states.append(x[0].float())
    return states


def measure(
    model: ModelSlice,
    ids: list[int],
    codec_names: Iterable[str],
    cuts: Iterable[int],
    fingerprint: str = "",
    text: str = "custom",
    progress=None,
) -> CodecAccuracy:
    """The table for a whole model (embedding to lm_head). Run it on the compute thread."""
    n = model.num_layers
    table: dict[str, dict[int, Entry]] = {c: {} for c in codec_names}
    with torch.inference_mode():
        reference = model(torch.tensor([ids]))[0]  # [T, V]
        states = hidden_after_every_layer(model, ids)
        for k in cuts:
            if not 0 < k < n:
                raise ValueError(f"cut {k} is not between 1 and {n - 1}")
            tail = model.narrow(k, n)
            for name in table:
                frame = codecs.encode(states[k], name)
                out = tail(codecs.decode(frame)[None])[0]
                a = compare(reference, out)
                table[name][k] = Entry(len(frame) / len(ids), a.agreement, a.mean_kl)
            if progress:
                progress(k)
    return CodecAccuracy(fingerprint, text, len(ids), table)


def calibrate(model_dir: str | Path, codec_names: Iterable[str] | None = None) -> tuple[CodecAccuracy, float]:
    """Measure the table on the built-in calibration text and store it in the model dir."""
    from coinfer import compute
    from coinfer.model import load_slice
    from coinfer.model.texts import CALIBRATION_PROSE
    from coinfer.model.tokenizer import Tokenizer
    from coinfer.model.weights import read_fingerprint

    t0 = time.perf_counter()
    ids = Tokenizer(model_dir).encode(CALIBRATION_PROSE, add_special_tokens=False)
    model = compute.run(load_slice, model_dir)
    names = [c for c in (codec_names or codecs.CODECS) if not codecs.CODECS[c].lossless]
    table = compute.run(
        measure, model, ids, names, range(1, model.num_layers), read_fingerprint(model_dir), "calibration"
    )
    (Path(model_dir) / FILE).write_text(json.dumps(table.to_json(), indent=1) + "\n")
    return table, time.perf_counter() - t0


def load(model_dir: str | Path, fingerprint: str | None = None) -> CodecAccuracy | None:
    """The stored table, or None when there is none (or it belongs to other weights)."""
    path = Path(model_dir) / FILE
    try:
        table = CodecAccuracy.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return table if fingerprint is None or table.fingerprint == fingerprint else None
