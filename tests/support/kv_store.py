"""Tail sessions on a tiny KV cache (2 layers, 1 KV head, head dim 4) for the edge's session store,
and the byte arithmetic of its budget."""

from __future__ import annotations

from coinfer.model.kv_cache import KVCache
from coinfer.model.sampling import Sampler
from coinfer.prefix import PrefixChain, seed
from edge_server.sessions import SessionStore
from edge_server.tail import TailSession

CHUNK = 16
PER_CHUNK = 2 * 2 * 1 * 4 * CHUNK * 4  # k and v, 2 layers, 1 KV head, head dim 4, f32


def tail_session(sid: str, split: int = 1, codec: str = "f32") -> TailSession:
    cache = KVCache(2, 1, 4, chunk=CHUNK)
    return TailSession(split, codec, None, cache, Sampler(), session_id=sid)


def fill(store: SessionStore, s: TailSession, n: int) -> None:
    """Reserve n more positions for s and count them as written."""
    store.reserve(s, s.cache.length + n)
    s.cache.advance(n)


def keep_finished(store: SessionStore, s: TailSession, ids: list[int]) -> None:
    """Give s a chain over ids and a cache holding them, then keep it."""
    s.chain = PrefixChain.over(seed("fp", s.split, s.codec, "fp32"), ids)
    fill(store, s, len(ids))
    assert store.keep(s)
