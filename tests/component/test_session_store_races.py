"""The edge's KV store under a concurrent eviction: another session's reservation may evict a
session at any moment, also while that session is being kept for reuse (a race seen under a tight
KV budget, where it answered a later claim with INTERNAL). Threads, no sockets."""

from __future__ import annotations

import threading

from coinfer.prefix import BLOCK, PrefixChain, seed
from edge_server.sessions import SessionStore
from tests.support.kv_store import PER_CHUNK, fill, tail_session


class _EvictingChain(PrefixChain):
    """A chain whose first read of block names lets another thread try to evict the session."""

    def __init__(self, chain: PrefixChain, store: SessionStore, victim) -> None:
        super().__init__(chain.state, chain.length, chain.blocks)
        self.store, self.victim, self.evictor_done, self.started = store, victim, threading.Event(), False

    def blocks_within(self, length: int) -> list[bytes]:
        if not self.started:
            self.started = True

            def evict() -> None:
                self.store.evict(self.victim, "KV cache budget")
                self.evictor_done.set()

            threading.Thread(target=evict, daemon=True).start()
            self.evictor_done.wait(0.5)  # the store's lock, held by keep, keeps the evictor out
        return super().blocks_within(length)


def test_an_eviction_racing_keep_never_files_an_empty_cache():
    store = SessionStore(max_sessions=8, budget_bytes=64 * PER_CHUNK)
    ids = list(range(100, 140))  # blocks at 16 and 32
    base = seed("fp", 1, "f32", "fp32")
    with store.hold("a", a := tail_session("a")):
        fill(store, a, len(ids))
        chain = _EvictingChain(PrefixChain.over(base, ids), store, a)
        a.chain = chain
        kept = store.keep(a)
        chain.evictor_done.wait(5)
    # either keep won (the kept cache is whole) or the eviction did (nothing kept): never a kept
    # cache emptied under its names
    offers = [(chain.blocks[n // BLOCK - 1], n) for n in (32, 16)]
    with store.hold("b", b := tail_session("b")):
        got = store.claim(b, offers)
        assert got == (32 if kept else 0) and b.cache.length == got
    assert store.used_bytes == 0


def test_a_claim_never_takes_a_kept_cache_shorter_than_its_offer():
    store = SessionStore(max_sessions=8, budget_bytes=64 * PER_CHUNK)
    ids = list(range(100, 140))
    with store.hold("a", a := tail_session("a")):
        a.chain = PrefixChain.over(seed("fp", 1, "f32", "fp32"), ids)
        fill(store, a, len(ids))
        assert store.keep(a)
    (kept,) = store._kept.values()
    kept.cache.truncate(20)  # names for 32 positions over a cache of 20: not a match for 32
    offers = [(a.chain.blocks[n // BLOCK - 1], n) for n in (32, 16)]
    with store.hold("b", b := tail_session("b")):
        assert store.claim(b, offers) == 16 and b.cache.length == 16
