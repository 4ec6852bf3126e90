"""Issue 20 items 5 and 7 on real processes: every edge full does not make the device agent storm them,
and the agent's own limits answer 413 / 503 while it keeps serving."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import httpx
import pytest

from coinfer.tools.launcher import start_agent, start_edge
from coinfer.v1 import edge_pb2_grpc
from tests.hostile.conftest import open_

BUSY_WAIT = 2.0


def _refused(edge) -> float:
    text = httpx.get(edge.ready["ops"] + "/metrics", timeout=10).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('coinfer_sessions_total{outcome="resource_exhausted"}')
    )


@pytest.fixture(scope="module")
def full_edges(tiny_dir, fp):
    """Two edges of one session each, both held by an Open-only stream (long deadlines)."""
    edges = [
        start_edge(
            tiny_dir,
            args=["--profile", "false", "--max-sessions", "1", "--stream-idle-seconds", "120", "--torch-threads", "1"],
        )
        for _ in range(2)
    ]
    holders = []
    try:
        for i, e in enumerate(edges):
            ch = grpc.insecure_channel(e.ready["grpc"])
            out: queue.Queue = queue.Queue()
            out.put(open_(fp, split=0, session_id=f"holder{i}"))
            call = edge_pb2_grpc.EdgeInferenceStub(ch).Generate(iter(out.get, None), timeout=120)
            assert next(call).WhichOneof("kind") == "opened"
            holders.append((ch, call, out))
        yield edges
    finally:
        for ch, call, _ in holders:
            call.cancel()
            ch.close()
        for e in edges:
            e.stop()


@pytest.fixture(scope="module")
def agent(tiny_dir, full_edges):
    proc = start_agent(
        tiny_dir,
        ",".join(e.ready["grpc"] for e in full_edges),
        args=[
            "--split",
            "0",
            "--max-device-layers",
            "3",
            "--busy-wait-seconds",
            str(BUSY_WAIT),
            "--max-concurrent-requests",
            "1",
            "--max-request-bytes",
            "65536",
            "--profile-dir",
            "",
        ],
    )
    try:
        yield proc
    finally:
        proc.stop()


def _chat(n: int = 4) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "w1 w2 w3"}], "max_tokens": n}


def test_all_edges_full_is_a_503_within_the_busy_budget_with_few_opens(agent, full_edges):
    base = agent.ready["http"]
    model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
    before = sum(_refused(e) for e in full_edges)
    t0 = time.monotonic()
    r = httpx.post(base + "/v1/chat/completions", json={**_chat(), "model": model}, timeout=30)
    took = time.monotonic() - t0
    opens = sum(_refused(e) for e in full_edges) - before
    assert r.status_code == 503, r.text
    assert "retry-after" in {k.lower() for k in r.headers}
    assert took <= BUSY_WAIT + 1.0, f"answered after {took:.1f} s"
    assert 2 <= opens <= 30, f"{opens} Opens refused in {took:.1f} s"  # the storm was thousands


def test_agent_limits_answer_413_and_503_and_it_keeps_serving(agent):
    base = agent.ready["http"]
    model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
    big = {**_chat(), "model": model, "messages": [{"role": "user", "content": "w1 " * 40000}]}
    r = httpx.post(base + "/v1/chat/completions", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["message"]
    # one generation in flight (it waits out the full edges), the next is refused at once
    first: list[httpx.Response] = []
    t = threading.Thread(
        target=lambda: first.append(
            httpx.post(base + "/v1/chat/completions", json={**_chat(), "model": model}, timeout=30)
        )
    )
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    second = httpx.post(base + "/v1/chat/completions", json={**_chat(), "model": model}, timeout=30)
    assert second.status_code == 503 and second.json()["error"]["code"] == "overloaded"
    assert time.monotonic() - t0 < 1.0 and "retry-after" in {k.lower() for k in second.headers}
    assert httpx.get(base + "/healthz", timeout=2).status_code == 200
    t.join(30)
    assert first and first[0].status_code == 503  # the edges are still full: its own 503, in time
