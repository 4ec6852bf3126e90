"""Issue 20 items 1 and 2: a session id is no capability (its resume token is), and a device cannot file
its cache under another prefix's name. Attacker and victim share one identity, as every device
behind one proxy without tokens does (here: the same loopback peer)."""

from __future__ import annotations

import grpc
import pytest

from coinfer import prefix, wire
from tests.hostile.conftest import PROMPT, Live, head_rows, open_, ops, prefill_ids, tokens
from tests.support.edge import session, stub
from tests.support.reference import greedy_reference


def test_ops_endpoints_do_not_list_session_ids(edge, channel, fp):
    live = Live(channel, open_(fp, split=2, session_id="secret-victim-id"))
    assert live.recv().WhichOneof("kind") == "opened"
    listed = ops(edge, "/v1/sessions")
    assert listed.status_code == 200 and len(listed.json()["sessions"]) == 1
    assert "secret-victim-id" not in listed.text and "resume_token" not in listed.text
    live.call.cancel()


def test_resume_without_the_token_takes_nothing(edge, tiny_dir, fp):
    expected = greedy_reference(tiny_dir, PROMPT, 6)
    with stub(edge.ready["grpc"]) as s:
        first = session(s, [open_(fp, session_id="v1"), prefill_ids(PROMPT)])
        token = first[0].opened.resume_token
        assert len(token) == 16 and tokens(first) == expected
        at = len(PROMPT) - 1  # the kept cache holds the prompt and more: go on from inside it
        for bad in (b"", b"x" * 16, bytes(16), token[:8]):  # a miss like any other: the device replays
            with pytest.raises(grpc.RpcError) as e:
                session(s, [open_(fp, session_id="v1", resume_tokens=at, resume_token=bad), prefill_ids(PROMPT[at:])])
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
            assert (wire.REPLAY_KEY, wire.SESSION_MISSING) in (e.value.trailing_metadata() or ())
        # the cache is still the victim's: its own resume goes on from it, with the same output
        again = session(s, [open_(fp, session_id="v1", resume_tokens=at, resume_token=token), prefill_ids(PROMPT[at:])])
        assert again[0].opened.resumed and again[0].opened.cached_tokens == at
        assert tokens(again) == expected


def test_resume_with_a_wrong_token_does_not_stop_a_live_victim(edge, channel, tiny_dir, fp):
    k = 2
    expected = greedy_reference(tiny_dir, PROMPT, 4)
    victim = Live(channel, open_(fp, split=k, max_new=4, session_id="v2"))
    assert victim.recv().opened.resume_token
    victim.send(pb_prefill_frame(tiny_dir, PROMPT, k))
    got = [victim.recv().token.id]
    with stub(edge.ready["grpc"]) as s, pytest.raises(grpc.RpcError) as e:
        session(s, [open_(fp, split=k, session_id="v2", resume_tokens=len(PROMPT), resume_token=b"y" * 16)], timeout=10)
    assert e.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS)
    history = PROMPT + got
    while len(got) < 4:  # the victim goes on undisturbed
        victim.send(step(tiny_dir, history, k))
        got.append(victim.recv().token.id)
        history.append(got[-1])
    victim.rest()
    assert got == expected


def test_resume_with_the_token_ends_the_old_stream_for_real(edge, channel, tiny_dir, fp):
    """A legitimate resume while the edge still runs the old stream (k > 0: its handler waits for a
    Step that never comes) cancels that stream and goes on; never ALREADY_EXISTS."""
    k = 2
    expected = greedy_reference(tiny_dir, PROMPT, 4)
    old = Live(channel, open_(fp, split=k, max_new=4, session_id="v3"))
    token = old.recv().opened.resume_token
    old.send(pb_prefill_frame(tiny_dir, PROMPT, k))
    first = old.recv().token.id
    history = PROMPT + [first]
    with stub(edge.ready["grpc"]) as s:
        replies = session(
            s,
            [
                open_(fp, split=k, max_new=3, session_id="v3", resume_tokens=len(PROMPT), resume_token=token),
                pb_frame_rows(tiny_dir, history, k, len(PROMPT)),
            ],
        )
        assert replies[0].opened.resumed
        got = tokens(replies)
    assert [first] + got[:1] == expected[:2]  # the first resumed token (the rest need steps)
    with pytest.raises(grpc.RpcError) as e:
        old.rest()
    assert e.value.code() == grpc.StatusCode.CANCELLED


def test_k0_prefix_names_must_match_the_ids(edge, tiny_dir, fp):
    common = list(range(10, 42))  # a 32-token "system prompt" every device starts with
    seed = prefix.seed(fp, 0, wire.TOKEN_IDS, "-")
    honest = prefix.PrefixChain.over(seed, common)
    forged = prefix.PrefixChain.over(seed, list(range(50, 82)))
    with stub(edge.ready["grpc"]) as s:
        # the attacker files its cache (other ids) under the common prefix's names: refused
        with pytest.raises(grpc.RpcError) as e:
            session(
                s,
                [
                    open_(fp, max_new=1, session_id="a1"),
                    prefill_ids(list(range(50, 82)), block_hashes=honest.blocks, chain_state=honest.state),
                ],
            )
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "do not match" in e.value.details()
        offer = dict(prefix_hashes=[honest.blocks[-1]], prefix_lengths=[32])
        victim = session(s, [open_(fp, max_new=4, session_id="v4", **offer), prefill_ids(common + [3])])
        assert victim[0].opened.cached_tokens == 0  # nothing was filed under that name
        assert tokens(victim) == greedy_reference(tiny_dir, common + [3], 4)
        # control: correct names are kept and claimed (so the refusal above is the check, not a miss)
        session(
            s,
            [
                open_(fp, max_new=1, session_id="h1"),
                prefill_ids(list(range(50, 82)), block_hashes=forged.blocks, chain_state=forged.state),
            ],
        )
        claim = session(
            s,
            [
                open_(fp, max_new=4, session_id="v5", prefix_hashes=[forged.blocks[-1]], prefix_lengths=[32]),
                prefill_ids([3]),
            ],
        )
        assert claim[0].opened.cached_tokens == 32
        assert tokens(claim) == greedy_reference(tiny_dir, list(range(50, 82)) + [3], 4)


def pb_prefill_frame(model_dir, ids, k):
    from coinfer.v1 import edge_pb2 as pb

    return pb.DeviceMessage(prefill=pb.Prefill(frame=head_rows(model_dir, ids, k)))


def pb_frame_rows(model_dir, ids, k, start):
    from coinfer.v1 import edge_pb2 as pb

    return pb.DeviceMessage(prefill=pb.Prefill(frame=head_rows(model_dir, ids, k, start)))


def step(model_dir, history, k):
    from coinfer.v1 import edge_pb2 as pb

    return pb.DeviceMessage(step=pb.Step(frame=head_rows(model_dir, history, k, len(history) - 1)))


def test_takeover_through_the_committed_nginx_config_fails(edge, tiny_dir, fp):
    """Behind nginx (deploy/nginx/nginx.conf) every device is one peer to the edge: still, a resume with
    the victim's id but not its token takes nothing, and the victim's own resume works."""
    from coinfer.tools.proxies import Proxy

    proxy = Proxy("nginx", [(edge.ready["grpc"], edge.ready["ops"])])
    try:
        expected = greedy_reference(tiny_dir, PROMPT, 5)
        with stub(proxy.address) as s:
            first = session(s, [open_(fp, max_new=5, session_id="nginx-victim"), prefill_ids(PROMPT)])
            token, at = first[0].opened.resume_token, len(PROMPT) - 1
            with pytest.raises(grpc.RpcError) as e:
                session(
                    s,
                    [
                        open_(fp, max_new=5, session_id="nginx-victim", resume_tokens=at, resume_token=b"z" * 16),
                        prefill_ids(PROMPT[at:]),
                    ],
                )
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            again = session(
                s,
                [
                    open_(fp, max_new=5, session_id="nginx-victim", resume_tokens=at, resume_token=token),
                    prefill_ids(PROMPT[at:]),
                ],
            )
        assert again[0].opened.resumed and tokens(again) == tokens(first) == expected
    finally:
        proxy.stop()
