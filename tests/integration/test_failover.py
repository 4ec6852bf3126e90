"""Two real edge processes: kill -9 the one serving a streamed REST completion mid-way; the stream
completes on the other edge and its text equals a no-fault greedy run (SmolLM2)."""

from __future__ import annotations

import json

import httpx
import pytest

from coinfer.tools.launcher import start_agent, start_edge

pytestmark = pytest.mark.integration
MESSAGES = [{"role": "user", "content": "Describe a lighthouse at night in four sentences."}]


def _serving(edges) -> list:
    return [
        e
        for e in edges
        if e.proc.poll() is None and httpx.get(e.ready["ops"] + "/v1/sessions", timeout=5).json()["sessions"]
    ]


def test_kill_the_serving_edge_mid_stream(real_model_dir):
    edges = [start_edge(real_model_dir), start_edge(real_model_dir)]
    agent = start_agent(real_model_dir, ",".join(e.ready["grpc"] for e in edges), args=["--split", "15"])
    try:
        with httpx.Client(base_url=agent.ready["http"], timeout=300) as c:
            body = {
                "model": "smollm2-135m-instruct",
                "messages": MESSAGES,
                "max_tokens": 48,
                "temperature": 0,
                "codec": "f32",
                "ignore_eos": True,
            }
            clean = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
            text, killed = [], None
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
                for line in s.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    if delta:
                        text.append(delta)
                    if len(text) == 8 and killed is None:
                        serving = _serving(edges)
                        assert len(serving) == 1
                        killed = serving[0]
                        killed.kill()  # SIGKILL: no drain, no goodbye
            assert killed is not None
            assert "".join(text) == clean
            metrics = c.get("/metrics").text
            assert any(
                line.startswith("coinfer_replays_total") and float(line.split()[1]) >= 1
                for line in metrics.splitlines()
            )
    finally:
        agent.stop()
        for e in edges:
            e.stop()
