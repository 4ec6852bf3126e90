"""Edge at scale on the tiny model: batched decoding, KV budget with eviction and replay,
prefix reuse across chat turns, backpressure. Real gRPC on loopback, device agent engines."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from fastapi.testclient import TestClient

from coinfer.model.sampling import SamplingParams
from device_agent.cli import build_app
from device_agent.config import AgentSettings
from device_agent.generate import Delta, GenerationRequest, Result
from tests.support.edge import address, edge_server, hold_session, open_msg, stub, wait_sessions
from tests.support.reference import greedy_reference

N = 6


def _engine(model_dir, edge, split, **kw):
    settings = AgentSettings(
        model_dir=str(model_dir), edge=address(edge), split=str(split), codec="f32", connect_timeout_seconds=10, **kw
    )
    return build_app(settings).state.logic.engine


def _run(engine, prompt, n, split=None) -> tuple[list[int], Result]:
    got, result = [], None
    for ev in engine.stream(GenerationRequest(list(prompt), n, SamplingParams(), split=split, ignore_eos=True)):
        if isinstance(ev, Result):
            result = ev
        elif isinstance(ev, Delta) and ev.token_id >= 0:
            got.append(ev.token_id)
    return got, result


def _concurrently(fn, args_list):
    out, errors = [None] * len(args_list), []

    def work(i, args):
        try:
            out[i] = fn(*args)
        except Exception as e:  # surfaced below with the index
            errors.append((i, e))

    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return out


def _prompt(n, seed):
    return [(7 * i + 13 * seed) % 90 + 3 for i in range(n)]


def _metric(edge, name: str) -> float:
    for metric in edge.service.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == name:
                return sample.value
    return 0.0


def test_batched_sessions_equal_solo_runs(tiny_dir):
    """8 concurrent sessions of different prompt lengths (k = 0 and k = 3, f32, greedy), 32 tokens each."""
    jobs = [(_prompt(n, i), 0 if i % 2 else 3) for i, n in enumerate([3, 9, 17, 30, 5, 44, 12, 21])]
    with edge_server(tiny_dir, prefix_reuse=False, batch_wait_ms=5) as edge:
        engine = _engine(tiny_dir, edge, 3, prefix_reuse=False)
        solo = [_run(engine, p, 32, split=k)[0] for p, k in jobs]
        batches_before = _metric(edge, "coinfer_batch_size_count")
        steps_before = _metric(edge, "coinfer_batch_size_sum")
        together = _concurrently(lambda p, k: _run(engine, p, 32, split=k)[0], jobs)
        batches = _metric(edge, "coinfer_batch_size_count") - batches_before
        steps = _metric(edge, "coinfer_batch_size_sum") - steps_before
    assert together == solo
    assert steps >= 8 * 31 and steps / batches > 1.5, f"{steps} steps in {batches} batches: no batching"
    assert solo[0] == greedy_reference(tiny_dir, jobs[0][0], 32)


def test_eviction_and_replay_keep_outputs_and_the_budget(tiny_dir):
    """A budget for 2 sessions, 6 concurrent sessions: all complete, outputs equal solo runs."""
    with edge_server(tiny_dir, kv_chunk_tokens=64) as probe:
        per_session = probe.service.runner.new_session(3, "f32", SamplingParams()).cache.nbytes_at(64)
    budget = 2 * per_session
    jobs = [_prompt(n, i) for i, n in enumerate([10, 14, 6, 20, 9, 17])]
    with edge_server(tiny_dir, kv_budget_bytes=budget, kv_chunk_tokens=64) as edge:
        store = edge.service.sessions
        engine = _engine(tiny_dir, edge, 3, busy_wait_seconds=60, replays=5)
        solo = [_run(engine, p, 24)[0] for p in jobs]
        seen, stop = [], threading.Event()

        def watch():
            while not stop.is_set():
                seen.append(store.used_bytes)
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            runs = _concurrently(lambda p: _run(engine, p, 24), [(p,) for p in jobs])
        finally:
            stop.set()
            watcher.join()
        assert [t for t, _ in runs] == solo
        assert max(seen) <= budget and store.peak_bytes <= budget
        assert store.stats.evicted_live > 0 and sum(r.stats.replays for _, r in runs) > 0
        assert _metric(edge, "coinfer_kv_evictions_total") > 0
        assert wait_sessions(edge, 0)


@pytest.mark.parametrize("k", [0, 3])
def test_second_chat_turn_sends_only_new_tokens(tiny_dir, k):
    turn1 = _prompt(40, 1)
    with edge_server(tiny_dir) as edge:
        engine = _engine(tiny_dir, edge, k)
        out1, r1 = _run(engine, turn1, 12)
        turn2 = turn1 + out1 + _prompt(9, 2)
        out2, r2 = _run(engine, turn2, 12)
        held = (len(turn1) + len(out1) - 1) // 16 * 16  # the last generated token never entered the cache
        assert r1.stats.cached_tokens == 0 and r2.stats.cached_tokens == held
        per_token = r1.stats.prefill_bytes_up / len(turn1)
        assert r2.stats.prefill_bytes_up < (len(turn2) - held + 4) * per_token
        assert _metric(edge, "coinfer_prefix_hits_total") == 1
    with edge_server(tiny_dir, prefix_reuse=False) as edge:
        fresh = _engine(tiny_dir, edge, k, prefix_reuse=False)
        out2_fresh, r2_fresh = _run(fresh, turn2, 12)
    assert out2 == out2_fresh and r2_fresh.stats.cached_tokens == 0
    # k = 0: one-byte token ids of the tiny vocabulary; block names cost about as much as they save
    assert r2_fresh.stats.prefill_bytes_up > (2 if k else 1) * r2.stats.prefill_bytes_up


def test_session_limit_answers_busy_with_a_hint_then_retries_or_falls_back(tiny_dir):
    prompt = _prompt(12, 3)
    with edge_server(tiny_dir, max_sessions=1) as edge:
        fp, addr = edge.service.runner.fingerprint, address(edge)
        release = threading.Event()
        holder = threading.Thread(target=hold_session, args=(addr, fp, release))
        holder.start()
        while len(edge.service.sessions) < 1:
            time.sleep(0.01)
        with stub(addr) as s, pytest.raises(grpc.RpcError) as e:
            list(s.Generate(iter([open_msg(fp, 0, session_id="second")]), timeout=10))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert int(dict(e.value.trailing_metadata())["retry-after-ms"]) > 0
        # the device holds all layers and may not wait: it finishes the request itself
        engine = _engine(tiny_dir, edge, 3, busy_wait_seconds=0.3)
        out, r = _run(engine, prompt, 10)
        assert r.stats.fallback and r.stats.busy_retries >= 1 and out == greedy_reference(tiny_dir, prompt, 10)
        # a patient device gets through once the edge frees a slot
        threading.Timer(0.5, release.set).start()
        out, r = _run(_engine(tiny_dir, edge, 3, busy_wait_seconds=20), prompt, 10)
        assert not r.stats.fallback and r.stats.busy_retries >= 1 and out == greedy_reference(tiny_dir, prompt, 10)
        holder.join()


def test_busy_edge_is_503_with_retry_after_when_the_device_cannot_finish_alone(tiny_dir):
    with edge_server(tiny_dir, max_sessions=1) as edge:
        release = threading.Event()
        holder = threading.Thread(target=hold_session, args=(address(edge), edge.service.runner.fingerprint, release))
        holder.start()
        while len(edge.service.sessions) < 1:
            time.sleep(0.01)
        app = build_app(
            AgentSettings(
                model_dir=str(tiny_dir),
                edge=address(edge),
                split="3",
                codec="f32",
                max_device_layers=3,
                busy_wait_seconds=0.2,
            )
        )
        with TestClient(app) as c:
            body = {"model": c.get("/v1/models").json()["data"][0]["id"], "prompt": "w1 w2", "max_tokens": 4}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "edge_busy"
            assert int(r.headers["Retry-After"]) >= 1
            release.set()
            holder.join()
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
