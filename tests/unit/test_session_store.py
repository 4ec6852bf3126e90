"""The edge's KV store without sockets: budget accounting, eviction order, keep/claim, timeouts, prefix
names; the device's head caches. (The wire checks on prefix hashes against a live edge:
tests/component/test_session_store.py.)"""

from __future__ import annotations

import pytest

from coinfer.model.kv_cache import KVCache
from coinfer.prefix import BLOCK, PrefixChain, offer_lengths, seed
from device_agent.edge.head_caches import HeadCacheStore
from edge_server.sessions import SessionEvicted, SessionLimitError, SessionStore
from tests.support.kv_store import CHUNK, PER_CHUNK, fill, keep_finished, tail_session


def test_reserve_counts_bytes_and_evicts_idle_sessions_lru():
    store = SessionStore(max_sessions=8, budget_bytes=3 * PER_CHUNK)
    a, b, c, d = (tail_session(x) for x in "abcd")
    with store.hold("a", a), store.hold("b", b), store.hold("c", c), store.hold("d", d):
        for s in (a, b, c):
            fill(store, s, 10)
        assert store.used_bytes == 3 * PER_CHUNK
        store.pin(c)
        b.last_used, a.last_used = 1.0, 2.0  # b is the least recently used
        fill(store, d, 10)
        assert b.evicted and not a.evicted and store.used_bytes == 3 * PER_CHUNK
        with pytest.raises(SessionEvicted):
            store.pin(b)
        store.pin(a)
        store.pin(d)
        with pytest.raises(SessionLimitError) as e:  # everybody else is busy: no room
            fill(store, d, 10)
        assert e.value.retry_after > 0
        assert store.peak_bytes <= store.budget and store.stats.evicted_live == 1
    assert store.used_bytes == 0 and len(store) == 0


def test_session_limit_with_retry_hint():
    store = SessionStore(max_sessions=1, budget_bytes=1 << 20)
    with store.hold("a", tail_session("a")):
        with pytest.raises(SessionLimitError) as e, store.hold("b", tail_session("b")):
            pass
        assert 0.1 <= e.value.retry_after <= 30


def test_keep_then_claim_the_longest_matching_prefix():
    store = SessionStore(max_sessions=8, budget_bytes=64 * PER_CHUNK)
    ids = list(range(100, 150))  # 50 tokens: blocks at 16, 32, 48
    with store.hold("a", a := tail_session("a")):
        keep_finished(store, a, ids)
        a_blocks = list(a.chain.blocks)
    assert store.kept_count == 1 and store.used_bytes == a.cache.nbytes + PER_CHUNK * 4  # kept, not freed
    kept_bytes = store.used_bytes
    turn2 = ids[:40] + [7] * 20  # diverges after 40 tokens: blocks 16 and 32 match
    chain = PrefixChain.over(seed("fp", 1, "f32", "fp32"), turn2)
    offers = [(chain.blocks[n // BLOCK - 1], n) for n in (48, 32, 16)]
    with store.hold("b", b := tail_session("b")):
        assert store.claim(tail_session("x", split=2), offers) == 0  # other split: no match
        assert store.claim(b, [(h, n + 1) for h, n in offers]) == 0  # lengths off the block grid
        assert store.claim(b, offers) == 32  # 48 diverged; the longest held is 32
        assert b.cache.length == 32 and b.chain_blocks == a_blocks[:2]
        assert store.kept_count == 0 and store.used_bytes == kept_bytes
    assert store.used_bytes == 0 and store.stats.prefix_hits == 1 and store.stats.prefix_tokens == 32


def test_kept_caches_go_first_and_expire():
    store = SessionStore(max_sessions=8, budget_bytes=4 * PER_CHUNK, keep_seconds=10)
    with store.hold("a", a := tail_session("a")):
        keep_finished(store, a, list(range(20)))  # 2 chunks kept
    with store.hold("b", b := tail_session("b")), store.hold("c", c := tail_session("c")):
        fill(store, b, 20)
        fill(store, c, 10)  # needs room: the kept cache goes, not the idle live session b
        assert store.kept_count == 0 and not b.evicted and store.stats.evicted_kept == 1
    with store.hold("d", d := tail_session("d")):
        keep_finished(store, d, list(range(20)))
    store.reap(now=d.last_used + 5)
    assert store.kept_count == 1
    store.reap(now=float("inf"))
    assert store.kept_count == 0 and store.used_bytes == 0 and store.stats.expired == 1


def test_idle_live_sessions_time_out():
    store = SessionStore(max_sessions=8, budget_bytes=4 * PER_CHUNK, idle_timeout=30)
    with store.hold("a", a := tail_session("a")), store.hold("b", b := tail_session("b")):
        fill(store, a, 5)
        fill(store, b, 5)
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
