"""Generation with the edge: one edge session per attempt, replayed when lost, retried when busy.

A session offers the edge the prefix hashes of its token history (coinfer.prefix); the
edge answers how much it still holds from an earlier turn, and only the rest crosses the
link. The head's own KV for that prefix comes from the device's HeadCacheStore.
When a session is lost (edge restart, eviction: UNAVAILABLE, ABORTED, ...) it is reopened
and the token history replayed; `replays` bounds the attempts in a row that produce no
token. A stream that broke while the edge may still hold the session (a proxy in between
reset it) is first reopened as a resume of the same session id, from the exact position;
an edge (replica) that does not hold it answers NOT_FOUND and the device replays at once.
Every stream of a request carries the same session id, so session-affine proxies keep it on
one replica. When the edge is full (RESOURCE_EXHAUSTED) the request waits the edge's retry
hint, with jittered exponential backoff, up to `busy_wait_seconds`. Then, or with replays spent,
a device that holds all layers finishes the request itself; otherwise the error goes to
the app (503 with Retry-After).
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator

import grpc

from coinfer import prefix
from coinfer.model.kv_cache import KVCache
from coinfer.v1 import edge_pb2 as pb
from device_agent.config import AgentSettings
from device_agent.edge_client import EdgeClient, EdgeError, Exchange
from device_agent.edge_pool import FAILOVER
from device_agent.head import HeadRunner
from device_agent.metrics import AgentMetrics
from device_agent.planning import Planner
from device_agent.prefix_cache import HeadCacheStore

log = logging.getLogger("coinfer.device")
FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
TokenSource = Iterator[tuple[int, float, str | None]]  # (token id, logprob, finish reason or None)


class EdgeRunner:
    def __init__(self, settings: AgentSettings, head: HeadRunner, edge: EdgeClient, planner: Planner,
                 metrics: AgentMetrics) -> None:
        self.settings, self.head, self.edge, self.planner, self.metrics = settings, head, edge, planner, metrics
        self.head_caches = HeadCacheStore(settings.prefix_cache_bytes) if settings.prefix_reuse else None

    def reusable(self, prompt_ids: list[int]) -> dict[int, int]:
        """Per split, prompt positions the edge probably still holds (what earlier sessions left)."""
        return self.head_caches.reusable(prompt_ids) if self.head_caches is not None else {}

    def tokens(self, req, k: int, codec: str, stop_ids: frozenset[int], stats,
               local: Callable[[list[int], int], TokenSource]) -> TokenSource:
        """Tokens of req at split k; `local(history, max_new)` finishes on the device when the edge fails."""
        history = list(req.prompt_ids)  # every token the edge session must hold
        generated, idle_replays, busy_since = 0, 0, None
        sid, resume = uuid.uuid4().hex, False  # one id for every stream of this request: affinity
        while True:
            before = generated
            try:
                for token, logprob, finish in self._session(req, k, codec, stop_ids, history,
                                                            req.max_tokens - generated, stats, sid, resume):
                    history.append(token)
                    generated += 1
                    yield token, logprob, finish
                return
            except EdgeError as e:
                self.metrics.edge_errors.labels(e.code.name).inc()
                if generated > before:
                    idle_replays, busy_since = 0, None
                resumed, resume = resume, False
                if resumed and e.code == grpc.StatusCode.NOT_FOUND:  # not on this replica: replay now
                    self._replayed(stats)
                    log.info("edge does not hold session %s (%s); replaying %d tokens", sid, e.details, len(history))
                    continue
                if e.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    busy_since = busy_since or time.monotonic()
                    if self._other_edge(e):  # another edge may have room: no need to wait
                        stats.busy_retries += 1
                        continue
                    if self._wait_busy(e, time.monotonic() - busy_since, stats):
                        continue
                elif e.retryable and idle_replays < self.settings.replays:
                    idle_replays += 1
                    moved = e.code in FAILOVER and self._other_edge(e)
                    # the stream broke, the session may live on where it ran: try to go on from it
                    resume = e.code in FAILOVER and not moved and self.head_caches is not None
                    if not resume:
                        self._replayed(stats)
                    log.warning("edge session lost (%s); %s %d tokens", e, "resuming" if resume else "replaying",
                                len(history))
                    if e.code != grpc.StatusCode.ABORTED and not moved:  # ABORTED: evicted, the edge is up
                        time.sleep(min(0.2 * 2 ** idle_replays, 2.0))
                    continue
                elif not e.retryable:
                    raise
                if not self.head.holds_all_layers:
                    raise
                log.warning("edge lost or busy (%s); finishing on the device", e)
                stats.fallback = True
                self.metrics.fallbacks.inc()
                yield from local(history, req.max_tokens - generated)
                return

    def _replayed(self, stats) -> None:
        """Count a replay: in the request's stats (REST `coinfer.replays`) and in /metrics."""
        stats.replays += 1
        self.metrics.replays.inc()

    def _other_edge(self, e: EdgeError) -> bool:
        """Fail over to another edge of the pool (False with a single edge)."""
        failover = getattr(self.edge, "failover", None)
        return bool(failover and failover(why=e))

    def _wait_busy(self, e: EdgeError, waited: float, stats) -> bool:
        """Sleep before retrying a busy edge; False when the wait budget is spent."""
        left = self.settings.busy_wait_seconds - waited
        if left <= 0:
            return False
        backoff = min(0.1 * 2 ** stats.busy_retries, 2.0)
        delay = min(e.retry_after if e.retry_after is not None else backoff, backoff * 4, left)
        stats.busy_retries += 1
        self.metrics.busy_retries.inc()
        log.info("edge busy (%s); retrying in %.2f s", e.details, delay)
        time.sleep(delay * random.uniform(0.8, 1.2))  # jitter: devices refused together don't return together
        return True

    # -- one session -----------------------------------------------------------------------------
    def _open(self, req, k: int, codec: str, stop_ids, history: list[int], max_new: int, sid: str,
              resume: bool):
        """Open a session offering the prefixes the device can go on from (or, resuming, the exact
        position the session got to).

        Returns (stream, positions the edge holds, head cache or None at k = 0, prefix chain or None).
        """
        sp, cache, usable, chain, offers = req.sampling, None, 0, None, []
        if self.head_caches is not None:
            cache, usable = self.head_caches.take(k, history, exact=resume)
            chain = prefix.PrefixChain.over(
                prefix.seed(self.head.fingerprint, k, codec, self.head.model.precision), history)
            if not resume:
                offers = [(chain.blocks[n // prefix.BLOCK - 1], n) for n in prefix.offer_lengths(usable)]
        if k > 0 and cache is None:
            cache = self.head.view(k).new_cache()
        open_msg = pb.Open(
            session_id=sid, fingerprint=self.head.fingerprint, split=k, codec=codec,
            sampling=pb.Sampling(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, seed=sp.seed),
            max_new_tokens=max_new, stop_ids=sorted(stop_ids), resume_tokens=usable if resume else 0,
            prefix_hashes=[h for h, _ in offers], prefix_lengths=[n for _, n in offers])
        try:
            stream, opened = self.edge.open(open_msg, affinity=req.affinity)
        except EdgeError:
            if self.head_caches is not None:
                self.head_caches.put(k, history, cache)  # the next attempt goes on from it
            raise
        held = opened.cached_tokens
        if held and held not in {n for _, n in offers} | {open_msg.resume_tokens}:
            stream.close()
            raise EdgeError(grpc.StatusCode.INTERNAL, f"protocol error: edge holds {held} positions, "
                                                      f"offered {[n for _, n in offers]}")
        if cache is not None:
            cache.truncate(held)
        stream.replica = opened.replica
        return stream, held, cache, chain

    def _prefill(self, k: int, history: list[int], held: int, cache: KVCache | None, chain, codec: str,
                 stats) -> pb.DeviceMessage:
        """What the edge does not hold yet: ids (k = 0) or their hidden states, with the new blocks' names."""
        msg = pb.Prefill(token_ids=history[held:]) if k == 0 else \
            pb.Prefill(frame=self._frame(self.head.view(k), history[held:], cache, codec, stats))
        if chain is not None:
            msg.block_hashes.extend(chain.blocks[held // prefix.BLOCK:])
            msg.chain_state = chain.state
        return pb.DeviceMessage(prefill=msg)

    def _session(self, req, k: int, codec: str, stop_ids, history: list[int], max_new: int, stats, sid: str,
                 resume: bool) -> TokenSource:
        t0 = time.perf_counter()
        stream, held, cache, chain = self._open(req, k, codec, stop_ids, history, max_new, sid, resume)
        stats.edge_wait += time.perf_counter() - t0
        stats.replica = stream.replica
        if resume and held:
            stats.resumes += 1
            self.metrics.resumes.inc()
        else:
            stats.cached_tokens += held
            if resume:  # nothing kept on the device to go on from: this is a replay
                self._replayed(stats)
        fed = list(history)  # tokens whose keys and values the edge's (and the head's) cache will hold
        try:
            view = self.head.view(k) if k > 0 else None
            prefill = self._prefill(k, history, held, cache, chain, codec, stats)
            stats.prefill_bytes_up += prefill.ByteSize()
            sent, sent_bytes, quiet = time.perf_counter(), prefill.ByteSize(), self.planner.quiet(1)
            stream.send(prefill)
            if k == 0:
                stream.done_sending()  # the edge generates on its own
            while True:
                t0 = time.perf_counter()
                tok = stream.recv("token")
                now = time.perf_counter()
                stats.edge_wait += now - t0
                tm = tok.timings
                stats.edge_compute += tm.compute_seconds
                stats.edge_queue += tm.queue_seconds
                stats.edge_decode += tm.decode_seconds
                if sent_bytes:  # a request/reply exchange: teach the link estimator
                    self.planner.observe(Exchange(sent_bytes, tok.ByteSize(), now - sent,
                                                  tm.compute_seconds + tm.queue_seconds + tm.decode_seconds), quiet)
                    sent_bytes = 0
                finish = FINISH.get(tok.finish_reason)
                if finish:
                    stream.done_sending()
                    stream.recv("done")
                yield tok.id, tok.logprob, finish
                if finish:
                    return
                fed.append(tok.id)  # the edge's cache takes it in with the next step
                if k > 0:
                    step = pb.DeviceMessage(step=pb.Step(frame=self._frame(view, [tok.id], cache, codec, stats)))
                    stats.step_bytes_up += step.ByteSize()
                    sent, sent_bytes, quiet = time.perf_counter(), step.ByteSize(), self.planner.quiet(1)
                    stream.send(step)
        finally:
            stream.close()
            stats.add_stream(stream)
            if self.head_caches is not None:
                self.head_caches.put(k, fed, cache)

    def _frame(self, view, ids: list[int], cache: KVCache, codec: str, stats) -> bytes:
        frame, dt = self.head.hidden_frame(view, ids, cache, codec)
        stats.device_compute += dt
        return frame
