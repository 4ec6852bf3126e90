"""The device agent's own limits (issue 20 item 7): body size (413), concurrent generations (503 +
Retry-After), health under load, cancelling a generation whose client left, error bodies that keep
internal text to the log, and affinity keys that are safe gRPC metadata.

The tiny model runs on the device alone (no edge); a gate around the head's next_token holds
generations in flight for as long as a test needs, without burning CPU. Real uvicorn on port 0 with raw
sockets where the test needs a real connection (a client that hangs up, headers without a body).
(The ASGI-only upload check and the edge error mapping: tests/unit/test_agent_limits.py.)"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import jinja2
import pytest
import uvicorn
from fastapi.testclient import TestClient

from tests.support.agent_app import MODEL, completion, device_only_engine, make_app


@pytest.fixture(scope="module")
def engine(tiny_dir):
    with device_only_engine(tiny_dir) as e:
        yield e


class Gate:
    """Wraps the head's next_token: counts calls; from call `hold_at` on, each waits for `opened` and then
    for `pace` seconds (a slow device), so generations stay in flight until the test lets them go."""

    def __init__(self, real, hold_at: int = 1, pace: float = 0.0) -> None:
        self.real, self.hold_at, self.pace = real, hold_at, pace
        self.calls, self._lock, self.opened = 0, threading.Lock(), threading.Event()

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
            n = self.calls
        if n >= self.hold_at:
            assert self.opened.wait(30), "the test never opened the gate"
            time.sleep(self.pace)
        return self.real(*args, **kwargs)

    def wait_calls(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.calls < n:
            assert time.monotonic() < deadline, f"{self.calls} of {n} generations reached the model"
            time.sleep(0.01)


@pytest.fixture
def gate(engine, monkeypatch):
    def install(hold_at: int = 1, pace: float = 0.0) -> Gate:
        g = Gate(engine.head.next_token, hold_at, pace)
        monkeypatch.setattr(engine.head, "next_token", g)
        return g

    yield install


@contextmanager
def serve(app) -> Iterator[int]:
    """uvicorn on 127.0.0.1, a free port, in a thread (its lifespan runs, as in the real agent)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(15)


def send_raw(
    port: int, path: str, body: dict | None = None, headers: str = "", length: int | None = None
) -> socket.socket:
    """A request written on its own socket, not waiting for the answer (read it with `status_of`)."""
    data = json.dumps(body).encode() if body is not None else b""
    length = len(data) if length is None else length
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{headers}\r\n".encode()
        + data
    )
    return sock


def status_of(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "connection closed without an answer"
        head += chunk
    return int(head.split(b" ", 2)[1])


def sample(engine, name: str, **labels) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def wait_for(predicate, timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# -- 1. body size --------------------------------------------------------------------------------
def test_declared_body_over_the_limit_is_413_before_it_is_sent(engine):
    """Only the headers go out: the answer must come from Content-Length alone."""
    with serve(make_app(engine, max_request_bytes=4096)) as port:
        sock = send_raw(port, "/v1/completions", length=10 << 20)
        raw = b""
        while chunk := sock.recv(65536):  # Connection: close -> the server ends the connection
            raw += chunk
        sock.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] == b"413", raw[:200]
        assert json.loads(body)["error"]["code"] == "request_too_large"
        # and the agent serves on
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=completion(2), timeout=30)
        assert r.status_code == 200, r.text


def test_chunked_body_over_the_limit_is_413(engine):
    with TestClient(make_app(engine, max_request_bytes=4096)) as c:

        def chunks():
            for _ in range(8):
                yield b" " * 1024

        r = c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        small = json.dumps(completion(2)).encode() + b" " * 3000  # under the limit: read whole and served
        assert len(small) < 4096
        r = c.post(
            "/v1/completions", content=iter([small[:700], small[700:]]), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 200, r.text


# -- 2 and 3. concurrent generations, and health under load -------------------------------------
def test_cap_answers_503_at_once_health_answers_and_the_agent_serves_on(engine, gate):
    """As many gated generations as the cap, half streamed; anyio's default pool has 40 threads, so a cap
    of 40 would take them all unless the agent sized the pool above it."""
    cap = 40
    g = gate()
    with serve(make_app(engine, max_concurrent_requests=cap)) as port:
        base = f"http://127.0.0.1:{port}"
        socks = [send_raw(port, "/v1/completions", completion(stream=bool(i % 2))) for i in range(cap)]
        g.wait_calls(cap)
        t0 = time.monotonic()
        r = httpx.post(f"{base}/v1/completions", json=completion(), timeout=5)
        assert time.monotonic() - t0 < 1, "the request over the cap waited instead of being refused"
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "overloaded" and err["type"] == "server_error"
        for path in ("/healthz", "/readyz", "/metrics", "/v1/models"):  # /v1/models needs a worker thread
            t0 = time.monotonic()
            assert httpx.get(base + path, timeout=5).status_code == 200, path
            assert time.monotonic() - t0 < 1, f"{path} was starved by the generations"
        g.opened.set()
        assert [status_of(s) for s in socks] == [200] * cap
        for s in socks:
            s.close()
        r = httpx.post(f"{base}/v1/completions", json=completion(), timeout=30)
        assert r.status_code == 200, r.text


def test_a_streamed_generation_holds_its_slot_until_the_client_hangs_up(engine, gate):
    g = gate(hold_at=2, pace=0.01)
    app = make_app(engine, max_concurrent_requests=1)
    tokens0 = sample(engine, "coinfer_generated_tokens_total", split_kind="device")
    with serve(app) as port:
        base = f"http://127.0.0.1:{port}"
        sock = send_raw(port, "/v1/completions", completion(200, stream=True))
        g.wait_calls(2)
        assert status_of(sock) == 200  # streaming: its first token is out
        r = httpx.post(f"{base}/v1/completions", json=completion(), timeout=5)
        assert r.status_code == 503 and r.headers["retry-after"]
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        g.opened.set()
        wait_for(lambda: app.state.logic.slots.active == 0, what="the stream's slot to be released")
        assert sample(engine, "coinfer_active_requests") == 0
        assert sample(engine, "coinfer_generated_tokens_total", split_kind="device") - tokens0 < 200
        r = httpx.post(f"{base}/v1/completions", json=completion(2), timeout=30)
        assert r.status_code == 200, r.text


# -- 4. a non-streamed request whose client hangs up ---------------------------------------------
def test_non_streamed_generation_stops_when_its_client_disconnects(engine, gate):
    g = gate(hold_at=3, pace=0.01)
    app = make_app(engine)
    tokens0 = sample(engine, "coinfer_generated_tokens_total", split_kind="device")
    gone0 = sample(engine, "coinfer_requests_total", route="/v1/completions", status="499")
    with serve(app) as port:
        sock = send_raw(port, "/v1/completions", completion(200))
        g.wait_calls(3)
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        g.opened.set()
        wait_for(
            lambda: sample(engine, "coinfer_requests_total", route="/v1/completions", status="499") > gone0,
            what="the request to end as 499 (client closed)",
        )
        assert sample(engine, "coinfer_active_requests") == 0  # the engine's iterator was closed
        assert sample(engine, "coinfer_generated_tokens_total", split_kind="device") - tokens0 < 200
        assert app.state.logic.slots.active == 0


# -- 5. error bodies --------------------------------------------------------------------------------
SECRET = "/srv/secret/token=hunter2"


def test_internal_error_body_has_a_request_id_not_the_exception_text(engine, monkeypatch, caplog):
    monkeypatch.setattr(engine.tokenizer, "encode", raising(RuntimeError(f"cannot open {SECRET}")))
    with (
        TestClient(make_app(engine), raise_server_exceptions=False) as c,
        caplog.at_level(logging.ERROR, logger="coinfer.device"),
    ):
        r = c.post("/v1/completions", json=completion())
    assert r.status_code == 500
    err = r.json()["error"]
    assert SECRET not in r.text and "RuntimeError" not in r.text
    rid = r.headers["x-request-id"]
    assert rid in err["message"] and err["type"] == "server_error"
    logged = [rec for rec in caplog.records if rid in rec.getMessage()]
    assert logged and SECRET in str(logged[0].exc_info[1])  # the details stay in the log, under the id


def raising(exc: Exception):
    def fail(*args, **kwargs):
        raise exc

    return fail


def test_chat_template_failures_echo_only_the_templates_own_message(engine, monkeypatch):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "w1"}], "max_tokens": 2}
    with TestClient(make_app(engine)) as c:
        monkeypatch.setattr(engine.tokenizer, "encode_chat", raising(TypeError(f"bad {SECRET}")))
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and SECRET not in r.text and r.json()["error"]["param"] == "messages"
        monkeypatch.setattr(
            engine.tokenizer, "encode_chat", raising(jinja2.TemplateError("roles must alternate user/assistant"))
        )
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and "roles must alternate" in r.json()["error"]["message"]


# -- 6. affinity keys become gRPC metadata ---------------------------------------------------------
@pytest.mark.parametrize("user", ["caf\u00e9", "a\x01b", "tab\there", "x" * 129, ""])
def test_user_that_cannot_be_grpc_metadata_is_400(engine, user):
    with TestClient(make_app(engine)) as c:
        r = c.post("/v1/completions", json=completion(2, user=user))
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "user" and "printable ASCII" in err["message"]
        assert c.post("/v1/completions", json=completion(2, user="user-42 <a@b.c>")).status_code == 200


@pytest.mark.parametrize("value", ["caf\u00e9".encode("latin-1"), b"a\x01b", b"x" * 129])
def test_session_header_that_cannot_be_grpc_metadata_is_400(engine, value):
    with TestClient(make_app(engine)) as c:
        r = c.post("/v1/completions", json=completion(2), headers={"X-Session-Id": value})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "X-Session-Id" and "X-Session-Id" in err["message"]
        assert c.post("/v1/completions", json=completion(2), headers={"X-Session-Id": "conv-7"}).status_code == 200


def test_valid_affinity_keys_reach_the_generation_request(engine, monkeypatch):
    seen = []
    with TestClient(make_app(engine)) as c:
        logic = c.app.state.logic
        real = logic.collect

        def spy(req, cancel=None):
            seen.append(req.affinity)
            return real(req, cancel)

        monkeypatch.setattr(logic, "collect", spy)
        c.post("/v1/completions", json=completion(2, user="alice"))
        c.post("/v1/completions", json=completion(2, user="alice"), headers={"X-Session-Id": "conv-7"})
    assert seen == ["alice", "conv-7"]
