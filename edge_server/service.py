"""The gRPC servicer: validates each message, calls the TailRunner, reports timings. Nothing more."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import grpc

from coinfer import __version__, codec, profile
from coinfer.model.sampling import SamplingParams
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc
from edge_server.config import EdgeSettings
from edge_server.metrics import EdgeMetrics
from edge_server.sessions import SessionExistsError, SessionLimitError, SessionStore
from edge_server.tail import TailRunner, TailSession, Timings

log = logging.getLogger("coinfer.edge")
STOP, LENGTH, MORE = pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_UNSPECIFIED


class ClientGone(Exception):
    """The device half-closed or vanished before the session was over."""


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def timings_pb(t: Timings) -> pb.EdgeTimings:
    return pb.EdgeTimings(queue_seconds=t.queue, compute_seconds=t.compute, decode_seconds=t.decode)


def _next(requests: Iterator[pb.DeviceMessage]) -> pb.DeviceMessage:
    try:
        return next(requests)
    except StopIteration:  # must not escape a generator (PEP 479)
        raise ClientGone() from None


def frame_tokens(frame: bytes) -> int:
    """Token count a frame claims, read before decoding it (decode validates it fully)."""
    shape = codec.peek_header(frame).get("shape") if frame else None
    return shape[0] if isinstance(shape, list) and shape and isinstance(shape[0], int) else 0


class EdgeService(edge_pb2_grpc.EdgeInferenceServicer):
    def __init__(self, runner: TailRunner, settings: EdgeSettings, metrics: EdgeMetrics) -> None:
        self.runner, self.settings, self.metrics = runner, settings, metrics
        self.sessions = SessionStore(settings.max_sessions)
        ctx = runner.cfg.max_position_embeddings
        self.max_context = min(settings.max_context_tokens or ctx, ctx)
        self.draining = threading.Event()

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
            load=pb.Load(active_sessions=len(self.sessions), kv_cache_bytes=self.sessions.kv_cache_bytes(),
                         queue_seconds=queue, busy_fraction=busy),
            server_version=__version__, weights=runner.model.precision,
        )
        if request.include_profile and runner.profile is not None:
            reply.profile.CopyFrom(profile.to_pb(runner.profile))
        return reply

    def Probe(self, request, context) -> pb.ProbeResponse:
        t0 = time.perf_counter()
        n = min(request.reply_bytes, self.settings.max_message_bytes - 64)
        return pb.ProbeResponse(payload=bytes(n), edge_seconds=time.perf_counter() - t0)

    # -- the session stream ----------------------------------------------------------------
    def Generate(self, request_iterator, context) -> Iterator[pb.EdgeMessage]:
        gone = threading.Event()
        context.add_callback(gone.set)  # runs when the RPC ends, including a client that vanished
        outcome = "ok"
        try:
            yield from self._session(self._counted(request_iterator), gone)
        except Abort as e:
            outcome = e.code.name.lower()
            log.info("session aborted: %s %s", e.code.name, e.message)
            context.abort(e.code, e.message)
        except (ClientGone, grpc.RpcError):
            outcome = "client_gone"
        finally:
            if gone.is_set() and outcome == "ok":
                outcome = "client_gone"
            self.metrics.sessions.labels(outcome).inc()
            self.update_gauges()

    def _counted(self, it: Iterator[pb.DeviceMessage]) -> Iterator[pb.DeviceMessage]:
        for msg in it:
            self.metrics.wire_bytes.labels("in").inc(msg.ByteSize())
            yield msg

    def _send(self, msg: pb.EdgeMessage) -> pb.EdgeMessage:
        self.metrics.wire_bytes.labels("out").inc(msg.ByteSize())
        return msg

    def update_gauges(self) -> None:
        self.metrics.active_sessions.set(len(self.sessions))
        self.metrics.kv_cache_bytes.set(self.sessions.kv_cache_bytes())

    def _session(self, requests, gone: threading.Event) -> Iterator[pb.EdgeMessage]:
        first = _next(requests)
        if first.WhichOneof("kind") != "open":
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"the first message must be Open, got {first.WhichOneof('kind')}")
        op = first.open
        session = self._open(op)
        try:
            with self.sessions.hold(op.session_id, session):
                self.metrics.split_layer.observe(op.split)
                self.update_gauges()
                yield self._send(pb.EdgeMessage(opened=pb.Opened(session_id=op.session_id, limits=self.limits())))
                yield from self._run(session, op, requests, gone)
        except SessionLimitError as e:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except SessionExistsError as e:
            raise Abort(grpc.StatusCode.ALREADY_EXISTS, str(e)) from None

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
        try:
            if op.split > 0:
                codec.get_codec(op.codec)
            sp = op.sampling
            params = SamplingParams(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p or 1.0,
                                    seed=sp.seed if sp.HasField("seed") else None)
        except ValueError as e:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        return self.runner.new_session(op.split, op.codec, params)

    def _next_input(self, requests, want: str):
        msg = _next(requests)
        kind = msg.WhichOneof("kind")
        if kind != want:
            raise Abort(grpc.StatusCode.FAILED_PRECONDITION, f"expected {want}, got {kind}")
        return getattr(msg, want)

    def _run(self, s: TailSession, op: pb.Open, requests, gone: threading.Event) -> Iterator[pb.EdgeMessage]:
        stops = frozenset(op.stop_ids)
        prefill = self._next_input(requests, "prefill")
        try:
            n_prompt = len(prefill.token_ids) if s.split == 0 else frame_tokens(prefill.frame)
            if n_prompt + op.max_new_tokens > self.max_context:
                raise ValueError(f"prompt ({n_prompt} tokens) + max_new_tokens ({op.max_new_tokens}) "
                                 f"exceeds the context limit of {self.max_context} tokens")
            token, logprob, t = self.runner.prefill(s, prefill.frame, list(prefill.token_ids))
            self.metrics.prefill_seconds.observe(t.compute)
            while True:
                self.metrics.queue_seconds.observe(t.queue)
                self.metrics.tokens.inc()
                finish = STOP if token in stops else LENGTH if s.generated >= op.max_new_tokens else MORE
                yield self._send(pb.EdgeMessage(token=pb.Token(
                    id=token, logprob=logprob, position=s.position, timings=timings_pb(t), finish_reason=finish)))
                if finish != MORE:
                    yield self._send(pb.EdgeMessage(done=pb.Done(
                        finish_reason=finish, prompt_tokens=s.prompt_tokens, generated_tokens=s.generated,
                        total=timings_pb(s.total))))
                    return
                if gone.is_set():
                    return
                frame = None if s.split == 0 else self._next_input(requests, "step").frame
                token, logprob, t = self.runner.step(s, frame, token)
                self.metrics.step_seconds.observe(t.compute)
        except (codec.CodecError, ValueError) as e:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
