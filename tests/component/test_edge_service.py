"""The edge's gRPC service on the tiny model, over a real socket: contract, statuses, clean-up. (Its
load tracker alone: tests/unit/test_edge_service.py.)"""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from coinfer.model.weights import read_fingerprint
from coinfer.v1 import edge_pb2 as pb
from tests.support.edge import address, edge_server, open_msg, session, stub, wait_sessions
from tests.support.reference import greedy_reference, hidden_frame

PROMPT = [5, 9, 17, 33, 8, 61, 20, 7]


@pytest.fixture(scope="module")
def edge(tiny_dir):
    with edge_server(tiny_dir, max_sessions=3, max_new_tokens=64) as srv:
        yield srv


@pytest.fixture(scope="module")
def fp(tiny_dir):
    return read_fingerprint(tiny_dir)


def code_of(e: pytest.ExceptionInfo) -> grpc.StatusCode:
    return e.value.code()


def test_describe_probe_health_reflection(edge, fp):
    with stub(address(edge)) as s:
        d = s.Describe(pb.DescribeRequest(), timeout=5)
        assert (d.fingerprint, d.num_layers, d.hidden_size, d.min_split) == (fp, 6, 64, 0)
        assert set(d.codecs) >= {"f32", "f16", "int8", "int4"} and d.limits.max_sessions == 3
        assert len(s.Probe(pb.ProbeRequest(payload=b"x" * 1000, reply_bytes=5000), timeout=5).payload) == 5000
        assert not d.HasField("profile")  # only when asked: the device polls the load often
        p = s.Describe(pb.DescribeRequest(include_profile=True), timeout=5).profile
        assert (p.start, p.stop, len(p.layer_decode_seconds), len(p.layer_prefill_seconds)) == (0, 6, 6, 6)
        assert all(x > 0 for x in p.layer_decode_seconds) and p.head_seconds > 0 and p.embed_seconds > 0
    with grpc.insecure_channel(address(edge)) as ch:
        h = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="coinfer.v1.EdgeInference"))
        assert h.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "coinfer.v1.EdgeInference" in {x.name for x in resp.list_services_response.service}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_split_session_greedy_equals_unsplit(edge, tiny_dir, fp, k):
    """Device side emulated by hand: prefill frame, then a Step frame per token."""
    import torch

    from coinfer import codec
    from coinfer.model import load_slice

    expected = greedy_reference(tiny_dir, PROMPT, 12)
    head = load_slice(tiny_dir, 0, k, embed=True, head=False)
    cache = head.new_cache()
    out = []
    with stub(address(edge)) as s, torch.inference_mode():
        import queue

        q: queue.Queue = queue.Queue()
        q.put(open_msg(fp, k, max_new=12))
        q.put(pb.DeviceMessage(prefill=pb.Prefill(frame=codec.encode(head(torch.tensor([PROMPT]), cache)[0], "f32"))))
        replies = s.Generate(iter(q.get, None), timeout=30)
        assert next(replies).WhichOneof("kind") == "opened"
        for msg in replies:
            if msg.WhichOneof("kind") == "done":
                assert msg.done.generated_tokens == 12 and msg.done.prompt_tokens == len(PROMPT)
                q.put(None)
                break
            tok = msg.token
            out.append(tok.id)
            assert tok.position == len(PROMPT) + len(out) - 1 and tok.timings.compute_seconds > 0
            if tok.finish_reason:
                assert tok.finish_reason == pb.FINISH_REASON_LENGTH
                continue
            q.put(pb.DeviceMessage(step=pb.Step(frame=codec.encode(head(torch.tensor([[tok.id]]), cache)[0], "f32"))))
    assert out == expected


def test_split_zero_streams_without_round_trips(edge, tiny_dir, fp):
    expected = greedy_reference(tiny_dir, PROMPT, 10)
    with stub(address(edge)) as s:
        # exactly two device messages: the edge must generate all 10 tokens on its own
        replies = session(s, [open_msg(fp, 0, max_new=10), pb.DeviceMessage(prefill=pb.Prefill(token_ids=PROMPT))])
    kinds = [r.WhichOneof("kind") for r in replies]
    assert kinds == ["opened"] + ["token"] * 10 + ["done"]
    assert [r.token.id for r in replies[1:-1]] == expected


def test_stop_ids_end_the_session(edge, tiny_dir, fp):
    """Seeded sampling (same stream as the local sampler) varies the tokens; the stop id ends it."""
    from coinfer.model import load_slice
    from coinfer.model.generation import generate, model_step
    from coinfer.model.sampling import SamplingParams

    params = SamplingParams(temperature=1.5, seed=11)
    ref = [t for t, _ in generate(model_step(load_slice(tiny_dir)), PROMPT, 30, params)]
    i = next(i for i in range(1, 30) if ref[i] not in ref[:i])  # first token not seen before
    with stub(address(edge)) as s:
        replies = session(
            s,
            [
                open_msg(fp, 0, max_new=30, stop_ids=[ref[i]], sampling=pb.Sampling(temperature=1.5, seed=11)),
                pb.DeviceMessage(prefill=pb.Prefill(token_ids=PROMPT)),
            ],
        )
    assert [r.token.id for r in replies[1:-1]] == ref[: i + 1]
    assert replies[-1].done.finish_reason == pb.FINISH_REASON_STOP


BAD = {
    "wrong fingerprint": ([open_msg("sha256:beef", 2)], grpc.StatusCode.FAILED_PRECONDITION),
    "split out of range": ([open_msg(None, 6)], grpc.StatusCode.INVALID_ARGUMENT),
    "split far out of range": ([open_msg(None, 99)], grpc.StatusCode.INVALID_ARGUMENT),
    "step before open": ([pb.DeviceMessage(step=pb.Step(frame=b"x"))], grpc.StatusCode.FAILED_PRECONDITION),
    "unknown codec": ([open_msg(None, 2, "int3")], grpc.StatusCode.INVALID_ARGUMENT),
    "zero max tokens": ([open_msg(None, 2, max_new=0)], grpc.StatusCode.INVALID_ARGUMENT),
    "too many tokens": ([open_msg(None, 2, max_new=65)], grpc.StatusCode.INVALID_ARGUMENT),
    "bad sampling": ([open_msg(None, 2, sampling=pb.Sampling(temperature=-1))], grpc.StatusCode.INVALID_ARGUMENT),
    "empty session id": ([open_msg(None, 2, session_id="")], grpc.StatusCode.INVALID_ARGUMENT),
    "garbage frame": (
        [open_msg(None, 2), pb.DeviceMessage(prefill=pb.Prefill(frame=b"\x00\x00\x00\x05garbage"))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "no frame at split > 0": (
        [open_msg(None, 2), pb.DeviceMessage(prefill=pb.Prefill())],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "token id out of vocab": (
        [open_msg(None, 0), pb.DeviceMessage(prefill=pb.Prefill(token_ids=[1, 96]))],
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    "step instead of prefill": (
        [open_msg(None, 2), pb.DeviceMessage(step=pb.Step(frame=b""))],
        grpc.StatusCode.FAILED_PRECONDITION,
    ),
    "two opens": ([open_msg(None, 2), open_msg(None, 2)], grpc.StatusCode.FAILED_PRECONDITION),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_gets_its_status_and_the_edge_keeps_serving(edge, fp, tiny_dir, name):
    messages, want = BAD[name]
    for m in messages:  # fill in the real fingerprint where the case is not about it
        if m.WhichOneof("kind") == "open" and m.open.fingerprint == "":
            m.open.fingerprint = fp
    with stub(address(edge)) as s:
        with pytest.raises(grpc.RpcError) as e:
            session(s, messages)
        assert code_of(e) == want, e.value.details()
        if name == "wrong fingerprint":
            assert "sha256:beef" in e.value.details() and fp in e.value.details()
        replies = session(s, [open_msg(fp, 0, max_new=4), pb.DeviceMessage(prefill=pb.Prefill(token_ids=PROMPT))])
        assert [r.token.id for r in replies[1:-1]] == greedy_reference(tiny_dir, PROMPT, 4)
    assert wait_sessions(edge, 0)


def test_prompt_over_context_limit(tiny_dir, fp):
    with edge_server(tiny_dir, max_context_tokens=16) as srv, stub(address(srv)) as s:
        with pytest.raises(grpc.RpcError) as e:
            session(s, [open_msg(fp, 0, max_new=10), pb.DeviceMessage(prefill=pb.Prefill(token_ids=PROMPT))])
        assert code_of(e) == grpc.StatusCode.INVALID_ARGUMENT and "context" in e.value.details()


def test_session_limit_and_vanishing_clients(edge, fp, tiny_dir):
    """Clients that open a session and vanish free it; beyond the limit -> RESOURCE_EXHAUSTED."""
    channels, calls = [], []
    for i in range(3):
        ch = grpc.insecure_channel(address(edge))
        import queue

        from coinfer.v1 import edge_pb2_grpc

        q: queue.Queue = queue.Queue()
        q.put(open_msg(fp, 2, session_id=f"hold-{i}"))
        call = edge_pb2_grpc.EdgeInferenceStub(ch).Generate(iter(q.get, None), timeout=30)
        assert next(call).WhichOneof("kind") == "opened"  # holds the session, sends nothing more
        channels.append(ch)
        calls.append(call)
    assert len(edge.service.sessions) == 3
    with stub(address(edge)) as s:
        with pytest.raises(grpc.RpcError) as e:
            session(s, [open_msg(fp, 0, session_id="one-too-many")])
        assert code_of(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
    for call, ch in zip(calls, channels, strict=True):
        call.cancel()
        ch.close()
    assert wait_sessions(edge, 0), "vanished clients' sessions were not freed"


def test_garbage_does_not_disturb_a_concurrent_session(edge, fp, tiny_dir):
    expected = greedy_reference(tiny_dir, PROMPT, 40)
    result = {}

    def healthy():
        with stub(address(edge)) as s:
            replies = session(
                s,
                [
                    open_msg(fp, 0, max_new=40, session_id="healthy"),
                    pb.DeviceMessage(prefill=pb.Prefill(token_ids=PROMPT)),
                ],
            )
            result["ids"] = [r.token.id for r in replies[1:-1]]

    t = threading.Thread(target=healthy)
    t.start()
    with stub(address(edge)) as s:
        for i in range(20):
            with pytest.raises(grpc.RpcError):
                session(
                    s,
                    [
                        open_msg(fp, 3, session_id=f"bad-{i}"),
                        pb.DeviceMessage(prefill=pb.Prefill(frame=bytes([i]) * 50)),
                    ],
                )
    t.join(30)
    assert result["ids"] == expected


def test_drain_refuses_new_sessions(tiny_dir, fp):
    with edge_server(tiny_dir) as srv:
        srv.service.draining.set()
        with stub(address(srv)) as s, pytest.raises(grpc.RpcError) as e:
            session(s, [open_msg(fp, 0)])
        assert code_of(e) == grpc.StatusCode.UNAVAILABLE


def test_prefill_frame_of_real_head(edge, tiny_dir, fp):
    frame = hidden_frame(tiny_dir, PROMPT, 4, "int8")
    with stub(address(edge)) as s:
        replies = session(s, [open_msg(fp, 4, "int8", max_new=1), pb.DeviceMessage(prefill=pb.Prefill(frame=frame))])
    assert [r.WhichOneof("kind") for r in replies] == ["opened", "token", "done"]


def test_half_close_before_the_end_frees_the_session(edge, fp):
    with stub(address(edge)) as s:
        assert session(s, []) == []  # no Open at all
        replies = session(
            s, [open_msg(fp, 2, max_new=5), pb.DeviceMessage(prefill=pb.Prefill(frame=hidden_frame_tiny(edge, 2)))]
        )
        assert [r.WhichOneof("kind") for r in replies] == ["opened", "token"]
    assert wait_sessions(edge, 0)


def hidden_frame_tiny(edge, k):
    return hidden_frame(edge.service.runner.model_dir, PROMPT, k)
