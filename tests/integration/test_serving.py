"""End to end on the real SmolLM2: `edge-server` and `device-agent` as real processes on free
127.0.0.1 ports, REST through httpx and the official openai client, gRPC abuse of the edge."""

from __future__ import annotations

import json
import threading

import grpc
import httpx
import pytest

from coinfer.model.tokenizer import Tokenizer
from coinfer.model.weights import read_fingerprint
from coinfer.tools.launcher import start_agent, start_edge
from coinfer.v1 import edge_pb2 as pb
from tests.support.edge import open_msg, session, stub
from tests.support.reference import greedy_reference, hidden_frame

pytestmark = pytest.mark.integration
N = 30
MESSAGES = [{"role": "user", "content": "Name three primary colors and say one sentence about each."}]


@pytest.fixture(scope="module")
def stack(real_model_dir):
    edge = start_edge(real_model_dir, args=["--max-sessions", "8"])
    try:
        agent = start_agent(real_model_dir, edge.ready["grpc"], args=["--split", "15", "--codec", "f16"])
    except Exception:
        edge.kill()
        raise
    try:
        yield edge, agent
    finally:
        codes = agent.stop(), edge.stop()
    assert codes == (0, 0), "a server did not stop cleanly on SIGTERM:\n" + "\n".join(edge.lines)


@pytest.fixture(scope="module")
def api(stack):
    with httpx.Client(base_url=stack[1].ready["http"], timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model_id(api) -> str:
    return api.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="module")
def reference(real_model_dir) -> tuple[Tokenizer, list[int], list[int]]:
    tok = Tokenizer(real_model_dir)
    ids = tok.encode_chat(MESSAGES)
    return tok, ids, greedy_reference(real_model_dir, ids, 24, tok.eos_token_ids)


@pytest.mark.parametrize("k", [0, 1, 15, 29, 30])
def test_f32_greedy_equals_the_unsplit_model(api, model_id, reference, k):
    tok, ids, expected = reference
    r = api.post(
        "/v1/chat/completions",
        json={"model": model_id, "messages": MESSAGES, "max_tokens": 24, "temperature": 0, "split": k, "codec": "f32"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == tok.decode(expected)
    usage = {k: body["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert usage == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(expected),
        "total_tokens": len(ids) + len(expected),
    }
    ext = body["coinfer"]
    assert ext["split"] == k
    if k == 0:  # no per-token round trip: Open + Prefill up; Opened + tokens + Done down
        assert (ext["messages_up"], ext["messages_down"]) == (2, len(expected) + 2)
    elif k < N:
        assert ext["messages_up"] == len(expected) + 1 and ext["bytes_up"] > len(ids) * 576 * 4
    else:
        assert ext["bytes_up"] == 0 and ext["messages_up"] == 0


def test_httpx_streamed_chat(api, model_id):
    with api.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": model_id, "messages": MESSAGES, "max_tokens": 20, "temperature": 0, "stream": True},
    ) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert len(text) > 10 and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["coinfer"]["split"] == 15 and chunks[-1]["coinfer"]["codec"] == "f16"


def test_openai_client_plain_and_streamed(stack, model_id):
    from openai import OpenAI

    client = OpenAI(base_url=stack[1].ready["http"] + "/v1", api_key="unused", max_retries=0)
    plain = client.chat.completions.create(model=model_id, messages=MESSAGES, max_tokens=16, temperature=0)
    assert plain.choices[0].message.content and plain.usage.completion_tokens == 16
    assert plain.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model=model_id,
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 16
    comp = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert comp.choices[0].text.strip() and comp.usage.completion_tokens <= 5
    assert [m.id for m in client.models.list().data] == [model_id]


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (b'{"model": "MODEL", "messages": "hi"}', 400),
    (b'{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}', 404),
    (b'{"model": "MODEL", "messages": []}', 400),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}', 400),
    (b'{"model": "MODEL", "messages": [{"role": "user", "content": "' + b"word " * 9000 + b'"}]}', 400),
])  # fmt: skip
def test_bad_requests_get_4xx_and_the_agent_keeps_serving(api, model_id, body, status):
    r = api.post(
        "/v1/chat/completions",
        content=body.replace(b"MODEL", model_id.encode()),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    ok = api.post("/v1/chat/completions", json={"model": model_id, "messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200


def test_grpc_abuse_of_the_edge_leaves_a_concurrent_session_unchanged(stack, real_model_dir, reference):
    tok, ids, expected = reference
    addr, fp = stack[0].ready["grpc"], read_fingerprint(real_model_dir)
    result = {}

    def healthy():
        with stub(addr) as s:
            replies = session(
                s,
                [
                    open_msg(fp, 0, max_new=24, session_id="healthy", stop_ids=list(tok.eos_token_ids)),
                    pb.DeviceMessage(prefill=pb.Prefill(token_ids=ids)),
                ],
                timeout=120,
            )
        result["ids"] = [r.token.id for r in replies if r.WhichOneof("kind") == "token"]

    t = threading.Thread(target=healthy)
    t.start()
    frame = hidden_frame(real_model_dir, ids, 10, "f16")
    cases = [
        (
            [open_msg(fp, 10, "f16"), pb.DeviceMessage(prefill=pb.Prefill(frame=frame[:40] + b"\xff" * 64))],
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ([open_msg("sha256:0000", 10)], grpc.StatusCode.FAILED_PRECONDITION),
        ([open_msg(fp, 31)], grpc.StatusCode.INVALID_ARGUMENT),
        ([pb.DeviceMessage(step=pb.Step(frame=frame))], grpc.StatusCode.FAILED_PRECONDITION),
        (
            [open_msg(fp, 12, "f16", max_new=1), pb.DeviceMessage(prefill=pb.Prefill(frame=frame))],  # any 576-d frame
            None,
        ),
        (
            [
                open_msg(fp, 12, "f16", max_new=5),
                pb.DeviceMessage(prefill=pb.Prefill(frame=frame)),
            ],  # half-closes early
            "ends",
        ),
    ]
    with stub(addr) as s:
        for i, (messages, want) in enumerate(cases):
            for m in messages:
                if m.WhichOneof("kind") == "open":
                    m.open.session_id = f"abuse-{i}"
            if want is None:
                assert session(s, messages, timeout=60)[-1].WhichOneof("kind") == "done"
                continue
            if want == "ends":  # the edge waits for a Step, sees the half-close, ends the stream without Done
                assert [r.WhichOneof("kind") for r in session(s, messages, timeout=60)] == ["opened", "token"]
                continue
            with pytest.raises(grpc.RpcError) as e:
                session(s, messages, timeout=60)
            assert e.value.code() == want, e.value.details()
        # a client that opens, prefills, and vanishes mid-stream
        call = s.Generate(
            iter(
                [
                    open_msg(fp, 10, "f16", max_new=200, session_id="vanish"),
                    pb.DeviceMessage(prefill=pb.Prefill(frame=frame)),
                ]
            ),
            timeout=60,
        )
        next(call), next(call)
        call.cancel()
    t.join(120)
    assert result["ids"] == expected
    assert _edge_sessions_drain(stack[0])


def _edge_sessions_drain(edge, timeout: float = 10.0) -> bool:
    """The edge's session store empties (read through its ops port)."""
    import time

    deadline = time.monotonic() + timeout
    while httpx.get(edge.ready["ops"] + "/v1/sessions", timeout=5).json()["sessions"]:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_rest_client_that_disconnects_mid_stream_frees_the_edge_session(stack, api, model_id):
    body = {"model": model_id, "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True, "stream": True, "split": 15}
    with api.stream("POST", "/v1/chat/completions", json=body) as s:
        lines = s.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few chunks, then hang up
        assert any(line.startswith("data: ") for line in got)
        sessions = httpx.get(stack[0].ready["ops"] + "/v1/sessions", timeout=5).json()["sessions"]
        assert len(sessions) == 1 and sessions[0]["split"] == 15
    assert _edge_sessions_drain(stack[0]), "the edge still holds the session of a client that left"
    ok = api.post("/v1/chat/completions", json={"model": model_id, "messages": MESSAGES, "max_tokens": 2})
    assert ok.status_code == 200


def test_edge_ops_endpoints(stack):
    ops = stack[0].ready["ops"]
    with httpx.Client(base_url=ops, timeout=10) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        assert c.get("/readyz").status_code == 200
        info = c.get("/v1/info").json()
        assert info["num_layers"] == N and info["hidden_size"] == 576 and info["fingerprint"].startswith("sha256:")
        metrics = c.get("/metrics").text
    for name in (
        "coinfer_active_sessions",
        "coinfer_kv_cache_bytes",
        'coinfer_wire_bytes_total{direction="in"}',
        "coinfer_split_layer_bucket",
        "coinfer_step_seconds_bucket",
        'coinfer_sessions_total{outcome="ok"}',
    ):
        assert name in metrics, name


def test_device_metrics(api):
    text = api.get("/metrics").text
    for name in (
        "coinfer_time_to_first_token_seconds_count",
        "coinfer_inter_token_latency_seconds_count",
        'coinfer_wire_bytes_total{direction="down"}',
        "coinfer_split_layer",
    ):
        assert name in text, name
    assert api.get("/readyz").json()["edge"]["status"] == "ok"


def test_coinfer_up_serves_and_stops_both_on_ctrl_c(real_model_dir):
    """What `make run` runs: both apps start, the printed curl target answers, SIGINT stops both (exit 0)."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    exe = Path(sys.executable).with_name("coinfer")
    proc = subprocess.Popen(
        [str(exe), "up", "--model", str(real_model_dir), "--port", "0", "--grpc-port", "0", "--ops-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, url = [], None
    deadline = time.monotonic() + 120
    try:
        for line in proc.stdout:
            lines.append(line)
            if m := re.search(r"coinfer is up: device agent (http://\S+)", line):
                url = m.group(1)
            if "Ctrl-C stops both" in line or time.monotonic() > deadline:
                break
        assert url, "".join(lines)
        assert "curl " + url + "/v1/chat/completions" in "".join(lines) and "from openai import OpenAI" in "".join(
            lines
        )
        pids = [int(p) for p in re.findall(r"READY pid=(\d+)", "".join(lines))]
        assert len(pids) == 2
        r = httpx.post(
            url + "/v1/chat/completions",
            timeout=60,
            json={"model": real_model_dir.name, "messages": MESSAGES, "max_tokens": 4},
        )
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert out.rstrip().endswith("stopped")
    for pid in pids:  # both children are gone
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
