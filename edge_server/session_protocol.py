"""The session protocol of one Generate stream, apart from gRPC: what the device may send, in which
order, and what the edge answers.

    device: Open ────────────▶ edge: validate, resume the session or claim a kept prefix
            ◀──────────── Opened{limits, cached positions, resume token}
            Prefill ─────────▶ the prompt after what the edge holds (ids at split 0, else a frame),
                               with the names of the blocks it completes (checked at split 0)
            ◀──────────── Token (at split 0 the edge goes on alone, one Token per step)
            Step ────────────▶ one token's hidden state (split > 0), then Token again ...
            ◀──────────── Token{finish_reason}, Done; the device half-closes

Every validation raises errors.BadInput (INVALID_ARGUMENT), a message out of order or a wrong
fingerprint errors.Abort (FAILED_PRECONDITION); edge_server/service.py turns these, and the
store's and scheduler's errors, into statuses. A session that ends early keeps a consistent
cache for the device's resume or next turn; one that fails keeps nothing.
"""

from __future__ import annotations

import hmac
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc

from coinfer import codec, wire
from coinfer.model.generation import finish_reason
from coinfer.model.sampling import SamplingParams
from coinfer.prefix import BLOCK, DIGEST, PrefixChain, seed
from coinfer.v1 import edge_pb2 as pb
from edge_server.config import LimitsSettings
from edge_server.deadlines import StreamDeadlines, Watched
from edge_server.errors import Abort, BadInput
from edge_server.metrics import EdgeMetrics
from edge_server.scheduler import Scheduler
from edge_server.sessions import SessionStore
from edge_server.tail import TailRunner, TailSession, Timings

REPLICA = f"{socket.gethostname()}:{os.getpid()}"  # names this edge process in Opened
STOP, LENGTH, MORE = pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_UNSPECIFIED
FINISH = {"stop": STOP, "length": LENGTH}  # coinfer.model.generation.finish_reason -> the wire
RELEASE_WAIT = 2.0  # s a resume waits for the session's old stream to end


class ClientGone(Exception):
    """The device half-closed or vanished before the session was over."""


class Stream:
    """What a session reads from: the device's messages under the stream's deadlines."""

    def __init__(self, requests: Iterator[pb.DeviceMessage], deadlines: StreamDeadlines, watched: Watched) -> None:
        self.requests, self.deadlines, self.watched = requests, deadlines, watched
        self.received = 0

    def next(self) -> pb.DeviceMessage:
        try:
            with self.deadlines.waiting(self.watched, first=not self.received):
                msg = next(self.requests)
        except StopIteration:  # must not escape a generator (PEP 479)
            raise ClientGone() from None
        except grpc.RpcError:  # cancelled (connection reset, or its deadline): the cache is consistent, keep it
            raise ClientGone() from None
        self.received += 1
        return msg

    def next_of(self, want: str):
        """The next message, which must be of kind `want` (its content is returned)."""
        msg = self.next()
        kind = msg.WhichOneof("kind")
        if kind != want:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"expected {want}, got {kind}")
        return getattr(msg, want)

    def until_half_closed(self) -> None:
        """End the response only after the device's half-close: a proxy in between (HAProxy) resets a
        stream whose response ends first, and the device would lose the last messages. Devices
        half-close on the last token (at split 0, right after the Prefill); one that never does is
        ended by its idle deadline, and one that sends anything else instead ends the stream: no
        message may keep a finished session's slot."""
        try:
            self.next()
        except ClientGone:
            pass


@dataclass
class Edge:
    """What every session of one edge shares."""

    runner: TailRunner
    sessions: SessionStore
    scheduler: Scheduler
    session_limits: LimitsSettings
    prefix_reuse: bool  # finished sessions' caches are kept for the next turn's prefix
    max_message_bytes: int  # the gRPC server's
    metrics: EdgeMetrics
    draining: threading.Event
    max_context: int  # positions a session may reach: the model's and the settings' limit

    def limits(self) -> pb.Limits:
        s = self.session_limits
        return pb.Limits(
            max_sessions=s.max_sessions,
            max_context_tokens=self.max_context,
            max_new_tokens=s.max_new_tokens,
            max_message_bytes=self.max_message_bytes,
            max_frame_bytes=s.max_frame_bytes,
        )


def timings_pb(t: Timings) -> pb.EdgeTimings:
    return pb.EdgeTimings(queue_seconds=t.queue, compute_seconds=t.compute, decode_seconds=t.decode)


class SessionProtocol:
    """One session from Open to Done. `stop` ends the stream for real (a resume of the same session
    arrived elsewhere); `gone` is set when the RPC ends."""

    def __init__(self, edge: Edge, stream: Stream, owner: str, gone: threading.Event, stop: Callable[[], None]) -> None:
        self.edge, self.stream, self.owner, self.gone, self.stop = edge, stream, owner, gone, stop
        self.session_id = ""  # known once Open is read: names the session in the edge's log

    def run(self) -> Iterator[pb.EdgeMessage]:
        first = self.stream.next()
        if first.WhichOneof("kind") != "open":
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"the first message must be Open, got {first.WhichOneof('kind')}"
            )
        op = first.open
        self.session_id = op.session_id
        self._check_open(op)
        s = self._new_session(op)
        if op.resume_tokens:
            self.edge.sessions.wait_released(op.session_id, self.owner, op.resume_token, timeout=RELEASE_WAIT)
        with self.edge.sessions.hold(op.session_id, s):
            yield from self._held(s, op)

    # -- Open ---------------------------------------------------------------------------------
    def _check_open(self, op: pb.Open) -> None:
        edge, cfg = self.edge, self.edge.runner.cfg
        if edge.draining.is_set():
            raise Abort(grpc.StatusCode.UNAVAILABLE, "edge is draining (shutting down); open the session elsewhere")
        if op.fingerprint != edge.runner.fingerprint:
            raise Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"weights fingerprint mismatch: device has {op.fingerprint or '(none)'}, "
                f"edge has {edge.runner.fingerprint}",
            )
        if not edge.runner.min_split <= op.split < cfg.num_layers:
            raise BadInput(
                f"split {op.split} is out of range: this edge serves splits "
                f"{edge.runner.min_split}..{cfg.num_layers - 1}"
            )
        if not 0 < len(op.session_id) <= wire.MAX_SESSION_ID_CHARS:
            raise BadInput(f"session_id must be 1..{wire.MAX_SESSION_ID_CHARS} characters")
        most = edge.session_limits.max_new_tokens
        if not 1 <= op.max_new_tokens <= most:
            raise BadInput(f"max_new_tokens must be in 1..{most}, got {op.max_new_tokens}")
        if op.resume_tokens >= edge.max_context:
            raise BadInput(f"resume_tokens {op.resume_tokens} is beyond the context limit of {edge.max_context} tokens")
        if len(op.stop_ids) > wire.MAX_STOP_IDS or any(t >= cfg.vocab_size for t in op.stop_ids):
            raise BadInput(
                f"stop_ids: at most {wire.MAX_STOP_IDS} ids, each below the vocabulary size {cfg.vocab_size}"
            )
        if (
            len(op.prefix_hashes) != len(op.prefix_lengths)
            or len(op.prefix_hashes) > wire.MAX_OFFERS
            or any(len(h) != DIGEST for h in op.prefix_hashes)
        ):
            raise BadInput(
                f"prefix_hashes ({DIGEST} bytes each) and prefix_lengths must pair up, at most {wire.MAX_OFFERS}"
            )
        if op.split > 0:
            codec.get_codec(op.codec)  # CodecError: an unknown codec

    def _new_session(self, op: pb.Open) -> TailSession:
        sp = op.sampling
        try:
            params = SamplingParams(
                temperature=sp.temperature,
                top_k=sp.top_k,
                top_p=sp.top_p or 1.0,
                seed=sp.seed if sp.HasField("seed") else None,
            )
        except ValueError as e:  # SamplingParams' own range checks
            raise BadInput(str(e)) from None
        runner = self.edge.runner
        s = runner.new_session(
            op.split, op.codec if op.split > 0 else wire.TOKEN_IDS, params, op.session_id, op.max_new_tokens
        )
        if op.split == 0:  # the chain a fresh session's names start from (the device's seed at split 0)
            s.start_state = seed(runner.fingerprint, 0, wire.TOKEN_IDS, "-")
        s.owner = self.owner
        # a resume of this session ends this stream for real: the RPC is cancelled, which wakes a
        # handler waiting for the device's next Step (at split 0 the loop also checks `gone`)
        s.stop = self._end_stream
        # the session's capability: only who holds it may resume the session (ids alone claim nothing)
        s.resume_token = op.resume_token if op.resume_tokens else secrets.token_bytes(wire.RESUME_TOKEN_BYTES)
        return s

    def _end_stream(self) -> None:
        self.gone.set()
        self.stop()

    def _held(self, s: TailSession, op: pb.Open) -> Iterator[pb.EdgeMessage]:
        """The session while the store holds it; its cache is kept afterwards unless it failed."""
        edge, keep = self.edge, False
        try:
            s.cached_tokens = self._resume(s, op) if op.resume_tokens else self._claim(s, op)
            edge.metrics.sessions_opened.labels("resumed" if op.resume_tokens else "new").inc()
            edge.metrics.split_layer.observe(op.split)
            yield pb.EdgeMessage(
                opened=pb.Opened(
                    session_id=op.session_id,
                    limits=edge.limits(),
                    cached_tokens=s.cached_tokens,
                    resumed=bool(op.resume_tokens),
                    replica=REPLICA,
                    resume_token=s.resume_token,
                )
            )
            keep = True  # a device that goes away early still leaves a consistent cache
            yield from self._generate(s, op)
        except (ClientGone, GeneratorExit):  # GeneratorExit: the RPC ended while we waited to send
            raise
        except BaseException:
            keep = False
            raise
        finally:
            edge.scheduler.finished(s)
            if keep and edge.prefix_reuse:
                edge.sessions.keep(s)

    def _resume(self, s: TailSession, op: pb.Open) -> int:
        """Positions the session goes on from (its own kept cache), or NOT_FOUND: the device replays."""
        # a resume without the session's token is a miss like any other: the device replays (an older
        # device that sends none too), and the answer tells nothing about which ids are live
        if len(op.resume_token) != wire.RESUME_TOKEN_BYTES or not self.edge.sessions.resume(
            s, op.resume_tokens, op.resume_token
        ):
            self.edge.metrics.session_misses.inc()
            raise Abort(
                grpc.StatusCode.NOT_FOUND,
                f"session {op.session_id!r} is not held by this edge (it ran on another replica, or this one "
                f"restarted or evicted it): replay its history",
                trailers=((wire.REPLAY_KEY, wire.SESSION_MISSING),),
            )
        return op.resume_tokens

    def _claim(self, s: TailSession, op: pb.Open) -> int:
        """Positions of a kept cache this session starts from (0 when reuse is off or nothing matches)."""
        if not (self.edge.prefix_reuse and op.prefix_hashes):
            return 0
        return self.edge.sessions.claim(s, list(zip(op.prefix_hashes, op.prefix_lengths, strict=True)))

    # -- Prefill ------------------------------------------------------------------------------
    def _prefill(self, s: TailSession, op: pb.Open, prefill: pb.Prefill) -> tuple[int, float, Timings]:
        if s.split > 0 and not prefill.frame:
            raise BadInput("a hidden-state frame is required at split > 0")
        n_new = len(prefill.token_ids) if s.split == 0 else self._frame_tokens(prefill.frame)
        total = s.cached_tokens + n_new
        if total + op.max_new_tokens > self.edge.max_context:
            raise BadInput(
                f"prompt ({total} tokens) + max_new_tokens ({op.max_new_tokens}) "
                f"exceeds the context limit of {self.edge.max_context} tokens"
            )
        if prefill.block_hashes or prefill.chain_state:
            self._name_blocks(s, prefill, total)
        t = Timings()
        x = self.edge.runner.prefill_input(s, prefill.frame, list(prefill.token_ids), t)
        token, logprob, ts = self.edge.scheduler.prefill(s, x)
        t.add(ts)
        s.prompt_tokens = total
        if s.cached_tokens and n_new:
            self.edge.metrics.prefix_bytes_saved.inc(s.cached_tokens * prefill.ByteSize() / n_new)
        return token, logprob, t

    def _name_blocks(self, s: TailSession, prefill: pb.Prefill, total: int) -> None:
        """File the names the device gave the blocks this prefill completes (checked at split 0)."""
        want = total // BLOCK - s.cached_tokens // BLOCK
        if (
            len(prefill.block_hashes) != want
            or len(prefill.chain_state) != DIGEST
            or any(len(h) != DIGEST for h in prefill.block_hashes)
        ):
            raise BadInput(
                f"block_hashes must name the {want} {BLOCK}-token blocks this prefill completes "
                f"({DIGEST} bytes each, with a {DIGEST}-byte chain_state); "
                f"got {len(prefill.block_hashes)}"
            )
        s.chain = PrefixChain(prefill.chain_state, total, s.chain_blocks + list(prefill.block_hashes))
        if s.split == 0:
            s.chain = self._verified(s, s.chain, list(prefill.token_ids))

    def _frame_tokens(self, frame: bytes) -> int:
        """Tokens a [T, d] frame holds, from its header alone (CodecError when the header is not one of
        a [T, hidden] frame within the cap): the context and step checks run before any decoding."""
        runner = self.edge.runner
        return codec.frame_token_count(
            frame, hidden_size=runner.cfg.hidden_size, max_decoded_bytes=runner.max_frame_bytes
        )

    @staticmethod
    def _verified(s: TailSession, named: PrefixChain, ids: list[int]) -> PrefixChain | None:
        """At split 0 the edge sees the ids, so it recomputes the names the device gave the cache and
        refuses a mismatch: a device must not file its cache under another prefix's name (other
        sessions would then claim it). None when the chain's start is unknown here (a resume in the
        middle of a block): the cache is then kept for resume only, under no prefix name."""
        if s.start_state is None:
            return None
        chain = PrefixChain(s.start_state, s.cached_tokens, list(s.chain_blocks))
        chain.extend(ids)
        if chain.blocks != named.blocks or not hmac.compare_digest(chain.state, named.state):
            raise BadInput("block_hashes / chain_state do not match the prefill's token ids")
        return chain

    # -- tokens -------------------------------------------------------------------------------
    def _generate(self, s: TailSession, op: pb.Open) -> Iterator[pb.EdgeMessage]:
        m, stops = self.edge.metrics, frozenset(op.stop_ids)
        token, logprob, t = self._prefill(s, op, self.stream.next_of("prefill"))
        m.prefill_seconds.observe(t.compute)
        while True:
            s.generated += 1
            s.total.add(t)
            m.queue_seconds.observe(t.queue)
            m.tokens.inc()
            reason = finish_reason(token, s.generated, op.max_new_tokens, stops)
            finish = MORE if reason is None else FINISH.get(reason, MORE)
            yield pb.EdgeMessage(
                token=pb.Token(
                    id=token, logprob=logprob, position=s.position, timings=timings_pb(t), finish_reason=finish
                )
            )
            if finish != MORE:
                yield from self._finish(s, finish)
                return
            if self.gone.is_set():
                return
            token, logprob, t = self._step(s, token)
            m.step_seconds.observe(t.compute)

    def _step(self, s: TailSession, fed: int) -> tuple[int, float, Timings]:
        """Feed the last token (its hidden state from the device at split > 0); the next token."""
        frame = None if s.split == 0 else self.stream.next_of("step").frame
        if frame is not None and (n := self._frame_tokens(frame)) != 1:  # before anything is decoded
            raise BadInput(f"a step carries exactly 1 token, got a frame of {n}")
        x, t = self.edge.runner.step_input(s, frame, fed)
        token, logprob, ts = self.edge.scheduler.step(s, x)
        t.add(ts)
        if s.chain is not None:
            s.chain.extend([fed])  # the cache now holds the token it was fed
        return token, logprob, t

    def _finish(self, s: TailSession, finish: pb.FinishReason) -> Iterator[pb.EdgeMessage]:
        if self.edge.prefix_reuse:
            self.edge.sessions.keep(s)  # before Done: the device's next turn may open right after it
        yield pb.EdgeMessage(
            done=pb.Done(
                finish_reason=finish,
                prompt_tokens=s.prompt_tokens,
                generated_tokens=s.generated,
                total=timings_pb(s.total),
            )
        )
        self.stream.until_half_closed()
