"""A lost edge session is reopened and replayed from the device's token history; output unchanged."""

from __future__ import annotations

from coinfer.model.sampling import SamplingParams
from device_agent.cli import build_app
from device_agent.config import AgentSettings
from device_agent.generate import Delta, GenerationRequest, Result
from edge_server.config import EdgeSettings
from edge_server.server import EdgeServer
from tests.serving import greedy_reference

PROMPT = [11, 40, 7, 23, 5, 88, 64, 3, 19]


def _engine(model_dir, port: int, split: int):
    settings = AgentSettings(model_dir=str(model_dir), edge=f"127.0.0.1:{port}", split=str(split), codec="f32",
                             replays=3, connect_timeout_seconds=10)
    return build_app(settings).state.logic.engine


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
            engine = _engine(d, port, split)
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
