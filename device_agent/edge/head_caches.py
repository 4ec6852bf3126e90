"""The device's side of prefix reuse: what earlier edge sessions held, by split, within a byte budget.

The edge can reuse a cached prefix only if the device can go on from the same position:
to compute the hidden states of the new tokens, the head needs its own KV for the prefix.
So after each edge session the head's cache is kept here with the token ids it holds, and
the next request at the same split takes the entry sharing the longest prefix with its
history. At split 0 the head runs nothing; the entry is just the ids the edge was sent
(what the device may offer). Least recently kept entries go first when the budget is full.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from coinfer.model.kv_cache import KVCache
from coinfer.prefix import BLOCK, common_prefix


@dataclass
class _Entry:
    split: int
    ids: list[int]  # the tokens whose keys and values the cache holds, in order
    cache: KVCache | None  # None at split 0

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0


def _usable(e: _Entry, ids: list[int], exact: bool = False) -> int:
    """Whole blocks of `ids` the entry holds (every position it holds when `exact`: a resume of the
    same session), leaving at least one token of `ids` to run."""
    n = min(common_prefix(e.ids, ids), len(ids) - 1)
    return n if exact else n // BLOCK * BLOCK


class HeadCacheStore:
    def __init__(self, budget_bytes: int, max_entries: int = 16) -> None:
        self.budget, self.max_entries = budget_bytes, max_entries
        self._entries: list[_Entry] = []  # oldest first
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def reusable(self, ids: list[int]) -> dict[int, int]:
        """Per split, how many leading positions of `ids` an entry could serve (without taking it)."""
        out: dict[int, int] = {}
        with self._lock:
            for e in self._entries:
                out[e.split] = max(out.get(e.split, 0), _usable(e, ids))
        return {k: n for k, n in out.items() if n}

    def take(self, split: int, ids: list[int], exact: bool = False) -> tuple[KVCache | None, int]:
        """The entry at `split` sharing the longest whole-block prefix with `ids` (any length when
        `exact`), leaving at least one token to run, removed from the store: (its cache, how many
        positions are usable)."""
        with self._lock:
            best, best_len = None, 0
            for e in self._entries:
                n = _usable(e, ids, exact) if e.split == split else 0
                if n > best_len:
                    best, best_len = e, n
            if best is None:
                return None, 0
            self._entries.remove(best)
            return best.cache, best_len

    def put(self, split: int, ids: list[int], cache: KVCache | None) -> None:
        """Remember what an edge session held: `ids` (with the head cache holding cache.length of them)."""
        if cache is not None:
            ids = ids[: cache.length]
        entry = _Entry(split, list(ids), cache)
        if len(ids) < BLOCK or entry.nbytes > self.budget:
            return
        with self._lock:
            # an entry whose tokens are a prefix of the new one's can serve nothing the new one can't
            self._entries = [
                e for e in self._entries if not (e.split == split and common_prefix(e.ids, ids) >= len(e.ids))
            ]
            self._entries.append(entry)
            while len(self._entries) > self.max_entries or sum(e.nbytes for e in self._entries) > self.budget:
                self._entries.pop(0)
