"""The gRPC servicer: validates each message, calls the TailRunner, reports timings. Nothing more."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc

from coinfer import __version__, codec, profile
from coinfer.model.sampling import SamplingParams
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc
from edge_server import security
from edge_server.config import EdgeSettings
from edge_server.deadlines import StreamDeadlines, Watched
from edge_server.metrics import EdgeMetrics
from coinfer.prefix import BLOCK, DIGEST, PrefixChain, seed
from edge_server.scheduler import Scheduler
from edge_server.sessions import SessionEvicted, SessionExistsError, SessionLimitError, SessionStore
from edge_server.tail import TailRunner, TailSession, Timings

log = logging.getLogger("coinfer.edge")
REPLICA = f"{socket.gethostname()}:{os.getpid()}"  # names this edge process in Opened
MAX_OFFERS = 64  # prefixes one Open may offer for reuse
MAX_STOP_IDS = 64  # stop ids one Open may name (eos and a few stop tokens)
TOKEN_BYTES = 16  # a session's resume token: the capability to go on with it
REPLAY_KEY = "coinfer-replay"  # trailing metadata of NOT_FOUND on a resume: the device must replay
STATUS_KEY = "coinfer-status"  # every error's code again, in trailing metadata: HAProxy replaces the
#                                status of a stream it resets with CANCELLED but passes the metadata on
STOP, LENGTH, MORE = pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_UNSPECIFIED


def _prefix_seed(fingerprint: str) -> bytes:
    return seed(fingerprint, 0, "token_ids", "-")


def _canceller(context):
    """How to end this RPC from another thread (grpc's context and edge_server.ray_serve's both cancel)."""
    return getattr(context, "cancel", None) or (lambda: None)


class ClientGone(Exception):
    """The device half-closed or vanished before the session was over."""


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after: float | None = None,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after
        self.metadata = ((STATUS_KEY, code.name), *metadata,
                         *((("retry-after-ms", str(int(retry_after * 1000))),) if retry_after is not None else ()))


def timings_pb(t: Timings) -> pb.EdgeTimings:
    return pb.EdgeTimings(queue_seconds=t.queue, compute_seconds=t.compute, decode_seconds=t.decode)


class Stream:
    """What a Generate handler reads from: the device's messages under the stream's deadlines."""

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



class EdgeService(edge_pb2_grpc.EdgeInferenceServicer):
    def __init__(self, runner: TailRunner, settings: EdgeSettings, metrics: EdgeMetrics) -> None:
        self.runner, self.settings, self.metrics = runner, settings, metrics
        self.sessions = SessionStore(settings.max_sessions, settings.kv_budget_bytes, settings.idle_timeout_seconds,
                                     settings.keep_seconds, settings.max_sessions_per_client)
        self.scheduler = Scheduler(runner.model, self.sessions, settings.max_batch, settings.batch_wait_ms / 1000,
                                   settings.prefill_chunk_tokens, on_batch=self._on_batch)
        ctx = runner.cfg.max_position_embeddings
        self.max_context = min(settings.max_context_tokens or ctx, ctx)
        self.draining = threading.Event()
        self.tokens_required = False  # set by whoever installs the token check: then a bearer is an identity
        self.deadlines = StreamDeadlines(settings.first_message_seconds, settings.stream_idle_seconds)
        self._streams: Counter[str] = Counter()  # Generate handlers running, per client identity
        self._streams_lock = threading.Lock()
        self._counted_stats: dict[str, int] = {}
        metrics.kv_budget_bytes.set(settings.kv_budget_bytes)

    def _on_batch(self, kind: str, size: int, queue: float, seconds: float) -> None:
        self.runner.load.record(queue, seconds)
        if kind == "decode":
            self.metrics.batch_size.observe(size)
        else:
            self.metrics.prefill_chunks.inc()

    # -- unary ---------------------------------------------------------------------------
    def limits(self) -> pb.Limits:
        s = self.settings
        return pb.Limits(max_sessions=s.max_sessions, max_context_tokens=self.max_context,
                         max_new_tokens=s.max_new_tokens, max_message_bytes=s.max_message_bytes,
                         max_frame_bytes=s.max_frame_bytes)

    def Describe(self, request, context) -> pb.DescribeResponse:
        cfg, runner = self.runner.cfg, self.runner
        queue, busy = runner.load.snapshot()
        reply = pb.DescribeResponse(
            model=runner.model_dir.name, fingerprint=runner.fingerprint, num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size, min_split=runner.min_split,
            codecs=list(codec.CODECS), limits=self.limits(),
            load=pb.Load(active_sessions=len(self.sessions), kv_cache_bytes=self.sessions.used_bytes,
                         queue_seconds=queue, busy_fraction=busy, kv_budget_bytes=self.sessions.budget,
                         kept_caches=self.sessions.kept_count),
            server_version=__version__, weights=runner.model.precision,
        )
        if request.include_profile and runner.profile is not None:
            reply.profile.CopyFrom(profile.to_pb(runner.profile))
        return reply

    def Probe(self, request, context) -> pb.ProbeResponse:
        """An echo for link measurements; the reply is capped (max_probe_bytes) so a flood of probes
        asking for the message limit cannot turn the edge into an amplifier."""
        t0 = time.perf_counter()
        n = min(request.reply_bytes, self.settings.max_probe_bytes, self.settings.max_message_bytes - 64)
        self.metrics.probe_bytes.inc(n)
        return pb.ProbeResponse(payload=bytes(n), edge_seconds=time.perf_counter() - t0)

    # -- the session stream ----------------------------------------------------------------
    def Generate(self, request_iterator, context) -> Iterator[pb.EdgeMessage]:
        gone = threading.Event()
        context.add_callback(gone.set)  # runs when the RPC ends, including a client that vanished
        outcome = "ok"
        owner = security.identity(context, self.tokens_required)
        counted, watched = False, None
        try:
            self._enter_stream(owner)
            counted = True
            with self.deadlines.watch(_canceller(context)) as watched:
                stream = Stream(self._counted(request_iterator), self.deadlines, watched)
                for reply in self._session(stream, gone, owner, context):
                    # grpc holds the handler here until the device takes the reply (flow control): a
                    # device that stops reading is as silent as one that stops sending
                    with self.deadlines.waiting(watched):
                        yield reply
        except Abort as e:
            outcome = e.code.name.lower()
            log.info("session aborted: %s %s", e.code.name, e.message)
            context.set_trailing_metadata(e.metadata)
            context.abort(e.code, e.message)
        except (ClientGone, grpc.RpcError):
            outcome = "client_gone"
        finally:
            if watched is not None and watched.expired:
                outcome = "deadline"
                self.metrics.streams_ended.inc()
            if counted:
                with self._streams_lock:
                    self._streams[owner] -= 1
                    if not self._streams[owner]:
                        del self._streams[owner]
            if gone.is_set() and outcome == "ok":
                outcome = "client_gone"
            self.metrics.sessions.labels(outcome).inc()
            self.update_gauges()

    def _enter_stream(self, owner: str) -> None:
        """Admit a Generate stream, or refuse it at once: streams beyond max_streams would take the
        worker threads that health checks, Describe and Probe need, and one client beyond
        max_streams_per_client would take the other clients' streams."""
        per_client = self.settings.max_streams_per_client
        with self._streams_lock:
            total = sum(self._streams.values())
            if total >= self.settings.max_streams:
                why = f"edge has {total} streams open (max_streams)"
            elif per_client and self._streams[owner] >= per_client:
                why = f"this client has {per_client} streams open (max_streams_per_client)"
            else:
                self._streams[owner] += 1
                return
        raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why + "; retry later", self.sessions.retry_after())

    def _counted(self, it: Iterator[pb.DeviceMessage]) -> Iterator[pb.DeviceMessage]:
        for msg in it:
            self.metrics.wire_bytes.labels("in").inc(msg.ByteSize())
            yield msg

    def _send(self, msg: pb.EdgeMessage) -> pb.EdgeMessage:
        self.metrics.wire_bytes.labels("out").inc(msg.ByteSize())
        return msg

    def update_gauges(self) -> None:
        m, store = self.metrics, self.sessions
        m.active_sessions.set(len(store))
        m.kv_cache_bytes.set(store.used_bytes)
        m.kv_kept_caches.set(store.kept_count)
        st = store.stats
        for counter, value in ((m.evictions.labels("live"), st.evicted_live), (m.evictions.labels("kept"), st.evicted_kept),
                               (m.evictions.labels("expired"), st.expired), (m.prefix_hits, st.prefix_hits),
                               (m.prefix_tokens, st.prefix_tokens)):
            last = self._counted_stats.get(id(counter), 0)
            if value > last:
                counter.inc(value - last)
                self._counted_stats[id(counter)] = value

    def _session(self, requests: Stream, gone: threading.Event, owner: str, context=None) -> Iterator[pb.EdgeMessage]:
        first = requests.next()
        if first.WhichOneof("kind") != "open":
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"the first message must be Open, got {first.WhichOneof('kind')}")
        op = first.open
        session = self._open(op)
        session.owner = owner
        # a resume of this session ends this stream for real: the RPC is cancelled, which wakes a
        # handler waiting for the device's next Step (at split 0 the loop also checks `gone`)
        cancel = _canceller(context)
        session.stop = lambda: (gone.set(), cancel())
        # the session's capability: only who holds it may resume the session (ids alone claim nothing)
        session.resume_token = op.resume_token if op.resume_tokens else secrets.token_bytes(TOKEN_BYTES)
        keep = False
        if op.resume_tokens:
            self.sessions.wait_released(op.session_id, owner, op.resume_token, timeout=2.0)
        try:
            with self.sessions.hold(op.session_id, session):
                try:
                    session.cached_tokens = self._resume(session, op) if op.resume_tokens else self._claim(session, op)
                    self.metrics.sessions_opened.labels("resumed" if op.resume_tokens else "new").inc()
                    self.metrics.split_layer.observe(op.split)
                    self.update_gauges()
                    yield self._send(pb.EdgeMessage(opened=pb.Opened(
                        session_id=op.session_id, limits=self.limits(), cached_tokens=session.cached_tokens,
                        resumed=bool(op.resume_tokens), replica=REPLICA, resume_token=session.resume_token)))
                    keep = True  # a device that goes away early still leaves a consistent cache
                    yield from self._run(session, op, requests, gone)
                except (ClientGone, GeneratorExit):  # GeneratorExit: the RPC ended while we waited to send
                    raise
                except BaseException:
                    keep = False
                    raise
                finally:
                    self.scheduler.finished(session)
                    if keep and self.settings.prefix_reuse:
                        self.sessions.keep(session)
        except SessionLimitError as e:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e), e.retry_after) from None
        except SessionExistsError as e:
            raise Abort(grpc.StatusCode.ALREADY_EXISTS, str(e)) from None
        except SessionEvicted as e:
            raise Abort(grpc.StatusCode.ABORTED, str(e)) from None

    def _open(self, op: pb.Open) -> TailSession:
        if self.draining.is_set():
            raise Abort(grpc.StatusCode.UNAVAILABLE, "edge is draining (shutting down); open the session elsewhere")
        if op.fingerprint != self.runner.fingerprint:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                        f"weights fingerprint mismatch: device has {op.fingerprint or '(none)'}, "
                        f"edge has {self.runner.fingerprint}")
        n = self.runner.cfg.num_layers
        if not self.runner.min_split <= op.split < n:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"split {op.split} is out of range: this edge serves splits {self.runner.min_split}..{n - 1}")
        if not 0 < len(op.session_id) <= 128:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "session_id must be 1..128 characters")
        if not 1 <= op.max_new_tokens <= self.settings.max_new_tokens:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"max_new_tokens must be in 1..{self.settings.max_new_tokens}, got {op.max_new_tokens}")
        if op.resume_tokens >= self.max_context:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"resume_tokens {op.resume_tokens} is beyond the context limit of {self.max_context} tokens")
        if len(op.stop_ids) > MAX_STOP_IDS or any(t >= self.runner.cfg.vocab_size for t in op.stop_ids):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"stop_ids: at most {MAX_STOP_IDS} ids, each below the vocabulary size "
                        f"{self.runner.cfg.vocab_size}")
        if len(op.prefix_hashes) != len(op.prefix_lengths) or len(op.prefix_hashes) > MAX_OFFERS \
                or any(len(h) != DIGEST for h in op.prefix_hashes):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"prefix_hashes ({DIGEST} bytes each) and prefix_lengths must pair up, at most {MAX_OFFERS}")
        try:
            if op.split > 0:
                codec.get_codec(op.codec)
            sp = op.sampling
            params = SamplingParams(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p or 1.0,
                                    seed=sp.seed if sp.HasField("seed") else None)
        except ValueError as e:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        session = self.runner.new_session(op.split, op.codec if op.split > 0 else "token_ids", params,
                                          op.session_id, op.max_new_tokens)
        if op.split == 0:  # the chain a fresh session's names start from (the device's seed at split 0)
            session.start_state = _prefix_seed(self.runner.fingerprint)
        return session

    def _resume(self, s: TailSession, op: pb.Open) -> int:
        """Positions the session goes on from (its own kept cache), or NOT_FOUND: the device replays."""
        # a resume without the session's token is a miss like any other: the device replays (an older
        # device that sends none too), and the answer tells nothing about which ids are live
        if len(op.resume_token) != TOKEN_BYTES or not self.sessions.resume(s, op.resume_tokens, op.resume_token):
            self.metrics.session_misses.inc()
            raise Abort(grpc.StatusCode.NOT_FOUND,
                        f"session {op.session_id!r} is not held by this edge (it ran on another replica, or this one "
                        f"restarted or evicted it): replay its history", metadata=((REPLAY_KEY, "session-missing"),))
        return op.resume_tokens

    def _claim(self, s: TailSession, op: pb.Open) -> int:
        """Positions of a kept cache this session starts from (0 when reuse is off or nothing matches)."""
        if not (self.settings.prefix_reuse and op.prefix_hashes):
            return 0
        return self.sessions.claim(s, list(zip(op.prefix_hashes, op.prefix_lengths)))

    def _next_input(self, requests: Stream, want: str):
        msg = requests.next()
        kind = msg.WhichOneof("kind")
        if kind != want:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"expected {want}, got {kind}")
        return getattr(msg, want)

    def _prefill(self, s: TailSession, op: pb.Open, prefill: pb.Prefill) -> tuple[int, float, Timings]:
        if s.split > 0 and not prefill.frame:
            raise ValueError("a hidden-state frame is required at split > 0")
        n_new = len(prefill.token_ids) if s.split == 0 else self._frame_tokens(prefill.frame)
        total = s.cached_tokens + n_new
        if total + op.max_new_tokens > self.max_context:
            raise ValueError(f"prompt ({total} tokens) + max_new_tokens ({op.max_new_tokens}) "
                             f"exceeds the context limit of {self.max_context} tokens")
        if prefill.block_hashes or prefill.chain_state:
            want = total // BLOCK - s.cached_tokens // BLOCK
            if len(prefill.block_hashes) != want or len(prefill.chain_state) != DIGEST \
                    or any(len(h) != DIGEST for h in prefill.block_hashes):
                raise ValueError(f"block_hashes must name the {want} {BLOCK}-token blocks this prefill completes "
                                 f"({DIGEST} bytes each, with a {DIGEST}-byte chain_state); "
                                 f"got {len(prefill.block_hashes)}")
            s.chain = PrefixChain(prefill.chain_state, total, s.chain_blocks + list(prefill.block_hashes))
            if s.split == 0:
                s.chain = self._verified(s, s.chain, list(prefill.token_ids))
        t = Timings()
        x = self.runner.prefill_input(s, prefill.frame, list(prefill.token_ids), t)
        token, logprob, ts = self.scheduler.prefill(s, x)
        t.add(ts)
        s.prompt_tokens = total
        if s.cached_tokens and n_new:
            self.metrics.prefix_bytes_saved.inc(s.cached_tokens * prefill.ByteSize() / n_new)
        return token, logprob, t

    def _frame_tokens(self, frame: bytes) -> int:
        """Tokens a [T, d] frame holds, from its header alone (CodecError when the header is not one of
        a [T, hidden] frame within the cap): the context and step checks run before any decoding."""
        return codec.frame_token_count(frame, hidden_size=self.runner.cfg.hidden_size,
                                       max_decoded_bytes=self.runner.max_frame_bytes)

    def _verified(self, s: TailSession, named: PrefixChain, ids: list[int]) -> PrefixChain | None:
        """At split 0 the edge sees the ids, so it recomputes the names the device gave the cache and
        refuses a mismatch: a device must not file its cache under another prefix's name (other
        sessions would then claim it). None when the chain's start is unknown here (a resume in the
        middle of a block): the cache is then kept for resume only, under no prefix name."""
        if s.start_state is None:
            return None
        chain = PrefixChain(s.start_state, s.cached_tokens, list(s.chain_blocks))
        chain.extend(ids)
        if chain.blocks != named.blocks or not hmac.compare_digest(chain.state, named.state):
            raise ValueError("block_hashes / chain_state do not match the prefill's token ids")
        return chain

    def _run(self, s: TailSession, op: pb.Open, requests: Stream, gone: threading.Event) -> Iterator[pb.EdgeMessage]:
        stops = frozenset(op.stop_ids)
        prefill = self._next_input(requests, "prefill")
        try:
            token, logprob, t = self._prefill(s, op, prefill)
            self.metrics.prefill_seconds.observe(t.compute)
            while True:
                s.generated += 1
                s.total.add(t)
                self.metrics.queue_seconds.observe(t.queue)
                self.metrics.tokens.inc()
                finish = STOP if token in stops else LENGTH if s.generated >= op.max_new_tokens else MORE
                yield self._send(pb.EdgeMessage(token=pb.Token(
                    id=token, logprob=logprob, position=s.position, timings=timings_pb(t), finish_reason=finish)))
                if finish != MORE:
                    if self.settings.prefix_reuse:
                        self.sessions.keep(s)  # before Done: the device's next turn may open right after it
                    yield self._send(pb.EdgeMessage(done=pb.Done(
                        finish_reason=finish, prompt_tokens=s.prompt_tokens, generated_tokens=s.generated,
                        total=timings_pb(s.total))))
                    requests.until_half_closed()
                    return
                if gone.is_set():
                    return
                frame = None if s.split == 0 else self._next_input(requests, "step").frame
                if frame is not None and (n := self._frame_tokens(frame)) != 1:  # before anything is decoded
                    raise ValueError(f"a step carries exactly 1 token, got a frame of {n}")
                x, t = self.runner.step_input(s, frame, token)
                fed, (token, logprob, ts) = token, self.scheduler.step(s, x)
                t.add(ts)
                if s.chain is not None:
                    s.chain.extend([fed])  # the cache now holds the token it was fed
                self.metrics.step_seconds.observe(t.compute)
        except (codec.CodecError, ValueError) as e:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
