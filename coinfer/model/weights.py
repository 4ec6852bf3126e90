"""Read a slice's weights from `model.safetensors`, tensor by tensor, and only those it needs."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import torch
from safetensors import safe_open

from coinfer.model.config import ModelConfig
from coinfer.model.llama import ModelSlice

WEIGHTS_FILE = "model.safetensors"
META_FILE = "coinfer.json"


class TensorReader:
    """Lazy access to one safetensors file; remembers which tensors were actually read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found: prepare the model dir first (coinfer prepare)")
        self._file = safe_open(str(self.path), framework="pt")
        self.names = set(self._file.keys())
        self.read: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(f"tensor {name!r} is missing from {self.path}")
        self.read.add(name)
        return self._file.get_tensor(name)  # may be a view of the file's mmap: see _own


def read_fingerprint(model_dir: str | Path) -> str:
    """The weights fingerprint `coinfer prepare` wrote (sha256 of model.safetensors)."""
    meta = Path(model_dir) / META_FILE
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: prepare the model dir first (coinfer prepare)")
    return json.loads(meta.read_text())["fingerprint"]


def _hf_layer_tensors(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "attn_norm": p + "input_layernorm.weight",
        "mlp_norm": p + "post_attention_layernorm.weight",
        "q": p + "self_attn.q_proj.",
        "k": p + "self_attn.k_proj.",
        "v": p + "self_attn.v_proj.",
        "o": p + "self_attn.o_proj.weight",
        "gate": p + "mlp.gate_proj.weight",
        "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight",
    }


def slice_state_dict(reader: TensorReader, cfg: ModelConfig, start: int, stop: int, embed: bool, head: bool):
    """Our parameter names -> tensors, read from the HF-named tensors of layers [start, stop)."""
    sd: dict[str, torch.Tensor] = {}
    for j, i in enumerate(range(start, stop)):
        n, ours = _hf_layer_tensors(i), f"layers.{j}."
        sd[ours + "attn_norm.weight"] = _own(reader.get(n["attn_norm"]))
        sd[ours + "mlp_norm.weight"] = _own(reader.get(n["mlp_norm"]))
        sd[ours + "attn.wqkv.weight"] = _t(torch.cat([reader.get(n[x] + "weight") for x in "qkv"]))
        if cfg.attention_bias:
            sd[ours + "attn.wqkv.bias"] = torch.cat([reader.get(n[x] + "bias") for x in "qkv"])
        sd[ours + "attn.wo.weight"] = _t(reader.get(n["o"]))
        sd[ours + "mlp.w_gate.weight"] = _t(reader.get(n["gate"]))
        sd[ours + "mlp.w_up.weight"] = _t(reader.get(n["up"]))
        sd[ours + "mlp.w_down.weight"] = _t(reader.get(n["down"]))
    embedding = None
    if embed:
        embedding = sd["embed_tokens.weight"] = _own(reader.get("model.embed_tokens.weight"))
    if head:
        sd["norm.weight"] = _own(reader.get("model.norm.weight"))
        if cfg.tie_word_embeddings:
            lm_head = embedding if embedding is not None else reader.get("model.embed_tokens.weight")
        else:
            lm_head = reader.get("lm_head.weight")
        sd["lm_head.weight"] = _t(lm_head)
    return sd


def _own(w: torch.Tensor) -> torch.Tensor:
    """A copy for tensors kept as read (the others are copied by cat / _t anyway): safe_open's
    tensors can be views of the file's mmap, and one kept view keeps every page read from the
    file resident (SmolLM2 k=15: +310 MiB of RSS on top of the weights)."""
    return w.clone()


def _t(w: torch.Tensor) -> torch.Tensor:
    """HF's [out, in] -> our Linear's [in, out]."""
    return w.t().contiguous()


def load_slice(
    model_dir: str | Path,
    start: int = 0,
    stop: int | None = None,
    *,
    embed: bool | None = None,
    head: bool | None = None,
    reader: TensorReader | None = None,
    precision: str = "fp32",
) -> ModelSlice:
    """Build layers [start, stop) of the model in `model_dir`, reading only their tensors.

    By default the slice carries the embedding if it starts at 0 and the final
    norm + lm_head if it ends at the last layer. `precision` (fp32, bf16, int8, int4) is applied
    after loading (coinfer.model.quantize); fp32 is the exact reference.
    """
    cfg = ModelConfig.from_dir(model_dir)
    stop = cfg.num_layers if stop is None else stop
    embed = start == 0 if embed is None else embed
    head = stop == cfg.num_layers if head is None else head
    reader = reader or TensorReader(Path(model_dir) / WEIGHTS_FILE)
    with torch.device("meta"):  # no allocation or random init for weights we overwrite anyway
        model = ModelSlice(cfg, start, stop, embed, head)
    sd = {k: v.float() for k, v in slice_state_dict(reader, cfg, start, stop, embed, head).items()}
    if embed and head and cfg.tie_word_embeddings:
        sd["embed_tokens.weight"] = sd["lm_head.weight"].t()  # one tensor for both: a [V, d] view of [d, V]
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if precision != "fp32":
        from coinfer.model.quantize import apply_precision

        del sd  # the fp32 tensors go once the slice's modules are converted
        apply_precision(model, precision)
    release_free_memory()
    return model


def load_head(model_dir: str | Path, max_layers: int = -1, precision: str = "fp32") -> ModelSlice:
    """What a device loads: the embedding and layers [0, D) (D = max_layers, -1 = all), plus the norm
    and lm_head when D = N so that it can generate alone. Why one function: the device agent and
    `coinfer plan` must load the same slice to measure, and cache, the same cost profile."""
    n = ModelConfig.from_dir(model_dir).num_layers
    stop = n if max_layers < 0 else min(max_layers, n)
    return load_slice(model_dir, 0, stop, embed=True, head=stop == n, precision=precision)


def release_free_memory() -> None:
    """Give the heap pages freed while loading back to the OS (glibc keeps them otherwise).

    Loading frees as much as it keeps (file copies, transposes, fp32 before quantizing), in
    holes between live tensors that glibc never returns on its own: measured on SmolLM2 k=15
    int8, process RSS 405 MiB above the interpreter before malloc_trim, 158 MiB after.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
