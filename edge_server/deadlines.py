"""Deadlines on what a device owes a stream: its first message, and each message after.

A Generate handler blocks a worker thread while it waits for the device; a device that
never speaks (or never half-closes after Done) would hold that thread, and its session
slot, for ever. Each stream registers here; while its handler waits for a message it
carries a deadline, and so does each reply while grpc waits for the device to take it (flow
control); a watchdog thread cancels the RPC of a stream whose deadline has passed, which
wakes the handler with the stream's end and frees the thread and the slot. Waiting on the
model carries no deadline: only the device's silence is bounded here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from edge_server.config import LimitsSettings

log = logging.getLogger("coinfer.edge")


@dataclass
class Watched:
    """One stream: how to end it, and until when it may wait for its device (None: not waiting)."""

    cancel: Callable[[], None]
    deadline: float | None = None
    expired: str = ""  # why the watchdog ended it ("" = it did not)


def overdue(streams: list[Watched], now: float) -> list[Watched]:
    """The streams whose wait for their device has passed its deadline (pure: the watchdog's rule)."""
    return [w for w in streams if not w.expired and w.deadline is not None and now >= w.deadline]


class StreamDeadlines:
    def __init__(self, first_message_seconds: float, idle_seconds: float, tick: float = 0.1) -> None:
        self.first_message_seconds, self.idle_seconds, self.tick = first_message_seconds, idle_seconds, tick
        self._streams: dict[int, Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stream-deadlines", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, limits: LimitsSettings) -> StreamDeadlines:
        return cls(limits.first_message_seconds, limits.stream_idle_seconds)

    @contextmanager
    def watch(self, cancel: Callable[[], None]) -> Iterator[Watched]:
        """Register a stream for the duration of its handler."""
        w = Watched(cancel)
        with self._lock:
            self._streams[id(w)] = w
        try:
            yield w
        finally:
            with self._lock:
                self._streams.pop(id(w), None)

    @contextmanager
    def waiting(self, w: Watched | None, first: bool = False) -> Iterator[None]:
        """The handler waits for the device's next message: it must come within the deadline."""
        if w is None:
            yield
            return
        w.deadline = time.monotonic() + (self.first_message_seconds if first else self.idle_seconds)
        try:
            yield
        finally:
            w.deadline = None

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self.tick):
            with self._lock:
                late = [(w, w.deadline) for w in overdue(list(self._streams.values()), time.monotonic())]
            for w, deadline in late:
                if w.deadline != deadline:  # a message came meanwhile: the stream is waiting anew
                    continue
                w.expired = "the device sent nothing within its deadline"
                try:
                    w.cancel()
                except Exception:  # a stream that ended meanwhile: nothing to cancel
                    log.debug("cancel of an overdue stream failed", exc_info=True)
