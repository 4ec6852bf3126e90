"""Session store: the live sessions of this edge and their KV caches, under a session limit.

A session lives as long as its Generate stream; the store frees its KV cache when the
stream ends for any reason (done, error, client gone).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from edge_server.tail import TailSession


class SessionLimitError(RuntimeError):
    pass


class SessionExistsError(RuntimeError):
    pass


class SessionStore:
    def __init__(self, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._sessions: dict[str, TailSession] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    @contextmanager
    def hold(self, session_id: str, session: TailSession) -> Iterator[TailSession]:
        """Register the session for the duration of the block; always removed afterwards."""
        with self._lock:
            if session_id in self._sessions:
                raise SessionExistsError(f"session {session_id!r} is already open")
            if len(self._sessions) >= self.max_sessions:
                raise SessionLimitError(f"edge is at its session limit ({self.max_sessions}); retry later")
            self._sessions[session_id] = session
        try:
            yield session
        finally:
            with self._lock:
                self._sessions.pop(session_id, None)

    def kv_cache_bytes(self) -> int:
        with self._lock:
            return sum(s.cache.nbytes for s in self._sessions.values())

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [
                {"session_id": sid, "split": s.split, "codec": s.codec, "prompt_tokens": s.prompt_tokens,
                 "generated_tokens": s.generated, "kv_cache_bytes": s.cache.nbytes}
                for sid, s in self._sessions.items()
            ]
