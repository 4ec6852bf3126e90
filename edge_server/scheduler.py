"""Scheduler: decode steps of concurrent sessions run as one batched forward; prefills in chunks.

Handler threads submit work and wait on a future. One loop thread forms the work into
batches and hands each to the compute thread (coinfer.compute): every ready decode step
(up to `max_batch`) goes into one ModelSlice.decode_batch, then at most one prefill chunk
of `prefill_chunk` tokens runs, so a long prompt delays decoding sessions by one chunk at a
time instead of by the whole prompt. When fewer steps are ready than sessions are decoding,
the loop waits up to `max_wait` for the rest: devices that got their tokens from the same
batch answer within a few milliseconds of each other, and one wider batch costs little
more than a narrow one on a memory-bound CPU (benchmarks/edge_concurrency.py).
KV cache growth goes through the session store first (budget, eviction). Each row of a
batch is sampled on its own guard: a session whose logits are NaN or infinite (a device
sending such hidden states, or finite ones so large they overflow) fails alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from coinfer import compute
from coinfer.model.llama import ModelSlice
from coinfer.model.sampling import sample_each
from edge_server.config import BatchingSettings
from edge_server.sessions import SessionStore
from edge_server.tail import TailSession, Timings

log = logging.getLogger("coinfer.edge")


class ShuttingDown(RuntimeError):
    """The edge stops: work still queued or submitted now is not run (UNAVAILABLE: another edge may)."""


@dataclass
class Work:
    session: TailSession
    x: torch.Tensor  # decode: token id [1] or hidden [1, d]; prefill: ids [1, T] or hidden [1, T, d]
    prefill: bool
    submitted: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    done: int = 0  # prefill tokens already run
    started: float = 0.0
    compute: float = 0.0

    @property
    def tokens(self) -> int:
        return self.x.shape[1] if self.prefill else 1


class Scheduler:
    def __init__(
        self,
        model: ModelSlice,
        store: SessionStore,
        max_batch: int = 32,
        max_wait: float = 0.002,
        prefill_chunk: int = 256,
        on_batch: Callable[[str, int, float, float], None] | None = None,
    ) -> None:
        self.model, self.store = model, store
        self.max_batch, self.max_wait, self.prefill_chunk = max_batch, max_wait, prefill_chunk
        self.gap = min(max_wait, 0.002)  # s without a new step that ends the wait for more
        # (kind "decode" | "prefill", items, mean queue s, compute s) -> metrics and load tracking
        self.on_batch = on_batch or (lambda kind, size, queue, seconds: None)
        self._steps: deque[Work] = deque()
        self._prefills: deque[Work] = deque()
        self._decoding = 0  # sessions past their prefill and not finished
        self._cond = threading.Condition()
        self._stop = False
        self._job_started = 0.0
        self._thread = threading.Thread(target=self._loop, name="edge-scheduler", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(
        cls,
        model: ModelSlice,
        store: SessionStore,
        batching: BatchingSettings,
        on_batch: Callable[[str, int, float, float], None] | None = None,
    ) -> Scheduler:
        return cls(
            model, store, batching.max_batch, batching.batch_wait_ms / 1000, batching.prefill_chunk_tokens, on_batch
        )

    # -- called from handler threads -------------------------------------------------------
    def prefill(self, s: TailSession, x: torch.Tensor) -> tuple[int, float, Timings]:
        token, logprob, t = self._submit(Work(s, x, prefill=True))
        with self._cond:
            self._decoding += 1
        s.decoding = True
        return token, logprob, t

    def step(self, s: TailSession, x: torch.Tensor) -> tuple[int, float, Timings]:
        return self._submit(Work(s, x, prefill=False))

    def finished(self, s: TailSession) -> None:
        """The session will submit no more work."""
        if s.decoding:
            s.decoding = False
            with self._cond:
                self._decoding -= 1
                self._cond.notify_all()  # a batch waiting for this session's step need not wait on

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _submit(self, w: Work) -> tuple[int, float, Timings]:
        self.store.pin(w.session)  # raises SessionEvicted
        try:
            with self._cond:
                if self._stop:
                    raise ShuttingDown("the edge is shutting down")
                (self._prefills if w.prefill else self._steps).append(w)
                self._cond.notify_all()
            token, logprob = w.future.result()
        finally:
            self.store.unpin(w.session)
        return token, logprob, Timings(queue=w.started - w.submitted, compute=w.compute)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._steps or self._prefills or self._stop):
                    if not self._cond.wait(timeout=1.0):
                        self.store.reap()
                if self._stop:
                    self._fail_all(ShuttingDown("the edge is shutting down"))
                    return
                self._gather()
                steps = [self._steps.popleft() for _ in range(min(self.max_batch, len(self._steps)))]
                chunk = self._prefills[0] if self._prefills else None
            if steps:
                self._run(self._decode_batch, steps)
            if chunk is not None:
                self._run(self._prefill_chunk, [chunk])
                if chunk.future.done():
                    with self._cond:
                        self._prefills.popleft()

    def _gather(self) -> None:
        """Wait (briefly) for steps of sessions that are decoding but not yet ready. Holds the lock.

        Steps come in bursts: the handlers woken by one batch resubmit within a few hundred
        microseconds of each other (k = 0), while devices that run a head answer tens of
        milliseconds later. So the wait ends at `max_wait`, or as soon as a `gap` passes
        with no new step: the burst is over and the rest would make this batch late.
        """
        if not self._steps or self.max_wait <= 0:
            return
        deadline = time.perf_counter() + self.max_wait
        while len(self._steps) < min(self.max_batch, self._decoding) and not self._stop:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            before = len(self._steps)
            self._cond.wait(min(left, self.gap))
            if len(self._steps) == before:
                return

    def _fail_all(self, e: Exception) -> None:
        for w in [*self._steps, *self._prefills]:
            if not w.future.done():
                w.future.set_exception(e)
        self._steps.clear()
        self._prefills.clear()

    def _run(self, job: Callable[[list[Work]], None], works: list[Work]) -> None:
        started = time.perf_counter()
        for w in works:
            w.started = w.started or started
        self._job_started = started
        try:
            compute.run(job, works)
        except Exception as e:  # a bug must fail the requests that hit it, never the loop
            log.exception("scheduler job failed")
            for w in works:
                if not w.future.done():
                    w.future.set_exception(e)
        seconds = time.perf_counter() - started
        for w in works:
            if not w.future.done():
                w.compute += seconds  # a prefill between chunks
        self.on_batch(
            "prefill" if works[0].prefill else "decode",
            len(works),
            sum(started - w.submitted for w in works) / len(works),
            seconds,
        )

    # -- jobs, on the compute thread ---------------------------------------------------------
    def _resolve(self, w: Work, result: tuple[int, float]) -> None:
        w.compute += time.perf_counter() - self._job_started  # before the waiting handler can read it
        w.future.set_result(result)

    def _decode_batch(self, works: list[Work]) -> None:
        ready = []
        for w in works:
            try:
                self.store.reserve(w.session, w.session.cache.length + 1)
                ready.append(w)
            except Exception as e:  # budget full: this session waits and retries, the others run
                w.future.set_exception(e)
        if not ready:
            return
        with torch.inference_mode():
            try:
                logits = self.model.decode_batch(
                    [w.x for w in ready], [w.session.split for w in ready], [w.session.cache for w in ready]
                )  # [B, V]
            except Exception:
                if len(ready) == 1:
                    raise
                for w in ready:  # find the row that fails; the others still get their token
                    self._decode_alone(w)
                return
            self._settle(ready, logits)

    def _decode_alone(self, w: Work) -> None:
        try:
            logits = self.model.decode_batch([w.x], [w.session.split], [w.session.cache])
            self._settle([w], logits)
        except Exception as e:
            w.future.set_exception(e)

    def _settle(self, works: list[Work], logits: torch.Tensor) -> None:
        """Row b of logits [B, V] -> works[b]'s token; a row that is not finite or cannot be sampled
        fails its own session (NonFiniteState, INVALID_ARGUMENT) and no other: a device that sends
        NaN, or hidden states so large they overflow in the tail, must not stop its batch."""
        for w, result in zip(works, sample_each([w.session.sampler for w in works], logits), strict=True):
            if isinstance(result, Exception):
                w.future.set_exception(result)
            else:
                self._resolve(w, result)

    def _prefill_chunk(self, works: list[Work]) -> None:
        w = works[0]
        s, total = w.session, w.x.shape[1]
        try:
            if w.done == 0:
                self.store.reserve(s, s.cache.length + total)  # the whole prompt at once: no half-run prefills
            end = min(total, w.done + self.prefill_chunk)
            with torch.inference_mode():
                logits = s.model(w.x[:, w.done : end], s.cache, last_only=True)  # [1, 1, V]
            w.done = end
            if end == total:
                self._settle([w], logits[0, -1:])
        except Exception as e:
            w.future.set_exception(e)
