"""The edge's KV store without sockets: budget accounting, eviction order, keep/claim, timeouts;
and the wire checks on prefix hashes."""

from __future__ import annotations

import grpc
import pytest
from coinfer.model.kv_cache import KVCache
from coinfer.model.sampling import Sampler
from coinfer.prefix import BLOCK, PrefixChain, offer_lengths, seed
from coinfer.v1 import edge_pb2 as pb
from device_agent.prefix_cache import HeadCacheStore
from edge_server.sessions import SessionEvicted, SessionLimitError, SessionStore
from edge_server.tail import TailSession
from tests.serving import edge_server, hidden_frame, open_msg, session, stub

CHUNK = 16
PER_CHUNK = 2 * 2 * 1 * 4 * CHUNK * 4  # k and v, 2 layers, 1 KV head, head dim 4, f32


def _session(sid: str, split: int = 1, codec: str = "f32") -> TailSession:
    cache = KVCache(2, 1, 4, chunk=CHUNK)
    return TailSession(split, codec, None, cache, Sampler(), session_id=sid)


def _fill(store: SessionStore, s: TailSession, n: int) -> None:
    store.reserve(s, s.cache.length + n)
    s.cache.advance(n)


def test_reserve_counts_bytes_and_evicts_idle_sessions_lru():
    store = SessionStore(max_sessions=8, budget_bytes=3 * PER_CHUNK)
    a, b, c, d = (_session(x) for x in "abcd")
    with store.hold("a", a), store.hold("b", b), store.hold("c", c), store.hold("d", d):
        for s in (a, b, c):
            _fill(store, s, 10)
        assert store.used_bytes == 3 * PER_CHUNK
        store.pin(c)
        b.last_used, a.last_used = 1.0, 2.0  # b is the least recently used
        _fill(store, d, 10)
        assert b.evicted and not a.evicted and store.used_bytes == 3 * PER_CHUNK
        with pytest.raises(SessionEvicted):
            store.pin(b)
        store.pin(a)
        store.pin(d)
        with pytest.raises(SessionLimitError) as e:  # everybody else is busy: no room
            _fill(store, d, 10)
        assert e.value.retry_after > 0
        assert store.peak_bytes <= store.budget and store.stats.evicted_live == 1
    assert store.used_bytes == 0 and len(store) == 0


def test_session_limit_with_retry_hint():
    store = SessionStore(max_sessions=1, budget_bytes=1 << 20)
    with store.hold("a", _session("a")):
        with pytest.raises(SessionLimitError) as e, store.hold("b", _session("b")):
            pass
        assert 0.1 <= e.value.retry_after <= 30


def _finish(store: SessionStore, s: TailSession, ids: list[int]) -> None:
    """Give s a chain over ids and a cache holding them, then keep it."""
    s.chain = PrefixChain.over(seed("fp", s.split, s.codec, "fp32"), ids)
    _fill(store, s, len(ids))
    assert store.keep(s)


def test_keep_then_claim_the_longest_matching_prefix():
    store = SessionStore(max_sessions=8, budget_bytes=64 * PER_CHUNK)
    ids = list(range(100, 150))  # 50 tokens: blocks at 16, 32, 48
    with store.hold("a", a := _session("a")):
        _finish(store, a, ids)
        a_blocks = list(a.chain.blocks)
    assert store.kept_count == 1 and store.used_bytes == a.cache.nbytes + PER_CHUNK * 4  # kept, not freed
    kept_bytes = store.used_bytes
    turn2 = ids[:40] + [7] * 20  # diverges after 40 tokens: blocks 16 and 32 match
    chain = PrefixChain.over(seed("fp", 1, "f32", "fp32"), turn2)
    offers = [(chain.blocks[n // BLOCK - 1], n) for n in (48, 32, 16)]
    with store.hold("b", b := _session("b")):
        assert store.claim(_session("x", split=2), offers) == 0  # other split: no match
        assert store.claim(b, [(h, n + 1) for h, n in offers]) == 0  # lengths off the block grid
        assert store.claim(b, offers) == 32  # 48 diverged; the longest held is 32
        assert b.cache.length == 32 and b.chain_blocks == a_blocks[:2]
        assert store.kept_count == 0 and store.used_bytes == kept_bytes
    assert store.used_bytes == 0 and store.stats.prefix_hits == 1 and store.stats.prefix_tokens == 32


def test_kept_caches_go_first_and_expire():
    store = SessionStore(max_sessions=8, budget_bytes=4 * PER_CHUNK, keep_seconds=10)
    with store.hold("a", a := _session("a")):
        _finish(store, a, list(range(20)))  # 2 chunks kept
    with store.hold("b", b := _session("b")), store.hold("c", c := _session("c")):
        _fill(store, b, 20)
        _fill(store, c, 10)  # needs room: the kept cache goes, not the idle live session b
        assert store.kept_count == 0 and not b.evicted and store.stats.evicted_kept == 1
    with store.hold("d", d := _session("d")):
        _finish(store, d, list(range(20)))
    store.reap(now=d.last_used + 5)
    assert store.kept_count == 1
    store.reap(now=float("inf"))
    assert store.kept_count == 0 and store.used_bytes == 0 and store.stats.expired == 1


def test_idle_live_sessions_time_out():
    store = SessionStore(max_sessions=8, budget_bytes=4 * PER_CHUNK, idle_timeout=30)
    with store.hold("a", a := _session("a")), store.hold("b", b := _session("b")):
        _fill(store, a, 5)
        _fill(store, b, 5)
        store.pin(b)
        store.reap(now=a.last_used + 31)
        assert a.evicted and not b.evicted and store.used_bytes == PER_CHUNK


def test_a_chain_names_prefixes_the_same_way_on_both_sides():
    s = seed("fp", 3, "f16", "fp32")
    whole = PrefixChain.over(s, list(range(40)))
    part = PrefixChain.over(s, list(range(20)))
    part.extend(list(range(20, 40)))  # the edge extends the device's chain over generated tokens
    assert whole.blocks == part.blocks and len(whole.blocks) == 40 // BLOCK and whole.state == part.state
    assert PrefixChain.over(seed("fp", 3, "int8", "fp32"), list(range(40))).blocks[0] != whole.blocks[0]
    assert seed("fp", 0, "f16", "int8") == seed("fp", 0, "f32", "fp32")  # k = 0: only token ids matter


@pytest.mark.parametrize("bad", [
    {"prefix_hashes": [b"short"], "prefix_lengths": [16]},
    {"prefix_hashes": [bytes(16)], "prefix_lengths": []},
    {"prefix_hashes": [bytes(16)] * 65, "prefix_lengths": [16] * 65},
])
def test_malformed_prefix_offers_are_invalid_argument(tiny_dir, bad):
    with edge_server(tiny_dir) as edge, stub(f"127.0.0.1:{edge.grpc_port}") as s:
        fp = edge.service.runner.fingerprint
        with pytest.raises(grpc.RpcError) as e:
            session(s, [open_msg(fp, 0, **bad)])
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # an offer the edge does not hold is no error: it holds 0
        replies = session(s, [open_msg(fp, 0, max_new=2, prefix_hashes=[bytes(16)], prefix_lengths=[16]),
                              pb.DeviceMessage(prefill=pb.Prefill(token_ids=list(range(20))))])
        assert replies[0].opened.cached_tokens == 0 and replies[-1].WhichOneof("kind") == "done"
        # block hashes that do not cover the blocks the prefill completes
        for hashes, state in (([bytes(16)] * 3, bytes(16)), ([bytes(16)], b"x")):
            with pytest.raises(grpc.RpcError) as e:
                session(s, [open_msg(fp, 3), pb.DeviceMessage(prefill=pb.Prefill(
                    frame=hidden_frame(tiny_dir, list(range(20)), 3), block_hashes=hashes, chain_state=state))])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "block_hashes" in e.value.details()
        replies = session(s, [open_msg(fp, 0, max_new=3), pb.DeviceMessage(prefill=pb.Prefill(token_ids=[1, 2, 3]))])
        assert replies[-1].WhichOneof("kind") == "done"  # still serving


def test_chunked_prefill_equals_one_shot(tiny_dir):
    ids = list(range(3, 90))
    outs = []
    for chunk in (1000, 7):
        with edge_server(tiny_dir, prefill_chunk_tokens=chunk, prefix_reuse=False) as edge, \
                stub(f"127.0.0.1:{edge.grpc_port}") as s:
            replies = session(s, [open_msg(edge.service.runner.fingerprint, 0, max_new=6),
                                  pb.DeviceMessage(prefill=pb.Prefill(token_ids=ids))])
            outs.append([r.token.id for r in replies if r.WhichOneof("kind") == "token"])
            chunks = next(m.samples[0].value for m in edge.service.metrics.registry.collect()
                          if m.name == "coinfer_prefill_chunks")
            assert chunks == (1 if chunk == 1000 else -(-len(ids) // 7))
    assert outs[0] == outs[1] and len(outs[0]) == 6


def test_offers_start_at_the_longest_reusable_block_and_halve():
    assert offer_lengths(15) == [] and offer_lengths(16) == [16]
    assert offer_lengths(100) == [96, 80, 48, 16]
    assert all(n % BLOCK == 0 for n in offer_lengths(2000)) and len(offer_lengths(2000)) < 10


def test_device_head_caches_by_split_and_longest_prefix():
    store = HeadCacheStore(budget_bytes=10 * PER_CHUNK, max_entries=3)
    a = KVCache(2, 1, 4, chunk=CHUNK)
    a.reserve(40)
    a.advance(40)
    store.put(3, list(range(50)), a)  # only the 40 positions the cache holds count
    store.put(0, list(range(100, 140)), None)  # split 0: ids only
    assert store.take(5, list(range(50))) == (None, 0)
    assert store.reusable(list(range(45)) + [999]) == {3: 32}  # what the planner is told, nothing taken
    cache, n = store.take(3, list(range(45)) + [999])
    assert cache is a and n == 32 and len(store) == 1  # 40 held, cut to whole blocks
    assert store.take(0, list(range(100, 140))) == (None, 32)  # one token must be left to run
    for i in range(5):
        store.put(0, [i] * 20, None)
    assert len(store) == 3  # max entries, oldest first out
