"""Issue 20's edge rules as pure functions and store operations (no sockets): the watchdog's rule, the
resume capability, the prefix names a resumed session keeps, whose bearer names a client, and the
settings that refuse an unsafe deployment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from coinfer import wire
from coinfer.prefix import BLOCK, PrefixChain, seed
from edge_server import security
from edge_server.config import EdgeSettings
from edge_server.deadlines import Watched, overdue
from edge_server.sessions import SessionStore, _state_at
from tests.support.kv_store import PER_CHUNK, fill, tail_session

NOP = lambda: None  # noqa: E731


@pytest.mark.parametrize(
    "deadline, expired, now, late",
    [
        (None, "", 100.0, False),  # not waiting for its device
        (100.0, "", 99.9, False),  # waiting, within its deadline
        (100.0, "", 100.0, True),  # due
        (50.0, "", 100.0, True),
        (50.0, "already ended", 100.0, False),  # cancelled once is enough
    ],
)
def test_overdue_streams(deadline, expired, now, late):
    w = Watched(NOP, deadline, expired)
    assert (overdue([w], now) == [w]) is late


def _kept(store: SessionStore, sid: str, token: bytes, n: int = 37):
    s = tail_session(sid)
    s.owner, s.resume_token = "peer:1", token
    s.chain = PrefixChain.over(seed("fp", 1, "f32", "fp32"), list(range(n)))
    fill(store, s, n)
    assert store.keep(s)
    return s


def test_resume_needs_the_sessions_own_token():
    store = SessionStore(max_sessions=8, budget_bytes=64 * PER_CHUNK)
    _kept(store, "a", b"t" * 16)
    for token in (b"", b"u" * 16, b"t" * 15):
        thief = tail_session("a")
        thief.owner = "peer:1"
        assert not store.resume(thief, 10, token)
    owner = tail_session("a")
    owner.owner = "peer:1"
    assert store.resume(owner, 10, b"t" * 16) and owner.cache.length == 10


def test_a_session_resumed_in_mid_block_keeps_the_names_it_started_from():
    store = SessionStore(max_sessions=8, budget_bytes=64 * PER_CHUNK)
    first = _kept(store, "a", b"t" * 16)
    again = tail_session("a")
    again.owner = "peer:1"
    assert store.resume(again, 2 * BLOCK + 3, b"t" * 16)
    assert again.start_state is None  # mid-block: the chain's state there is unknown
    assert again.chain_blocks == first.chain.blocks[:2]
    fill(store, again, 4)  # the resumed stream adds positions but names nothing new
    assert store.keep(again)
    later = tail_session("b")
    later.owner = "peer:1"
    assert store.claim(later, [(first.chain.blocks[1], 2 * BLOCK)]) == 2 * BLOCK  # still claimable


def test_state_at_block_boundaries_and_the_whole_chain():
    store = SessionStore(max_sessions=8, budget_bytes=64 * PER_CHUNK)
    s = _kept(store, "a", b"t" * 16, n=40)
    kept = next(iter(store._kept.values()))
    assert _state_at(kept, 40) == s.chain.state
    assert _state_at(kept, 32) == s.chain.blocks[1] and _state_at(kept, 16) == s.chain.blocks[0]
    assert _state_at(kept, 33) is None and _state_at(kept, 0) is None


class _Ctx:
    def __init__(self, metadata, peer="ipv4:127.0.0.1:5555"):
        self._metadata, self._peer = metadata, peer

    def auth_context(self):
        return {}

    def invocation_metadata(self):
        return self._metadata

    def peer(self):
        return self._peer


def test_a_bearer_names_the_client_only_where_tokens_are_checked():
    ctx = _Ctx(wire.bearer_metadata("anything"))
    assert security.identity(ctx, tokens_required=True) == security.token_identity("anything")
    # unchecked, a client could pick a new identity per call and slip past the per-client limits
    assert security.identity(ctx, tokens_required=False) == "peer:ipv4:127.0.0.1"


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"auth_tokens": "REPLACE-ME-agent-token,abc"}, "placeholder"),
        ({"max_streams": 48, "workers": 48}, "below workers"),
    ],
)
def test_unsafe_settings_are_refused(settings, message):
    with pytest.raises(ValidationError) as e:
        EdgeSettings(**settings)
    assert message in str(e.value)
