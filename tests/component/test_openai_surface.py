"""The OpenAI surface people expect of the device agent: no request field ignored silently (one we do
not implement is a 400 naming it, unless its value asks for what we do anyway), the official `openai`
client's requests work as it sends them, `GET /v1/models/{id}`, and an `X-Request-Id` on every
response that also names the request in the agent's log. The tiny model on the device alone."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from openai import OpenAI

from device_agent.api.protocol import UNSUPPORTED
from tests.support.agent_app import MODEL, device_only_engine, make_app

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def client(tiny_dir):
    with device_only_engine(tiny_dir) as engine, TestClient(make_app(engine, max_request_bytes=4096)) as c:
        yield c


def body(path: str, **fields) -> dict:
    """A greedy request of 3 tokens to `path`, plus `fields`."""
    if path == CHAT:
        base = {"model": MODEL, "messages": [{"role": "user", "content": "w1 w2"}]}
    else:
        base = {"model": MODEL, "prompt": "w1 w2 w3"}
    return {**base, "max_tokens": 3, "temperature": 0, **fields}


# (path, field as `param` names it, a value we do not implement)
REFUSED = [
    (CHAT, "n", 2),
    (COMPLETIONS, "n", 3),
    (CHAT, "presence_penalty", 0.5),
    (COMPLETIONS, "frequency_penalty", -1.0),
    (CHAT, "logit_bias", {"42": 5}),
    (CHAT, "service_tier", "flex"),
    (CHAT, "logprobs", True),
    (CHAT, "top_logprobs", 2),
    (COMPLETIONS, "logprobs", 0),
    (CHAT, "response_format", {"type": "json_object"}),
    (CHAT, "tools", [{"type": "function", "function": {"name": "f"}}]),
    (CHAT, "functions", [{"name": "f"}]),
    (CHAT, "tool_choice", "auto"),
    (CHAT, "function_call", {"name": "f"}),
    (CHAT, "parallel_tool_calls", False),
    (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
    (CHAT, "prediction", {"type": "content", "content": "x"}),
    (CHAT, "modalities", ["text", "audio"]),
    (COMPLETIONS, "echo", True),
    (COMPLETIONS, "best_of", 2),
    (COMPLETIONS, "suffix", " the end"),
    (CHAT, "reasoning_effort", "low"),  # not in the table: unknown to us, refused as unknown
    (COMPLETIONS, "frobnicate", 1),
]
# a message's fields that the chat template would lose
MESSAGE_REFUSED = {
    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    "refusal": "I will not",
    "annotations": [{"type": "url_citation"}],
    "audio": {"id": "a1"},
    "function_call": {"name": "f", "arguments": "{}"},
    "frobnicate": 1,
}


def assert_refused(client: TestClient, r, param: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", param)
    assert err["message"].startswith(f"{param}: ")
    assert client.post(CHAT, json=body(CHAT)).status_code == 200  # and the agent keeps serving


def test_every_unsupported_field_of_the_table_is_tested():
    assert set(UNSUPPORTED) <= {field for _, field, _ in REFUSED} | set(MESSAGE_REFUSED)


@pytest.mark.parametrize(("path", "field", "value"), REFUSED, ids=[f"{p[4:]}-{f}" for p, f, _ in REFUSED])
def test_an_unsupported_field_is_a_400_naming_it(client, path, field, value):
    r = client.post(path, json=body(path, **{field: value}))
    assert_refused(client, r, field)
    if field in ("reasoning_effort", "frobnicate"):
        assert "unknown field" in r.json()["error"]["message"]


@pytest.mark.parametrize("field", MESSAGE_REFUSED)
def test_a_message_field_the_template_would_lose_is_a_400(client, field):
    message = {"role": "assistant", "content": "w1", field: MESSAGE_REFUSED[field]}
    messages = [{"role": "user", "content": "w1 w2"}, message, {"role": "user", "content": "w3"}]
    assert_refused(client, client.post(CHAT, json=body(CHAT, messages=messages)), f"messages.1.{field}")


def test_stream_options_refuses_an_unknown_option(client):
    r = client.post(CHAT, json=body(CHAT, stream=True, stream_options={"include_usage": True, "x": 1}))
    assert_refused(client, r, "stream_options.x")


NO_OPS = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "logit_bias": {},
    "service_tier": "auto",
    "store": False,
    "metadata": {"team": "a"},
    "prompt_cache_key": "k",
    "safety_identifier": "s",
    "user": "u-1",
}
CHAT_NO_OPS = {
    "logprobs": False,
    "top_logprobs": 0,
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "modalities": ["text"],
    "parallel_tool_calls": None,
}
COMPLETION_NO_OPS = {"echo": False, "best_of": 1, "suffix": "", "logprobs": None}


@pytest.mark.parametrize(("path", "extra"), [(CHAT, CHAT_NO_OPS), (COMPLETIONS, COMPLETION_NO_OPS)])
def test_no_op_values_are_accepted_and_change_nothing(client, path, extra):
    plain = client.post(path, json=body(path)).json()
    r = client.post(path, json=body(path, **NO_OPS, **extra))
    assert r.status_code == 200, r.text
    text = "message" if path == CHAT else "text"
    first = r.json()["choices"][0]
    assert first.get(text) == plain["choices"][0].get(text) and first["logprobs"] is None
    messages = [{"role": "assistant", "content": "w1", "name": "bot", "tool_calls": [], "refusal": None}]
    if path == CHAT:
        assert client.post(CHAT, json=body(CHAT, messages=[*messages, {"role": "user", "content": "w2"}])).is_success


def test_the_official_openai_client_works_as_it_sends_requests(client):
    api = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)
    messages = [{"role": "user", "content": "w1 w2"}]
    chat = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1
    chunks = list(
        api.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content and chunks[-1].usage is not None
    # the earlier answer sent back as the client returns it: a history as people build it
    again = api.chat.completions.create(
        model=MODEL, messages=[*messages, chat.choices[0].message, {"role": "user", "content": "w3"}], max_tokens=2
    )
    assert again.choices[0].finish_reason in ("stop", "length")
    assert api.completions.create(model=MODEL, prompt="w1 w2", max_tokens=2).choices[0].text is not None
    assert [m.id for m in api.models.list()] == [MODEL] and api.models.retrieve(MODEL).id == MODEL


def test_retrieve_a_model(client):
    r = client.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200
    card = r.json()
    assert (card["id"], card["object"], card["owned_by"]) == (MODEL, "model", "coinfer") and card["created"] > 0
    for other in ("gpt-4o", "org/tiny"):
        r = client.get(f"/v1/models/{other}")
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "model_not_found", "model")
        assert other in err["message"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("get", "/healthz", {}),
        ("get", "/v1/models", {}),
        ("get", "/nowhere", {}),
        ("post", CHAT, {"json": body(CHAT)}),
        ("post", CHAT, {"json": body(CHAT, stream=True)}),
        ("post", COMPLETIONS, {"json": body(COMPLETIONS, n=2)}),
        ("post", COMPLETIONS, {"content": b"x" * 5000}),  # 413 from the body limit
    ],
)
def test_every_response_has_a_request_id_and_echoes_a_sane_one(client, method, path, kwargs):
    r = client.request(method, path, **kwargs)
    generated = r.headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    again = client.request(method, path, headers={"X-Request-Id": "client-req 7/a"}, **kwargs)
    assert again.headers["x-request-id"] == "client-req 7/a"
    too_long = client.request(method, path, headers={"X-Request-Id": "r" * 129}, **kwargs)
    assert too_long.headers["x-request-id"] != "r" * 129 and len(too_long.headers["x-request-id"]) == 32
    assert len(r.headers.get_list("x-request-id")) == 1


def test_the_log_line_about_a_request_names_its_id(client, monkeypatch, caplog):
    def broken_template(messages):
        raise RuntimeError("template bug")

    monkeypatch.setattr(client.app.state.logic.engine.tokenizer, "encode_chat", broken_template)
    with caplog.at_level(logging.WARNING, logger="coinfer.device"):
        r = client.post(CHAT, json=body(CHAT), headers={"X-Request-Id": "trace-%s-1"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "trace-%s-1"
    assert any("[request trace-%s-1]" in rec.getMessage() for rec in caplog.records), caplog.records
