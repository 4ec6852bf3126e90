"""Quantized weights served: an int8 / int4 edge and device agent on the tiny model answer a request.
(The quantized layers themselves: tests/unit/test_quantize.py.)"""

import pytest


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_edge_and_device_serve(tiny_dir, weights):
    """COINFER_WEIGHTS per side: a quantized edge reports it in Describe; a quantized device head feeds it."""
    from fastapi.testclient import TestClient

    from coinfer.v1 import edge_pb2 as pb
    from device_agent.cli import build_app
    from device_agent.config import AgentSettings
    from tests.support.edge import address, edge_server, stub

    with edge_server(tiny_dir, weights=weights) as srv:
        with stub(address(srv)) as s:
            assert s.Describe(pb.DescribeRequest(), timeout=5).weights == weights
        app = build_app(AgentSettings(model_dir=str(tiny_dir), edge=address(srv), split="3", weights=weights))
        with TestClient(app) as c:
            name = c.get("/v1/models").json()["data"][0]["id"]
            r = c.post("/v1/completions", json={"model": name, "prompt": "w1 w2", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200 and r.json()["coinfer"]["device_weights"] == weights
            assert r.json()["usage"]["completion_tokens"] >= 1
