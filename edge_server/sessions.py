"""Session store: live sessions and their KV caches under a session limit and a byte budget.

Every KV byte on the edge is counted here: the caches of live sessions and of finished
sessions kept for prefix reuse. A cache grows only through `reserve`, which makes room
first by evicting, least recently used first, the kept caches and then the caches of
live sessions that are idle (waiting for their device, not in a batch). An evicted live
session is marked; its next step is refused with ABORTED, and the device replays its
token history. Finished sessions' caches are kept, indexed by their prefix block hashes
(coinfer.prefix), until the budget needs the room or they expire; `claim` hands the
longest matching one to a new session. They are indexed by session id too: a session whose
stream broke while this edge stayed up (a proxy in between restarted, a connection reset)
is resumed from its own cache by `resume`, to the exact position, without a replay.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from coinfer.model.kv_cache import KVCache
from coinfer.prefix import BLOCK, PrefixChain
from edge_server.config import KVSettings, LimitsSettings
from edge_server.tail import TailSession


class SessionLimitError(RuntimeError):
    """Over the session limit or the KV budget: RESOURCE_EXHAUSTED with a retry hint."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SessionExistsError(RuntimeError):
    pass


class SessionEvicted(RuntimeError):
    """The session's KV cache was evicted (budget or idle timeout): the device must replay."""


@dataclass
class Kept:
    """A finished session's cache, kept for prefix reuse."""

    cache: KVCache
    split: int
    codec: str
    hashes: list[bytes]  # block hashes of the prefixes it holds: (i + 1) * BLOCK tokens
    owner: str = ""  # only sessions of the same client identity may claim it
    session_id: str = ""  # the session it came from: `resume` finds it by this and its token
    resume_token: bytes = b""
    chain: PrefixChain | None = None  # names of its positions, when the session had them
    kept_at: float = field(default_factory=time.monotonic)


@dataclass
class StoreStats:
    evicted_live: int = 0
    evicted_kept: int = 0
    expired: int = 0
    prefix_hits: int = 0
    prefix_tokens: int = 0  # positions reused instead of recomputed
    resumed: int = 0  # sessions that went on from their own kept cache
    missing: int = 0  # resumes asked for a session not held here (the device replays)


class SessionStore:
    def __init__(
        self,
        max_sessions: int,
        budget_bytes: int,
        idle_timeout: float = 300.0,
        keep_seconds: float = 600.0,
        max_per_client: int = 0,
    ) -> None:
        self.max_sessions, self.budget, self.max_per_client = max_sessions, budget_bytes, max_per_client
        self.idle_timeout, self.keep_seconds = idle_timeout, keep_seconds
        self._sessions: dict[str, TailSession] = {}
        self._kept: OrderedDict[int, Kept] = OrderedDict()  # least recently kept first
        self._index: dict[tuple[str, bytes], int] = {}  # (owner, block hash) -> id(Kept)
        self._by_session: dict[tuple[str, str, bytes], int] = {}  # (owner, session id, token) -> id(Kept)
        self._bytes = self.peak_bytes = 0
        self.stats = StoreStats()
        self._lock = threading.RLock()

    @classmethod
    def from_settings(cls, limits: LimitsSettings, kv: KVSettings) -> SessionStore:
        return cls(
            limits.max_sessions,
            kv.kv_budget_bytes,
            kv.idle_timeout_seconds,
            kv.keep_seconds,
            limits.max_sessions_per_client,
        )

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def used_bytes(self) -> int:
        return self._bytes

    @property
    def kept_count(self) -> int:
        return len(self._kept)

    # -- live sessions ----------------------------------------------------------------------
    @contextmanager
    def hold(self, session_id: str, session: TailSession) -> Iterator[TailSession]:
        """Register the session for the duration of the block; its cache is freed afterwards unless kept."""
        with self._lock:
            if session_id in self._sessions:
                raise SessionExistsError(f"session {session_id!r} is already open")
            if len(self._sessions) >= self.max_sessions:
                raise SessionLimitError(
                    f"edge is at its session limit ({self.max_sessions}); retry later", self.retry_after()
                )
            if (
                self.max_per_client
                and sum(s.owner == session.owner for s in self._sessions.values()) >= self.max_per_client
            ):
                raise SessionLimitError(
                    f"this client already has {self.max_per_client} sessions open "
                    f"(max_sessions_per_client); retry later",
                    self.retry_after(),
                )
            self._sessions[session_id] = session
            self._bytes += session.cache.nbytes
        try:
            yield session
        finally:
            with self._lock:
                self._sessions.pop(session_id, None)
                self._free(session.cache)

    def wait_released(self, session_id: str, owner: str, token: bytes, timeout: float) -> None:
        """Wait until a live session of this id, owner and resume token ends: the device reopens a
        session whose stream broke, and this edge may learn of the break after the device does (or
        never, behind a proxy that does not pass the cancel on). The old stream is told to stop;
        a caller without the session's token stops nothing."""
        deadline, told = time.monotonic() + timeout, False
        while time.monotonic() < deadline:
            with self._lock:
                s = self._sessions.get(session_id)
                if s is None or s.owner != owner or not hmac.compare_digest(s.resume_token, token):
                    return
            if not told and s.stop is not None:
                s.stop()
                told = True
            time.sleep(0.01)

    def pin(self, s: TailSession) -> None:
        """Mark a session as having work queued (not evictable). Raises SessionEvicted."""
        with self._lock:
            if s.evicted:
                raise SessionEvicted(f"session {s.session_id!r} was evicted ({s.evicted}); replay its history")
            s.pins += 1

    def unpin(self, s: TailSession) -> None:
        with self._lock:
            s.pins -= 1
            s.last_used = time.monotonic()

    def reserve(self, s: TailSession, length: int) -> None:
        """Grow s's cache to hold `length` positions within the budget (evicting if needed).

        Allocates the storage (call it on the compute thread). Raises SessionLimitError when
        even evicting every idle cache would not make room.
        """
        with self._lock:
            growth = s.cache.nbytes_at(length) - s.cache.nbytes
            if growth <= 0:
                return
            while self._bytes + growth > self.budget:
                if not self._evict_one(exclude=s):
                    raise SessionLimitError(
                        f"KV cache budget full ({self._bytes} of {self.budget} bytes in use by sessions "
                        f"in progress; this one needs {growth} more); retry later",
                        self.retry_after(),
                    )
            s.cache.reserve(length)
            self._bytes += growth
            self.peak_bytes = max(self.peak_bytes, self._bytes)

    def _evict_one(self, exclude: TailSession) -> bool:
        if self._kept:
            self._drop_kept(next(iter(self._kept)))
            self.stats.evicted_kept += 1
            return True
        idle = [s for s in self._sessions.values() if s is not exclude and not s.pins and s.cache.nbytes]
        if not idle:
            return False
        self.evict(min(idle, key=lambda s: s.last_used), "KV cache budget")
        return True

    def evict(self, s: TailSession, why: str) -> None:
        with self._lock:
            s.evicted = why
            self._free(s.cache)
            self.stats.evicted_live += 1

    def _free(self, cache: KVCache) -> None:
        self._bytes -= cache.nbytes
        cache.clear()

    # -- prefix reuse -----------------------------------------------------------------------
    def keep(self, s: TailSession) -> bool:
        """Keep a finished (or broken-off) session's cache for prefix reuse and resume; its live
        session no longer owns it.

        The check and the move share one hold of the lock: another session's reservation may evict
        s (clearing its cache) at any moment outside it, and an emptied cache must never be filed."""
        with self._lock:
            if s.evicted or not s.cache.length:
                return False
            # without a chain (the device named nothing, or a resume in mid-block at split 0) the names
            # of the blocks it started from still hold: they were checked when they were filed
            hashes = s.chain.blocks_within(s.cache.length) if s.chain is not None else s.chain_blocks
            chain = (
                PrefixChain(s.chain.state, s.chain.length)
                if s.chain is not None and s.chain.length == s.cache.length
                else None
            )
            kept = Kept(KVCache(0, 0, 0), s.split, s.codec, hashes, s.owner, s.session_id, s.resume_token, chain)
            kept.cache, s.cache = s.cache, kept.cache  # the live session ends holding an empty cache
            names = [(s.owner, h) for h in hashes]
            older = {self._index[n] for n in names if n in self._index}
            if _session_key(kept) in self._by_session:  # an earlier stream of the same session
                older.add(self._by_session[_session_key(kept)])
            self._kept[id(kept)] = kept
            self._index.update((n, id(kept)) for n in names)
            self._by_session[_session_key(kept)] = id(kept)
            for key in older:  # an older cache of a prefix of this one serves nothing the new one can't
                old = self._kept.get(key)
                if (
                    old is not None
                    and not any(self._index.get((old.owner, h)) == key for h in old.hashes)
                    and self._by_session.get(_session_key(old)) != key
                ):
                    self._drop_kept(key)
            return True

    def resume(self, s: TailSession, positions: int, token: bytes) -> bool:
        """Give s the kept cache of its own session id (same owner, resume token, split and codec),
        truncated to `positions`; False when this edge does not hold that session or the token is not
        the session's (the device must replay: the answer is the same, so ids reveal nothing)."""
        with self._lock:
            key = self._by_session.get((s.owner, s.session_id, token))
            kept = self._kept.get(key) if key is not None else None
            if (
                key is None
                or kept is None
                or kept.split != s.split
                or kept.codec != s.codec
                or kept.cache.length < positions
            ):
                self.stats.missing += 1
                return False
            self._hand_over(key, kept, s, positions)
            self.stats.resumed += 1
            return True

    def claim(self, s: TailSession, offers: list[tuple[bytes, int]]) -> int:
        """Give s the kept cache of the longest offered prefix (hash, length) it holds for s's split
        and codec; returns the positions s now starts from (0: none).

        The kept cache leaves the kept set, truncated to the match; its bytes move to s, and the
        names of the blocks it holds go to s.chain_blocks.
        """
        with self._lock:
            for h, length in sorted(offers, key=lambda o: -o[1]):
                key = self._index.get((s.owner, h))  # another client's cache is never offered
                kept = self._kept.get(key) if key is not None else None
                i = length // BLOCK - 1
                if (
                    key is None
                    or kept is None
                    or length % BLOCK
                    or kept.split != s.split
                    or kept.codec != s.codec
                    or not 0 <= i < len(kept.hashes)
                    or kept.hashes[i] != h
                    or kept.cache.length < length
                ):
                    continue
                self._hand_over(key, kept, s, length)
                self.stats.prefix_hits += 1
                self.stats.prefix_tokens += length
                return length
            return 0

    def _hand_over(self, key: int, kept: Kept, s: TailSession, positions: int) -> None:
        """Move a kept cache, truncated to `positions`, into live session s (with its blocks' names)."""
        self._drop_kept(key, free=False)
        self._free(s.cache)
        s.cache, s.chain_blocks = kept.cache, kept.hashes[: positions // BLOCK]
        s.cache.truncate(positions)
        self._bytes += s.cache.nbytes
        s.start_state = _state_at(kept, positions)

    def _drop_kept(self, key: int, free: bool = True) -> None:
        kept = self._kept.pop(key)
        for h in kept.hashes:
            if self._index.get((kept.owner, h)) == key:
                del self._index[(kept.owner, h)]
        if self._by_session.get(_session_key(kept)) == key:
            del self._by_session[_session_key(kept)]
        self._bytes -= kept.cache.nbytes
        if free:
            kept.cache.clear()

    # -- housekeeping -----------------------------------------------------------------------
    def reap(self, now: float | None = None) -> None:
        """Evict live sessions idle past the timeout; drop kept caches past their time."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for s in list(self._sessions.values()):
                if not s.pins and not s.evicted and now - s.last_used > self.idle_timeout:
                    self.evict(s, f"idle for more than {self.idle_timeout:g} s")
            for key, kept in list(self._kept.items()):
                if now - kept.kept_at > self.keep_seconds:
                    self._drop_kept(key)
                    self.stats.expired += 1

    def retry_after(self) -> float:
        """Seconds until a session is likely to end: the soonest expected finish among live ones."""
        with self._lock:
            etas = [s.expected_remaining() for s in self._sessions.values()]
        return min(30.0, max(0.1, min(etas, default=1.0)))

    def snapshot(self) -> list[dict]:
        """Live sessions for the ops endpoint: never their ids or tokens (an id names a session a
        resume could ask for)."""
        with self._lock:
            return [
                {
                    "split": s.split,
                    "codec": s.codec,
                    "prompt_tokens": s.prompt_tokens,
                    "cached_tokens": s.cached_tokens,
                    "generated_tokens": s.generated,
                    "kv_cache_bytes": s.cache.nbytes,
                    "evicted": s.evicted or None,
                }
                for s in self._sessions.values()
            ]


def _session_key(kept: Kept) -> tuple[str, str, bytes]:
    return kept.owner, kept.session_id, kept.resume_token


def _state_at(kept: Kept, positions: int) -> bytes | None:
    """The prefix chain state after `positions` tokens of a kept cache, when its names tell it: the
    whole chain, or a block boundary (the block hash is the state there)."""
    if kept.chain is not None and kept.chain.length == positions:
        return kept.chain.state
    if positions % BLOCK == 0 and 0 < positions // BLOCK <= len(kept.hashes):
        return kept.hashes[positions // BLOCK - 1]
    return None
