"""Edge at scale on the real SmolLM2, real processes: batched decoding equals solo runs, a
second chat turn sends only its new tokens, and a KV budget for 2 sessions serves 6."""

from __future__ import annotations

import threading

import httpx
import pytest

from coinfer.model.tokenizer import Tokenizer
from coinfer.tools.launcher import start_agent, start_edge
from tests.support.processes import ONE_THREAD
from tests.support.reference import greedy_reference

pytestmark = pytest.mark.integration
TOPICS = [
    "the sea",
    "a small robot",
    "bread baking",
    "mountain weather",
    "old maps",
    "city trains",
    "a lighthouse keeper",
    "winter birds",
]


def _messages(i: int) -> list[dict]:
    # prompts of different lengths: the topic sentence repeated i + 1 times
    return [{"role": "user", "content": " ".join([f"Write about {TOPICS[i]}."] * (i + 1))}]


@pytest.fixture(scope="module")
def edge(real_model_dir):
    e = start_edge(real_model_dir, args=["--max-sessions", "16", *ONE_THREAD])
    yield e
    assert e.stop() == 0


def _agent(real_model_dir, edge, *args):
    return start_agent(real_model_dir, edge.ready["grpc"], args=["--split", "15", "--codec", "f32", *ONE_THREAD, *args])


def _chat(c: httpx.Client, messages, split, max_tokens=32, **kw) -> dict:
    r = c.post(
        "/v1/chat/completions",
        json={
            "model": "smollm2-135m-instruct",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "split": split,
            "codec": "f32",
            **kw,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


def _batch_stats(edge) -> tuple[float, float]:
    text = httpx.get(edge.ready["ops"] + "/metrics", timeout=5).text
    vals = {
        line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("coinfer_batch_size_")
    }
    return vals.get("coinfer_batch_size_sum", 0.0), vals.get("coinfer_batch_size_count", 0.0)


def test_eight_concurrent_sessions_equal_their_solo_runs(real_model_dir, edge):
    agent = _agent(real_model_dir, edge, "--prefix-reuse", "false")
    try:
        with httpx.Client(base_url=agent.ready["http"], timeout=300) as c:
            jobs = [(_messages(i), 0 if i % 2 else 15) for i in range(8)]
            solo = [_chat(c, m, k, ignore_eos=True)["choices"][0]["message"]["content"] for m, k in jobs]
            before = _batch_stats(edge)
            together = [None] * 8

            def run(i):
                together[i] = _chat(c, *jobs[i], ignore_eos=True)["choices"][0]["message"]["content"]

            threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            after = _batch_stats(edge)
    finally:
        agent.stop()
    assert together == solo
    steps, batches = after[0] - before[0], after[1] - before[1]
    assert steps >= 8 * 31 and steps / batches > 2, f"{steps} decode steps in {batches} batches"


def test_second_chat_turn_sends_only_its_new_tokens(real_model_dir, edge):
    tok = Tokenizer(real_model_dir)
    agent = _agent(real_model_dir, edge)
    try:
        with httpx.Client(base_url=agent.ready["http"], timeout=300) as c:
            turn1 = [
                {"role": "system", "content": "You are a concise assistant for a museum of old maps. " * 4},
                {"role": "user", "content": "What is a portolan chart?"},
            ]
            r1 = _chat(c, turn1, 15)
            answer = r1["choices"][0]["message"]["content"]
            turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Who used them?"}]
            r2 = _chat(c, turn2, 15)
    finally:
        agent.stop()
    ids2 = tok.encode_chat(turn2)
    cached = r2["coinfer"]["cached_tokens"]
    assert (
        cached >= len(tok.encode_chat(turn1)) // 16 * 16
        and r2["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    )
    per_token = r1["coinfer"]["prefill_bytes_up"] / r1["usage"]["prompt_tokens"]
    assert r2["coinfer"]["prefill_bytes_up"] < (len(ids2) - cached + 2) * per_token
    expected = greedy_reference(real_model_dir, ids2, 32, tok.eos_token_ids)  # f32: exact, reuse or not
    assert r2["choices"][0]["message"]["content"] == tok.decode(expected)


def test_budget_for_two_sessions_serves_six(real_model_dir):
    per_session = 2 * 15 * 3 * 64 * 4 * 64  # k, v x 15 tail layers x 3 KV heads x 64 dims x f32 x 64 positions
    e = start_edge(
        real_model_dir, args=["--kv-budget-bytes", str(2 * per_session), "--kv-chunk-tokens", "64", *ONE_THREAD]
    )
    agent = _agent(real_model_dir, e, "--busy-wait-seconds", "120", "--replays", "8")
    try:
        with httpx.Client(base_url=agent.ready["http"], timeout=300) as c:
            jobs = [_messages(i) for i in range(6)]
            solo = [_chat(c, m, 15, max_tokens=16, ignore_eos=True)["choices"][0]["message"]["content"] for m in jobs]
            together, stats = [None] * 6, [None] * 6

            def run(i):
                r = _chat(c, jobs[i], 15, max_tokens=16, ignore_eos=True)
                together[i], stats[i] = r["choices"][0]["message"]["content"], r["coinfer"]

            threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            metrics = httpx.get(e.ready["ops"] + "/metrics", timeout=5).text
    finally:
        agent.stop()
        e.stop()
    assert together == solo
    assert sum(s["replays"] for s in stats) > 0
    evictions = sum(
        float(line.split()[1]) for line in metrics.splitlines() if line.startswith("coinfer_kv_evictions_total")
    )
    assert evictions > 0
