"""The device agent's REST API on the tiny model with an in-process edge (real gRPC socket)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from device_agent.cli import build_app
from device_agent.config import AgentSettings
from tests.support.edge import address, edge_server
from tests.support.reference import greedy_reference

N = 6


@pytest.fixture(scope="module")
def edge(tiny_dirs):
    with edge_server(tiny_dirs["qwen2"], max_new_tokens=200) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(tiny_dirs, edge):
    app = build_app(AgentSettings(model_dir=str(tiny_dirs["qwen2"]), edge=address(edge), split="3", codec="f32"))
    with TestClient(app) as c:
        yield c


def chat(**kw) -> dict:
    body = {
        "model": "tiny-llama0",
        "messages": [{"role": "user", "content": "w1 w2 w3"}],
        "temperature": 0,
        "max_tokens": 8,
    }
    body.update(kw)
    return body


def token_ids(client, text: str) -> list[int]:
    return client.app.state.logic.engine.tokenizer.encode(text)


@pytest.fixture(scope="module")
def model_name(client) -> str:
    return client.get("/v1/models").json()["data"][0]["id"]


@pytest.mark.parametrize("k", range(N + 1))
def test_completion_greedy_equals_unsplit_at_every_split(client, tiny_dirs, model_name, k):
    r = client.post(
        "/v1/completions",
        json={
            "model": model_name,
            "prompt": "w1 w5 w9 w30",
            "max_tokens": 12,
            "temperature": 0,
            "split": k,
            "codec": "f32",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    tok = client.app.state.logic.engine.tokenizer
    expected = greedy_reference(tiny_dirs["qwen2"], tok.encode("w1 w5 w9 w30"), 12, tok.eos_token_ids)
    assert len(set(expected)) > 2  # a continuation that varies, or the comparison says little
    assert body["choices"][0]["text"] == tok.decode(expected)
    ext = body["coinfer"]
    assert ext["split"] == k and body["usage"]["completion_tokens"] == len(expected)
    if k == 0:  # Open + Prefill, nothing per token
        assert ext["messages_up"] == 2 and ext["messages_down"] == len(expected) + 2
    elif k < N:
        assert ext["messages_up"] == len(expected) + 1 and ext["bytes_up"] > len(expected) * 64 * 4
    else:
        assert ext["bytes_up"] == ext["bytes_down"] == 0


def test_chat_non_streamed_and_streamed_agree(client, model_name):
    r = client.post("/v1/chat/completions", json=chat(model=model_name))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert body["coinfer"]["split"] == 3 and body["coinfer"]["codec"] == "f32"

    with client.stream(
        "POST", "/v1/chat/completions", json=chat(model=model_name, stream=True, stream_options={"include_usage": True})
    ) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == body["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert len(finals) == 1 and finals[0]["coinfer"]["split"] == 3
    assert chunks[-1]["usage"] == body["usage"] and chunks[-1]["choices"] == []


def test_completion_stream(client, model_name):
    with client.stream(
        "POST",
        "/v1/completions",
        json={"model": model_name, "prompt": "w1 w2", "max_tokens": 5, "stream": True, "split": 0},
    ) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("stop", "length")


def test_prompt_as_token_ids_and_stop_string(client, tiny_dir, model_name):
    ids = [5, 6, 7]
    full = client.post(
        "/v1/completions", json={"model": model_name, "prompt": ids, "max_tokens": 6, "temperature": 0}
    ).json()["choices"][0]["text"]
    words = full.split()
    assert len(words) >= 2
    cut = client.post(
        "/v1/completions",
        json={"model": model_name, "prompt": ids, "max_tokens": 6, "temperature": 0, "stop": [" " + words[1]]},
    ).json()
    assert cut["choices"][0]["text"] == words[0] and cut["choices"][0]["finish_reason"] == "stop"


BAD = {
    "malformed json": ("/v1/chat/completions", b'{"model": "x", "messages": [', 400),
    "wrong type": ("/v1/chat/completions", {"model": "M", "messages": "hello"}, 400),
    "wrong type max_tokens": ("/v1/chat/completions", {"model": "M", "messages": [], "max_tokens": "many"}, 400),
    "unknown model": ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404),
    "empty messages": ("/v1/chat/completions", {"model": "M", "messages": []}, 400),
    "bad role": ("/v1/chat/completions", {"model": "M", "messages": [{"role": "wizard", "content": "x"}]}, 400),
    "negative max_tokens": ("/v1/completions", {"model": "M", "prompt": "w1", "max_tokens": -1}, 400),
    "over context": ("/v1/completions", {"model": "M", "prompt": "w1 " * 300, "max_tokens": 10}, 400),
    "max_tokens over context": ("/v1/completions", {"model": "M", "prompt": "w1", "max_tokens": 10**6}, 400),
    "empty prompt": ("/v1/completions", {"model": "M", "prompt": ""}, 400),
    "token id out of vocab": ("/v1/completions", {"model": "M", "prompt": [1, 10**6]}, 400),
    "split out of range": ("/v1/completions", {"model": "M", "prompt": "w1", "split": 7}, 400),
    "split not a number": ("/v1/completions", {"model": "M", "prompt": "w1", "split": "middle"}, 400),
    "unknown codec": ("/v1/completions", {"model": "M", "prompt": "w1", "codec": "zip"}, 400),
    "temperature too high": ("/v1/completions", {"model": "M", "prompt": "w1", "temperature": 9}, 400),
    "n > 1": ("/v1/completions", {"model": "M", "prompt": "w1", "n": 2}, 400),
    "too many stops": ("/v1/completions", {"model": "M", "prompt": "w1", "stop": ["a", "b", "c", "d", "e"]}, 400),
}

CODES = {
    "over context": "context_length_exceeded",
    "max_tokens over context": "context_length_exceeded",
    "split out of range": "invalid_split",
    "unknown codec": "invalid_codec",
}


@pytest.mark.parametrize("name", BAD)
def test_bad_request_gets_openai_error_and_server_keeps_serving(client, model_name, name):
    path, body, status = BAD[name]
    if isinstance(body, dict):
        body = json.dumps({**body, "model": model_name if body["model"] == "M" else body["model"]}).encode()
    r = client.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] in ("invalid_request_error", "not_found_error")
    if name in CODES:  # the engine's RequestError codes, not its messages, choose the body's code
        assert err["code"] == CODES[name], err
    ok = client.post("/v1/chat/completions", json=chat(model=model_name, max_tokens=2))
    assert ok.status_code == 200


def test_resolve_returns_a_route_and_coded_errors(client):
    from device_agent.generate import RequestError, Route

    engine = client.app.state.logic.engine
    assert engine.resolve(3, None) == Route(3, "f32", "requested", None)
    assert engine.resolve(None, "f16") == Route(3, "f16", "requested", None)
    auto = engine.resolve("auto", None, 3, 6)
    assert 0 <= auto.split <= N and auto.plan is not None and auto.reason == auto.plan.reason
    for split, codec, code in (
        (N + 1, None, "invalid_split"),
        ("x", None, "invalid_split"),
        (3, "zip", "invalid_codec"),
    ):
        with pytest.raises(RequestError) as e:
            engine.resolve(split, codec)
        assert e.value.code == code
    with pytest.raises(RequestError) as e:
        engine.check_length(0, 1)
    assert e.value.code == "empty_prompt"


COINFER_KEYS = {
    "split",
    "codec",
    "split_reason",
    "device_weights",
    "bytes_up",
    "bytes_down",
    "prefill_bytes_up",
    "step_bytes_up",
    "messages_up",
    "messages_down",
    "cached_tokens",
    "replays",
    "resumes",
    "edge_replica",
    "busy_retries",
    "local_fallback",
    "timings",
}
TIMING_KEYS = {
    "ttft_seconds",
    "total_seconds",
    "device_compute_seconds",
    "edge_compute_seconds",
    "edge_queue_seconds",
    "edge_decode_seconds",
    "network_seconds",
}


def test_coinfer_object_has_its_keys_and_no_null_prediction(client, model_name):
    r = client.post("/v1/completions", json={"model": model_name, "prompt": "w1 w2", "max_tokens": 3, "split": 3})
    ext = r.json()["coinfer"]
    assert set(ext) == COINFER_KEYS and set(ext["timings"]) == TIMING_KEYS  # "predicted" absent, not null
    r = client.post("/v1/completions", json={"model": model_name, "prompt": "w1 w2", "max_tokens": 3, "split": "auto"})
    ext = r.json()["coinfer"]
    assert set(ext) == COINFER_KEYS | {"predicted"}
    assert set(ext["predicted"]) == {"ttft_seconds", "per_token_seconds", "total_seconds"}


def test_openapi_schema_describes_the_coinfer_object(client):
    schemas = client.app.openapi()["components"]["schemas"]
    stats = schemas["CoinferStats"]
    assert set(stats["properties"]) == COINFER_KEYS | {"predicted"}
    assert set(stats["required"]) == COINFER_KEYS
    assert all(f.get("description") for f in stats["properties"].values())
    assert set(schemas["CoinferTimings"]["properties"]) == TIMING_KEYS
    assert set(schemas["CoinferPrediction"]["properties"]) == {"ttft_seconds", "per_token_seconds", "total_seconds"}
    for response in ("ChatCompletion", "Completion"):  # the responses point at it, not at a bare object
        assert "CoinferStats" in json.dumps(schemas[response]["properties"]["coinfer"]), response


def test_unknown_route_is_an_openai_error(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_health_ready_metrics(client, model_name):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["edge"]["status"] == "ok"
    client.post("/v1/chat/completions", json=chat(model=model_name, max_tokens=3))
    text = client.get("/metrics").text
    for name in (
        "coinfer_time_to_first_token_seconds_bucket",
        "coinfer_inter_token_latency_seconds_bucket",
        'coinfer_wire_bytes_total{direction="up"}',
        "coinfer_split_layer",
        "coinfer_active_requests",
        'coinfer_requests_total{route="/v1/chat/completions",status="200"}',
    ):
        assert name in text, name


def test_edge_down_gives_503_unless_device_holds_all_layers(tiny_dir):
    """No edge listening: a split request -> 503 with Retry-After; split N still works."""
    settings = AgentSettings(
        model_dir=str(tiny_dir),
        edge="127.0.0.1:1",
        split="3",
        connect_timeout_seconds=0.5,
        replays=0,
        max_device_layers=3,
    )
    with TestClient(build_app(settings)) as c:
        name = c.get("/v1/models").json()["data"][0]["id"]
        r = c.post("/v1/chat/completions", json=chat(model=name))
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "edge_unavailable"
        assert c.get("/readyz").status_code == 503
    settings = AgentSettings(
        model_dir=str(tiny_dir), edge="127.0.0.1:1", split="3", connect_timeout_seconds=0.5, replays=0
    )
    with TestClient(build_app(settings)) as c:
        r = c.post("/v1/chat/completions", json=chat(model=name))
        assert r.status_code == 200 and r.json()["coinfer"]["local_fallback"] is True
        assert c.post("/v1/chat/completions", json=chat(model=name, split=N)).status_code == 200


# -- split "auto": the partitioner in the agent -------------------------------------------------
def test_auto_split_is_planned_and_explained(client, model_name):
    r = client.post(
        "/v1/completions",
        json={"model": model_name, "prompt": "w1 w5 w9", "max_tokens": 6, "temperature": 0, "split": "auto"},
    )
    assert r.status_code == 200, r.text
    ext = r.json()["coinfer"]
    plan = client.get("/v1/plan", params={"prompt_tokens": 3, "max_tokens": 6}).json()
    assert ext["split_reason"].startswith("latency: split") and 0 <= ext["split"] <= N
    assert ext["predicted"]["total_seconds"] > 0
    assert [c["split"] for c in plan["per_split"]] == list(range(N + 1))
    assert plan["edge"]["reachable"] and plan["edge"]["profile"]
    assert plan["link"]["samples"]["up"] > 0  # the Describe polls and sessions taught the estimator


def test_plan_endpoint_rejects_bad_parameters(client):
    assert client.get("/v1/plan", params={"prompt_tokens": 0}).status_code == 400
    assert client.get("/v1/plan", params={"max_tokens": "x"}).status_code == 400
    r = client.get("/v1/plan", params={"codec": "zip"})
    assert r.status_code == 400 and "unknown codec" in r.json()["error"]["message"]
    assert client.get("/v1/plan").status_code == 200  # still serving


def test_plan_respects_the_privacy_floor(tiny_dirs, edge):
    app = build_app(AgentSettings(model_dir=str(tiny_dirs["qwen2"]), edge=address(edge), min_device_layers=4))
    with TestClient(app) as c:
        plan = c.get("/v1/plan", params={"prompt_tokens": 16, "max_tokens": 8}).json()
        assert plan["split"] >= 4 and min(x["split"] for x in plan["per_split"]) == 4
        name = c.get("/v1/models").json()["data"][0]["id"]
        r = c.post("/v1/completions", json={"model": name, "prompt": "w1 w2", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["coinfer"]["split"] >= 4


def test_auto_without_an_edge_runs_on_the_device(tiny_dirs):
    app = build_app(AgentSettings(model_dir=str(tiny_dirs["qwen2"]), edge=""))
    with TestClient(app) as c:
        name = c.get("/v1/models").json()["data"][0]["id"]
        r = c.post("/v1/completions", json={"model": name, "prompt": "w1 w2", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["coinfer"]["split"] == N
        assert "device only" in r.json()["coinfer"]["split_reason"]
        plan = c.get("/v1/plan").json()
        assert plan["edge"] is None and [x["split"] for x in plan["per_split"]] == [N]


def test_accuracy_budget_from_the_calibrated_table(tiny_dirs, edge, tmp_path):
    import shutil

    from coinfer.codec_accuracy import calibrate, load

    d = tmp_path / "tiny"
    shutil.copytree(tiny_dirs["qwen2"], d)
    table, _ = calibrate(d, ["f16", "int4"])
    assert load(d) is not None and set(table.table) == {"f16", "int4"} and len(table.table["int4"]) == N - 1
    budget = 0.99
    settings = AgentSettings(model_dir=str(d), edge=address(edge), plan_codecs="f16,int4", min_agreement=budget)
    with TestClient(build_app(settings)) as c:
        for params in ({}, {"min_agreement": 0.5}, {"min_agreement": 1.0}):
            plan = c.get("/v1/plan", params={"prompt_tokens": 32, "max_tokens": 8, **params})
            assert plan.status_code == 200, plan.text
            want = params.get("min_agreement", budget)
            for cand in plan.json()["per_split"]:
                if 0 < cand["split"] < N:
                    assert table.agreement(cand["codec"], cand["split"]) >= want, cand
        # a per-request budget on a completion: accepted, and bad values are a 400
        name = c.get("/v1/models").json()["data"][0]["id"]
        r = c.post("/v1/completions", json={"model": name, "prompt": "w1 w2", "max_tokens": 3, "min_agreement": 0.999})
        assert r.status_code == 200, r.text
        ext = r.json()["coinfer"]
        assert 0 == ext["split"] or ext["split"] == N or table.agreement(ext["codec"], ext["split"]) >= 0.999
        assert c.post("/v1/completions", json={"model": name, "prompt": "w1", "min_agreement": 2}).status_code == 400
