"""Weight precision per slice: fp32 stays exact, bf16 and int8 load, generate and stay close."""

import pytest
import torch

from coinfer.model import load_slice
from coinfer.model.generation import generate, model_step
from coinfer.model.quantize import Int8Embedding, Int8Linear, apply_precision, weight_bytes

PROMPT = [5, 9, 17, 33, 8, 61, 20, 7, 44, 12]


def logits(model, ids=PROMPT):
    with torch.inference_mode():
        return model(torch.tensor([ids]), model.new_cache()).float()


@pytest.mark.parametrize("variant", ["llama", "qwen2", "llama3-rope"])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_each_precision_loads_generates_and_stays_close(tiny_dirs, variant, precision):
    d = tiny_dirs[variant]
    ref, q = load_slice(d), load_slice(d, precision=precision)
    assert q.precision == precision
    out = [t for t, _ in generate(model_step(q), PROMPT, 12)]
    assert len(out) == 12 and all(0 <= t < 96 for t in out)
    a, b = logits(ref), logits(q)
    rel = (a - b).abs().max() / a.abs().max()
    assert rel < 0.05, f"{precision} logits drift {rel:.3f} of the logit range"
    assert weight_bytes(q) < (0.6 if precision == "bf16" else 0.4) * weight_bytes(ref)


def test_fp32_is_untouched(tiny_dir):
    assert torch.equal(logits(load_slice(tiny_dir)), logits(load_slice(tiny_dir, precision="fp32")))


def test_int8_modules_and_tied_weights_share_one_tensor(tiny_dir):
    m = load_slice(tiny_dir, precision="int8")  # the tiny llama ties embedding and lm_head
    assert isinstance(m.embed_tokens, Int8Embedding) and isinstance(m.lm_head, Int8Linear)
    assert m.lm_head.q.data_ptr() == m.embed_tokens.q.data_ptr()
    assert all(isinstance(b.mlp.w_down, Int8Linear) and b.mlp.w_down.q.dtype == torch.int8 for b in m.layers)
    assert m.new_cache().dtype == torch.float32  # int8 weights keep fp32 activations and KV cache
    assert load_slice(tiny_dir, precision="bf16").new_cache().dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_split_views_and_mixed_precision_sides(tiny_dir, precision):
    """A quantized device head feeding an fp32 edge tail (and the reverse) runs through f32 hidden states."""
    head = load_slice(tiny_dir, 0, 3, precision=precision)
    tail = load_slice(tiny_dir, 3, 6)
    whole = load_slice(tiny_dir, precision=precision)
    with torch.inference_mode():
        hidden = head(torch.tensor([PROMPT])).float()
        split_logits = tail(hidden)
        view = whole.narrow(0, 3)
        assert torch.equal(view(torch.tensor([PROMPT])).float(), hidden)
    assert split_logits.shape == (1, len(PROMPT), 96)


def test_unknown_precision_is_refused(tiny_dir):
    with pytest.raises(ValueError, match="fp32, bf16, int8"):
        apply_precision(load_slice(tiny_dir), "int3")


def test_int8_edge_and_device_serve(tiny_dir):
    """COINFER_WEIGHTS per side: an int8 edge reports it in Describe; an int8 device head feeds it."""
    from fastapi.testclient import TestClient

    from coinfer.v1 import edge_pb2 as pb
    from device_agent.cli import build_app
    from device_agent.config import AgentSettings
    from tests.serving import address, edge_server, stub

    with edge_server(tiny_dir, weights="int8") as srv:
        with stub(address(srv)) as s:
            assert s.Describe(pb.DescribeRequest(), timeout=5).weights == "int8"
        app = build_app(AgentSettings(model_dir=str(tiny_dir), edge=address(srv), split="3", weights="int8"))
        with TestClient(app) as c:
            name = c.get("/v1/models").json()["data"][0]["id"]
            r = c.post("/v1/completions", json={"model": name, "prompt": "w1 w2", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200 and r.json()["coinfer"]["device_weights"] == "int8"
            assert r.json()["usage"]["completion_tokens"] >= 1
