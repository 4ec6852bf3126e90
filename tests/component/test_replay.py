"""A lost edge session is reopened and replayed from the device's token history; output unchanged.
What cannot succeed by replaying (a Prefill over the message limit) is refused once, as a 400."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from coinfer.model.sampling import SamplingParams
from device_agent.cli import build_app
from device_agent.config import AgentSettings
from device_agent.edge.client import MessageTooLarge
from device_agent.generate import GenerationRequest, Result
from edge_server.config import EdgeSettings
from edge_server.server import EdgeServer
from tests.support.agent_app import edge_engine
from tests.support.edge import address, edge_server
from tests.support.reference import greedy_reference

PROMPT = [11, 40, 7, 23, 5, 88, 64, 3, 19]


def _edge(model_dir, port: int = 0) -> EdgeServer:
    srv = EdgeServer(EdgeSettings(model_dir=str(model_dir), grpc_port=port, ops_port=0))
    srv.start()
    return srv


def test_edge_restart_mid_stream_is_replayed(tiny_dirs):
    d = tiny_dirs["qwen2"]
    srv = _edge(d)
    port = srv.grpc_port
    try:
        for split in (0, 3):
            engine = edge_engine(d, port, split)
            expected = greedy_reference(d, PROMPT, 24, engine.tokenizer.eos_token_ids)
            got, result = [], None
            for ev in engine.stream(GenerationRequest(PROMPT, 24, SamplingParams())):
                if isinstance(ev, Result):
                    result = ev
                elif ev.token_id >= 0:
                    got.append(ev.token_id)
                    if len(got) == 6:  # the edge restarts on the same port mid-generation
                        srv.stop(0)
                        srv = _edge(d, port)
            assert got == expected
            assert result.stats.replays == 1 and result.completion_tokens == len(expected)
    finally:
        srv.stop(0)


def _opened(edge) -> float:
    r = edge.service.metrics.registry
    return sum(r.get_sample_value("coinfer_sessions_opened_total", {"how": h}) or 0.0 for h in ("new", "resumed"))


def test_a_prefill_over_the_edges_message_limit_is_refused_once_not_retried(tiny_dirs):
    d = tiny_dirs["qwen2"]
    with edge_server(d, max_message_bytes=2048) as edge:  # Opened.limits tells the device
        engine = build_app(
            AgentSettings(model_dir=str(d), edge=address(edge), split="3", codec="f32", prefix_reuse=False)
        ).state.logic.engine
        long = GenerationRequest(list(range(10, 40)), 4, SamplingParams())  # 30 positions x 64 x f32 > 2 KiB
        with pytest.raises(MessageTooLarge) as e:
            list(engine.stream(long))
        assert e.value.limit == 2048 and e.value.size > 2048 and _opened(edge) == 1
        short = [ev for ev in engine.stream(GenerationRequest([11, 40, 7], 4, SamplingParams()))]
        assert isinstance(short[-1], Result) and short[-1].stats.replays == 0


def test_a_prompt_over_the_devices_message_limit_is_a_400_with_a_clear_message(tiny_dirs):
    d = tiny_dirs["qwen2"]
    with edge_server(d) as edge:
        app = build_app(
            AgentSettings(model_dir=str(d), edge=address(edge), split="3", codec="f32", max_message_bytes=4096)
        )
        with TestClient(app) as c:
            model = c.get("/v1/models").json()["data"][0]["id"]
            prompt = " ".join(f"w{i}" for i in range(10, 60))
            r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4})
            assert r.status_code == 400, r.text
            msg = r.json()["error"]["message"]
            assert msg.startswith("prompt too large for one message to the edge: ") and "> limit 4096" in msg
            assert "use a shorter prompt, a smaller codec or raise max_message_bytes" in msg
            assert _opened(edge) == 1
            r = c.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 4, "stream": True})
            assert r.status_code == 400 and "prompt too large" in r.json()["error"]["message"]
