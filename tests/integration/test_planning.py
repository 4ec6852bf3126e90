"""The partitioner live: edge and device agent as real processes, the link shaped by our proxy."""

from __future__ import annotations

import httpx
import pytest

from coinfer.tools.launcher import start_agent, start_edge
from coinfer.tools.shaper import Shaper

pytestmark = pytest.mark.integration
N = 30
MESSAGES = [
    {
        "role": "user",
        "content": "Write two sentences about rivers, lakes and the sea, and why people like to live near water.",
    }
]
RATE, RTT = 1e6, 0.040


@pytest.fixture(scope="module")
def shaped(real_model_dir):
    edge = start_edge(real_model_dir)
    host, port = edge.ready["grpc"].rsplit(":", 1)
    shaper = Shaper((host, int(port)), rate_bits=RATE, delay=RTT / 2)
    shaper.start()
    try:
        agent = start_agent(real_model_dir, f"127.0.0.1:{shaper.port}", args=["--describe-interval-seconds", "0.5"])
    except Exception:
        edge.kill()
        shaper.stop()
        raise
    try:
        with httpx.Client(base_url=agent.ready["http"], timeout=120) as api:
            yield edge, agent, shaper, api
    finally:
        codes = agent.stop(), edge.stop()
        shaper.stop()
    assert codes == (0, 0)


_requests = iter(range(1_000_000))


def chat(api, **extra) -> dict:
    # a new question each time: the same one again would find its prefix on the edge (prefix
    # reuse) and send almost nothing, and the estimator learns bandwidth from large transfers
    model = api.get("/v1/models").json()["data"][0]["id"]
    messages = [{"role": "user", "content": f"Question {next(_requests)}. {MESSAGES[0]['content']}"}]
    r = api.post(
        "/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 12, "temperature": 0, **extra}
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_estimator_learns_the_shaped_link(shaped):
    _, _, _, api = shaped
    for _ in range(3):
        c = chat(api, split=15, codec="f16")["coinfer"]
        assert c["split"] == 15 and c["prefill_bytes_up"] > 20_000
    plan = api.get("/v1/plan", params={"prompt_tokens": 128, "max_tokens": 32}).json()
    link = plan["link"]
    assert link["up_bytes_per_second"] == pytest.approx(RATE / 8, rel=0.2), link
    # the shaper's delay is the floor; a busy host's scheduling only adds to what a probe measures
    assert RTT - 0.005 <= link["rtt_seconds"] <= RTT + 0.020, link
    assert plan["edge"]["reachable"] and plan["edge"]["profile"]
    metrics = api.get("/metrics").text
    assert (
        "coinfer_link_rtt_seconds" in metrics and 'coinfer_link_bandwidth_bytes_per_second{direction="up"}' in metrics
    )


def test_plan_endpoint_explains_every_split(shaped):
    _, _, _, api = shaped
    plan = api.get("/v1/plan", params={"prompt_tokens": 128, "max_tokens": 32}).json()
    assert [c["split"] for c in plan["per_split"]] == list(range(N + 1))
    best = min(plan["per_split"], key=lambda c: c["score"])
    assert plan["split"] == best["split"] and plan["reason"].startswith("latency: split")
    for c in plan["per_split"]:
        assert c["total_seconds"] == pytest.approx(c["ttft_seconds"] + 31 * c["per_token_seconds"])
    # on a 1 Mbit/s link every interior cut pays ~1.2 KB per token: the ends must beat them
    assert plan["split"] in (0, N)
    assert api.get("/v1/plan", params={"prompt_tokens": 0}).status_code == 400
    assert api.get("/v1/plan", params={"codec": "zip"}).status_code == 400


def test_auto_requests_carry_the_plan(shaped):
    _, _, _, api = shaped
    c = chat(api)["coinfer"]
    assert c["split_reason"].startswith("latency: split") and c["predicted"]["total_seconds"] > 0
    assert c["split"] in (0, N)


def test_plan_follows_a_link_change(shaped):
    """20 Mbit/s then 64 kbit/s, live: the estimate follows within two requests, interior cuts
    become several times dearer, and the plan keeps hidden states off the link."""
    _, _, shaper, api = shaped
    shaper.set(rate_bits=20e6, delay=0.0025)
    try:
        for _ in range(2):
            chat(api, split=2, codec="f16")
        fast = api.get("/v1/plan", params={"prompt_tokens": 128, "max_tokens": 32}).json()
        shaper.set(rate_bits=64e3, delay=0.05)
        for _ in range(2):
            chat(api, split=2, codec="f16")
        slow = api.get("/v1/plan", params={"prompt_tokens": 128, "max_tokens": 32}).json()
    finally:
        shaper.set(rate_bits=RATE, delay=RTT / 2)
    assert slow["link"]["up_bytes_per_second"] < fast["link"]["up_bytes_per_second"] / 20

    def cost2(p):
        return next(c for c in p["per_split"] if c["split"] == 2)["total_seconds"]

    assert cost2(slow) > 5 * cost2(fast)
    assert slow["split"] in (0, N)  # the ends (same hardware here: which one is within profile noise)
