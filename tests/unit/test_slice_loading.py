"""A slice builds only its own blocks and reads only its own tensors from model.safetensors."""

import pytest
import torch

from coinfer.model import TensorReader, load_slice

V, D, F, L = 96, 64, 96, 6
QKV = D * (D + 2 * 32)  # 4 heads x 16 + 2 x 2 kv heads x 16
PER_LAYER = QKV + D * D + 3 * D * F + 2 * D


def layer_tensors(i: int) -> set[str]:
    p = f"model.layers.{i}."
    names = ["input_layernorm", "post_attention_layernorm"]
    attn = [f"self_attn.{x}_proj" for x in "qkvo"]
    mlp = [f"mlp.{x}_proj" for x in ("gate", "up", "down")]
    return {p + n + ".weight" for n in names + attn + mlp}


@pytest.mark.parametrize(
    "start,stop,embed,head",
    [
        (0, 0, True, False),
        (0, 2, True, False),
        (2, 5, False, False),
        (4, 6, False, True),
        (6, 6, False, True),
        (0, 6, True, True),
        (3, 6, True, True),
    ],  # fmt: skip
)
def test_slice_reads_only_its_tensors(tiny_dir, start, stop, embed, head):
    reader = TensorReader(tiny_dir / "model.safetensors")
    model = load_slice(tiny_dir, start, stop, embed=embed, head=head, reader=reader)
    expected = set().union(*(layer_tensors(i) for i in range(start, stop)))
    expected |= {"model.embed_tokens.weight"} if embed or head else set()  # tied: lm_head is the embedding
    expected |= {"model.norm.weight"} if head else set()
    assert reader.read == expected
    assert len(model.layers) == stop - start
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    want = (stop - start) * PER_LAYER + (V * D if embed or head else 0) + (D if head else 0)
    if embed and head:  # tied embedding and lm_head: two parameter views of one storage
        n_params -= V * D
    assert n_params == want
    assert len(storages) == len(list(model.parameters())) - (1 if embed and head else 0)


def test_untied_tail_reads_lm_head_not_embedding(tiny_dirs):
    d = tiny_dirs["qwen2"]
    reader = TensorReader(d / "model.safetensors")
    load_slice(d, 4, 6, reader=reader)
    assert "lm_head.weight" in reader.read and "model.embed_tokens.weight" not in reader.read
    assert any(n.endswith("q_proj.bias") for n in reader.read)


def test_defaults_follow_the_cut(tiny_dir):
    head, tail = load_slice(tiny_dir, 0, 3), load_slice(tiny_dir, 3)
    assert head.has_embed and not head.has_head and tail.has_head and not tail.has_embed
    with torch.inference_mode():
        assert head(torch.tensor([[1, 2, 3]])).shape == (1, 3, D)
        assert tail(torch.zeros(1, 3, D)).shape == (1, 3, V)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="coinfer prepare"):
        load_slice(tmp_path)


def test_loading_a_slice_does_not_pull_in_torchs_symbolic_stack(tiny_dir):
    # building modules on the meta device ran ops (pow, normal_) whose meta kernels import sympy and
    # ~800 modules: 67 MiB of RSS in every process that loads a model (benchmarks/decode_speed.py)
    import subprocess
    import sys

    code = (
        "import sys, torch\nfrom coinfer.model import load_slice\n"
        f"load_slice({str(tiny_dir)!r}, precision='int8')\nprint('sympy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
