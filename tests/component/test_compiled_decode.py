"""torch.compile of the decode step (the device's `compile` setting): same tokens as eager, all
compiles done by the warm-up, the agent's setting, the cost profile of compiled calls. Every test
here compiles (about 20 s each on 2 cores): marked slow. (Without compiling, eager again when
compiling fails: tests/unit/test_compiled_decode.py.)"""

import pytest
import torch

from coinfer.model import load_slice
from coinfer.model.compiled import compile_decode
from coinfer.model.generation import generate, model_step

pytestmark = pytest.mark.slow

PROMPT = [5, 9, 17, 33, 8, 61, 20, 7, 44, 12]


def graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_compiled_decode_matches_eager_and_compiles_only_at_warm_up(tiny_dir, precision):
    eager = load_slice(tiny_dir, precision=precision)
    compiled = load_slice(tiny_dir, precision=precision)
    assert compile_decode(compiled) is not None and compiled.compiled and not eager.compiled
    before = graphs()
    # 300 tokens: past the first 256-position chunk of the cache, so it grows once and fills once
    want = [t for t, _ in generate(model_step(eager), PROMPT, 300)]
    got = [t for t, _ in generate(model_step(compiled), PROMPT, 300)]
    assert graphs() == before, "a decode step compiled again after the warm-up"
    assert got == want
    with torch.inference_mode():
        a, b = eager.new_cache(), compiled.new_cache()
        eager(torch.tensor([PROMPT]), a), compiled(torch.tensor([PROMPT]), b)
        la, lb = eager(torch.tensor([[3]]), a), compiled(torch.tensor([[3]]), b)
    assert torch.allclose(la, lb, atol=1e-4, rtol=1e-4)
    # views share the blocks, so they decode compiled too: 3 layers run as 3 single-block graphs
    view_e, view_c = eager.narrow(0, 3), compiled.narrow(0, 3)
    assert view_c.compiled
    with torch.inference_mode():
        a, b = view_e.new_cache(), view_c.new_cache()
        view_e(torch.tensor([PROMPT]), a), view_c(torch.tensor([PROMPT]), b)
        ha, hb = view_e(torch.tensor([[3]]), a), view_c(torch.tensor([[3]]), b)
    assert graphs() == before and torch.allclose(ha, hb, atol=1e-4, rtol=1e-4)


def test_device_agent_compile_setting(tiny_dir):
    from fastapi.testclient import TestClient

    from device_agent.cli import build_app
    from device_agent.config import AgentSettings

    app = build_app(AgentSettings(model_dir=str(tiny_dir), edge="", split="6", weights="int4", compile=True))
    assert app.state.logic.engine.head.model.compiled
    with TestClient(app) as c:
        name = c.get("/v1/models").json()["data"][0]["id"]
        r = c.post("/v1/completions", json={"model": name, "prompt": "w1 w2", "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_cost_profile_times_the_compiled_decode_calls(tiny_dir):
    """The partitioner's decode costs of a compiled head come from its compiled graphs (one call
    per 5 blocks, then single blocks), each block charged its share of the call."""
    from coinfer import profile

    m = load_slice(tiny_dir, precision="int4")
    assert compile_decode(m) is not None
    grouped, calls = m.layers[0].compiled_decode, []
    compiled_step = grouped.step
    grouped.step = lambda blocks, *a: calls.append(len(blocks)) or compiled_step(blocks, *a)
    p = profile.measure(m, repeats=1, decode_steps=2, sizes=(4, 8))
    assert calls == [5, 1] * 2 and len(p.layer_decode) == 6 and all(t > 0 for t in p.layer_decode)
    assert p.layer_decode[0] == p.layer_decode[4] != p.layer_decode[5]  # a group's share, then a single block
