"""Generation with the edge: one edge session per attempt, replayed when lost, retried when busy.

A session offers the edge the prefix hashes of its token history (coinfer.prefix); the
edge answers how much it still holds from an earlier turn, and only the rest crosses the
link. The head's own KV for that prefix comes from the device's HeadCacheStore.
When an attempt fails, retry_policy.decide chooses what comes next (resume, replay,
fail over, wait, finish on the device, give up) from the status and the request's counters;
the loop here only carries that out: sleeps, failover through the pool, metrics and logs.
A resume reopens the same session id from the exact position and presents the secret
`Opened.resume_token` the edge gave the request's last stream: a session id alone claims
nothing. Every stream of a request carries the same session id, so session-affine proxies keep
it on one replica. A Prefill over the gRPC message limit (the device's or the edge's) is
refused before it is sent: a client error, never retried.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass

import grpc

from coinfer import prefix
from coinfer.model.kv_cache import KVCache
from coinfer.model.llama import ModelSlice
from coinfer.v1 import edge_pb2 as pb
from device_agent.config import PrefixSettings, ResilienceSettings
from device_agent.edge.client import EdgeError, EdgeStream, Exchange, MessageTooLarge
from device_agent.edge.head_caches import HeadCacheStore
from device_agent.edge.pool import EdgePool
from device_agent.edge.retry_policy import Action, AttemptState, Failure, Kind, decide
from device_agent.generation_types import GenerationRequest, RunStats
from device_agent.head import HeadRunner
from device_agent.metrics import AgentMetrics
from device_agent.planning import Planner

log = logging.getLogger("coinfer.device")
FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
TokenSource = Generator[tuple[int, float, str | None], None, None]  # (token id, logprob, finish reason or None)


@dataclass
class Ticket:
    """The edge session of one request, across its streams."""

    sid: str  # one id for every stream of the request: affinity, and what a resume names
    resume_token: bytes = b""  # the last Opened.resume_token: a resume must present it
    resume: bool = False  # the next attempt resumes (else it opens afresh and replays)


class EdgeRunner:
    def __init__(
        self,
        resilience: ResilienceSettings,
        prefix: PrefixSettings,
        max_message_bytes: int,
        head: HeadRunner,
        edge: EdgePool,
        planner: Planner,
        metrics: AgentMetrics,
    ) -> None:
        """max_message_bytes: the device's gRPC message limit (its edge connection's), which a Prefill
        must fit along with the edge's own."""
        self.resilience, self.max_message_bytes = resilience, max_message_bytes
        self.head, self.edge, self.planner, self.metrics = head, edge, planner, metrics
        self.head_caches = HeadCacheStore(prefix.prefix_cache_bytes) if prefix.prefix_reuse else None

    def reusable(self, prompt_ids: list[int]) -> dict[int, int]:
        """Per split, prompt positions the edge probably still holds (what earlier sessions left)."""
        return self.head_caches.reusable(prompt_ids) if self.head_caches is not None else {}

    def tokens(
        self,
        req: GenerationRequest,
        k: int,
        codec: str,
        stop_ids: frozenset[int],
        stats: RunStats,
        local: Callable[[list[int], int], TokenSource],
    ) -> TokenSource:
        """Tokens of req at split k; `local(history, max_new)` finishes on the device when the edge fails."""
        history = list(req.prompt_ids)  # every token the edge session must hold
        generated, ticket, state = 0, Ticket(uuid.uuid4().hex), self._attempt_state()
        while True:
            before = generated
            try:
                for token, logprob, finish in self._session(
                    req, k, codec, stop_ids, history, req.max_tokens - generated, stats, ticket
                ):
                    history.append(token)
                    generated += 1
                    yield token, logprob, finish
                return
            except EdgeError as e:
                if generated > before:
                    state.progressed()
                if self._recover(e, state, ticket, stats, len(history), req.cancel).kind is Kind.FINISH_LOCALLY:
                    stats.fallback = True
                    self.metrics.fallbacks.inc()
                    yield from local(history, req.max_tokens - generated)
                    return

    def _attempt_state(self) -> AttemptState:
        return AttemptState(
            pool_size=len(self.edge.clients),
            holds_all_layers=self.head.holds_all_layers,
            replays_allowed=self.resilience.replays,
            busy_wait_seconds=self.resilience.busy_wait_seconds,
        )

    def _recover(
        self,
        e: EdgeError,
        state: AttemptState,
        ticket: Ticket,
        stats: RunStats,
        history: int,
        cancel: threading.Event | None = None,
    ) -> Action:
        """Decide what follows `e` and carry it out up to the next attempt (raises when giving up, or
        when the client hung up meanwhile: nobody would read the answer)."""
        self.metrics.edge_errors.labels(e.code.name).inc()
        failure = Failure(e.code, time.monotonic(), e.retry_after, e.too_large, ticket.resume)
        # a session can be resumed only with the capability its edge handed out (Opened.resume_token)
        state.can_resume = self.head_caches is not None and bool(ticket.resume_token)
        act = decide(failure, state, random.random())
        if act.kind is Kind.FAIL_OVER and not self._other_edge(e):
            state.no_other_edge = True  # nobody else answered: decide without failing over
            act = decide(failure, state, random.random())
        state.after(failure, act)
        ticket.resume = act.resumes
        if act.kind is Kind.TOO_LARGE:
            raise MessageTooLarge.of(e) from None
        if act.kind is Kind.GIVE_UP:
            log.warning("edge failed (%s): %s", e, act.why)
            raise e
        if act.busy and act.kind in (Kind.FAIL_OVER, Kind.WAIT):
            stats.busy_retries += 1
            self.metrics.busy_retries.inc()
        if act.replays:
            self._replayed(stats)
        step = act.kind.value.replace("_", " ") + (f" then {act.then.value}" if act.then else "")
        log.log(
            logging.INFO if act.busy else logging.WARNING,
            "edge %s (%s): %s; %s (%d tokens of history)%s",
            "busy" if act.busy else "failed",
            e,
            act.why,
            step,
            history,
            f" in {act.delay:.2f} s" if act.delay else "",
        )
        if act.delay > 0 and cancel is not None:
            cancel.wait(act.delay)
        elif act.delay > 0:
            time.sleep(act.delay)
        if cancel is not None and cancel.is_set():
            raise e
        return act

    def _replayed(self, stats: RunStats) -> None:
        """Count a replay: in the request's stats (REST `coinfer.replays`) and in /metrics."""
        stats.replays += 1
        self.metrics.replays.inc()

    def _other_edge(self, e: EdgeError) -> bool:
        """Fail over to another edge of the pool (False with a single edge, or when none answered)."""
        return self.edge.failover(why=e)

    # -- one session -----------------------------------------------------------------------------
    def _open(
        self,
        req: GenerationRequest,
        k: int,
        codec: str,
        stop_ids: frozenset[int],
        history: list[int],
        max_new: int,
        ticket: Ticket,
    ) -> tuple[EdgeStream, pb.Opened, KVCache | None, prefix.PrefixChain | None]:
        """Open a session offering the prefixes the device can go on from (or, resuming, the exact
        position the session got to).

        Returns (stream, Opened, head cache or None at k = 0, prefix chain or None).
        """
        sp, cache, usable, chain, offers, resume = req.sampling, None, 0, None, [], ticket.resume
        if self.head_caches is not None:
            cache, usable = self.head_caches.take(k, history, exact=resume)
            chain = prefix.PrefixChain.over(
                prefix.seed(self.head.fingerprint, k, codec, self.head.model.precision), history
            )
            if not resume:
                offers = [(chain.blocks[n // prefix.BLOCK - 1], n) for n in prefix.offer_lengths(usable)]
        if k > 0 and cache is None:
            cache = self.head.view(k).new_cache()
        open_msg = pb.Open(
            session_id=ticket.sid,
            fingerprint=self.head.fingerprint,
            split=k,
            codec=codec,
            sampling=pb.Sampling(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, seed=sp.seed),
            max_new_tokens=max_new,
            stop_ids=sorted(stop_ids),
            resume_tokens=usable if resume else 0,
            resume_token=ticket.resume_token if resume else b"",
            prefix_hashes=[h for h, _ in offers],
            prefix_lengths=[n for _, n in offers],
        )
        try:
            stream, opened = self.edge.open(open_msg, affinity=req.affinity)
        except EdgeError:
            if self.head_caches is not None:
                self.head_caches.put(k, history, cache)  # the next attempt goes on from it
            raise
        ticket.resume_token = opened.resume_token
        held = opened.cached_tokens
        if held and held not in {n for _, n in offers} | {open_msg.resume_tokens}:
            stream.close()
            raise EdgeError(
                grpc.StatusCode.INTERNAL,
                f"protocol error: edge holds {held} positions, offered {[n for _, n in offers]}",
            )
        if cache is not None:
            cache.truncate(held)
        stream.replica = opened.replica
        return stream, opened, cache, chain

    def _prefill(
        self,
        k: int,
        history: list[int],
        held: int,
        cache: KVCache | None,
        chain: prefix.PrefixChain | None,
        codec: str,
        stats: RunStats,
        limit: int,
    ) -> pb.DeviceMessage:
        """What the edge does not hold yet: ids (k = 0) or their hidden states, with the new blocks' names.
        MessageTooLarge when it would not fit in one gRPC message of `limit` bytes."""
        msg = (
            pb.Prefill(token_ids=history[held:])
            if k == 0
            else pb.Prefill(frame=self._frame(self.head.view(k), history[held:], cache, codec, stats))
        )
        if chain is not None:
            msg.block_hashes.extend(chain.blocks[held // prefix.BLOCK :])
            msg.chain_state = chain.state
        out = pb.DeviceMessage(prefill=msg)
        if out.ByteSize() > limit:
            raise MessageTooLarge(out.ByteSize(), limit)
        return out

    def _message_limit(self, opened: pb.Opened) -> int:
        """The largest message both ends accept: ours and the edge's (0 = not told)."""
        edge = opened.limits.max_message_bytes
        return min(self.max_message_bytes, edge) if edge else self.max_message_bytes

    def _opened(self, stats: RunStats, replica: str, resume: bool, held: int) -> None:
        """Count what a new stream got: a resume, or cached prefix positions."""
        stats.replica = replica
        if resume and held:
            stats.resumes += 1
            self.metrics.resumes.inc()
        else:
            stats.cached_tokens += held
            if resume:  # nothing kept on the device to go on from: this is a replay
                self._replayed(stats)

    def _session(
        self,
        req: GenerationRequest,
        k: int,
        codec: str,
        stop_ids: frozenset[int],
        history: list[int],
        max_new: int,
        stats: RunStats,
        ticket: Ticket,
    ) -> TokenSource:
        t0, resume = time.perf_counter(), ticket.resume
        stream, opened, cache, chain = self._open(req, k, codec, stop_ids, history, max_new, ticket)
        held = opened.cached_tokens
        stats.edge_wait += time.perf_counter() - t0
        self._opened(stats, stream.replica, resume, held)
        fed = list(history)  # tokens whose keys and values the edge's (and the head's) cache will hold
        try:
            view = self.head.view(k) if k > 0 else None
            prefill = self._prefill(k, history, held, cache, chain, codec, stats, self._message_limit(opened))
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
                    edge_seconds = tm.compute_seconds + tm.queue_seconds + tm.decode_seconds
                    self.planner.observe(Exchange(sent_bytes, tok.ByteSize(), now - sent, edge_seconds), quiet)
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

    def _frame(
        self, view: ModelSlice | None, ids: list[int], cache: KVCache | None, codec: str, stats: RunStats
    ) -> bytes:
        if view is None or cache is None:  # every split k > 0 has both; k = 0 sends token ids, no frames
            raise ValueError("a hidden-state frame needs the head's view of layers [0, k) and its cache")
        frame, dt = self.head.hidden_frame(view, ids, cache, codec)
        stats.device_compute += dt
        return frame
