"""The gRPC servicer: Describe, Probe, and Generate's plumbing around the session protocol.

Generate admits a stream (max_streams, per client), holds it to its deadlines, runs
edge_server.session_protocol on it and answers every failure with a status from one table
(STATUS_OF): the device decides what to do next by that status alone. What is not in the
table is a fault of the edge: INTERNAL, logged here with the session id, its text never sent.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc

from coinfer import __version__, codec, profile, wire
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc
from edge_server import security
from edge_server.config import EdgeSettings
from edge_server.deadlines import StreamDeadlines
from edge_server.errors import Abort, BadInput
from edge_server.metrics import EdgeMetrics
from edge_server.scheduler import Scheduler, ShuttingDown
from edge_server.session_protocol import ClientGone, Edge, SessionProtocol, Stream
from edge_server.sessions import SessionEvicted, SessionExistsError, SessionLimitError, SessionStore
from edge_server.tail import TailRunner

log = logging.getLogger("coinfer.edge")
INTERNAL_DETAILS = "internal error on the edge (logged there)"
_C = grpc.StatusCode
# INVALID_ARGUMENT is never retried by the device: only the session's own input may map to it
STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (BadInput, _C.INVALID_ARGUMENT),
    (codec.CodecError, _C.INVALID_ARGUMENT),  # NonFiniteState included: the session's own hidden states
    (SessionLimitError, _C.RESOURCE_EXHAUSTED),  # session limit or KV budget: retry after the hint
    (SessionExistsError, _C.ALREADY_EXISTS),
    (SessionEvicted, _C.ABORTED),  # the device replays
    (ShuttingDown, _C.UNAVAILABLE),  # another edge may serve
)


def status_of(e: Exception) -> tuple[grpc.StatusCode, str, wire.Metadata] | None:
    """(code, details, trailers) that answer `e`; None for a fault of the edge (INTERNAL)."""
    if isinstance(e, Abort):
        return e.code, e.message, wire.error_trailers(e.code, e.retry_after, e.trailers)
    for kind, code in STATUS_OF:
        if isinstance(e, kind):
            return code, str(e), wire.error_trailers(code, getattr(e, "retry_after", None))
    return None


def _unary_faults(method):
    """Describe and Probe answer a fault of the edge the way Generate does: INTERNAL without its text
    (grpc's default, UNKNOWN with the exception's text, would hand internals to the caller), logged
    with its traceback."""

    @functools.wraps(method)
    def answer(self, request, context):
        try:
            return method(self, request, context)
        except Exception:  # noqa: BLE001 - a unary call answers a status, INTERNAL at worst
            log.exception("%s failed on the edge", method.__name__)
            if context is None:  # called in-process (edge_server.ray_serve): its caller answers
                raise
            context.set_trailing_metadata(wire.error_trailers(_C.INTERNAL))
            context.abort(_C.INTERNAL, INTERNAL_DETAILS)

    return answer


def _canceller(context):
    """How to end this RPC from another thread (grpc's context and edge_server.ray_serve's both cancel)."""
    return getattr(context, "cancel", None) or (lambda: None)


class EdgeService(edge_pb2_grpc.EdgeInferenceServicer):
    def __init__(self, runner: TailRunner, settings: EdgeSettings, metrics: EdgeMetrics) -> None:
        self.runner, self.settings, self.metrics = runner, settings, metrics
        limits = settings.limits
        self.sessions = SessionStore.from_settings(limits, settings.kv)
        self.scheduler = Scheduler.from_settings(runner.model, self.sessions, settings.batching, self._on_batch)
        ctx = runner.cfg.max_position_embeddings
        self.draining = threading.Event()
        self.edge = Edge(
            runner,
            self.sessions,
            self.scheduler,
            limits,
            settings.kv.prefix_reuse,
            settings.server.max_message_bytes,
            metrics,
            self.draining,
            max_context=min(limits.max_context_tokens or ctx, ctx),
        )
        self.tokens_required = False  # set by whoever installs the token check: then a bearer is an identity
        self.deadlines = StreamDeadlines.from_settings(limits)
        self._streams: Counter[str] = Counter()  # Generate handlers running, per client identity
        self._streams_lock = threading.Lock()
        metrics.watch(self.sessions)

    def _on_batch(self, kind: str, size: int, queue: float, seconds: float) -> None:
        self.runner.load.record(queue, seconds)
        if kind == "decode":
            self.metrics.batch_size.observe(size)
        else:
            self.metrics.prefill_chunks.inc()

    # -- unary ---------------------------------------------------------------------------
    @_unary_faults
    def Describe(self, request, context) -> pb.DescribeResponse:
        cfg, runner = self.runner.cfg, self.runner
        queue, busy = runner.load.snapshot()
        reply = pb.DescribeResponse(
            model=runner.model_dir.name,
            fingerprint=runner.fingerprint,
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
            min_split=runner.min_split,
            codecs=list(codec.CODECS),
            limits=self.edge.limits(),
            load=pb.Load(
                active_sessions=len(self.sessions),
                kv_cache_bytes=self.sessions.used_bytes,
                queue_seconds=queue,
                busy_fraction=busy,
                kv_budget_bytes=self.sessions.budget,
                kept_caches=self.sessions.kept_count,
            ),
            server_version=__version__,
            weights=runner.model.precision,
        )
        if request.include_profile and runner.profile is not None:
            reply.profile.CopyFrom(profile.to_pb(runner.profile))
        return reply

    @_unary_faults
    def Probe(self, request, context) -> pb.ProbeResponse:
        """An echo for link measurements; the reply is capped (max_probe_bytes) so a flood of probes
        asking for the message limit cannot turn the edge into an amplifier."""
        t0 = time.perf_counter()
        s = self.settings
        n = min(request.reply_bytes, s.limits.max_probe_bytes, s.server.max_message_bytes - 64)
        self.metrics.probe_bytes.inc(n)
        return pb.ProbeResponse(payload=bytes(n), edge_seconds=time.perf_counter() - t0)

    # -- the session stream ----------------------------------------------------------------
    def Generate(self, request_iterator, context) -> Iterator[pb.EdgeMessage]:
        gone = threading.Event()
        context.add_callback(gone.set)  # runs when the RPC ends, including a client that vanished
        outcome, owner = "ok", security.identity(context, self.tokens_required)
        counted, watched, protocol = False, None, None
        try:
            self._enter_stream(owner)
            counted = True
            with self.deadlines.watch(_canceller(context)) as watched:
                stream = Stream(self._counted(request_iterator), self.deadlines, watched)
                protocol = SessionProtocol(self.edge, stream, owner, gone, _canceller(context))
                for reply in protocol.run():
                    self.metrics.wire_bytes.labels("out").inc(reply.ByteSize())
                    # grpc holds the handler here until the device takes the reply (flow control): a
                    # device that stops reading is as silent as one that stops sending
                    with self.deadlines.waiting(watched):
                        yield reply
        except (ClientGone, grpc.RpcError):
            outcome = "client_gone"
        except Exception as e:  # noqa: BLE001 - every failure answers with a status, INTERNAL at worst
            code, details, trailers = self._answer(e, protocol.session_id if protocol is not None else "")
            outcome = code.name.lower()
            context.set_trailing_metadata(trailers)
            context.abort(code, details)
        finally:
            if watched is not None and watched.expired:
                outcome = "deadline"
                self.metrics.streams_ended.inc()
            if counted:
                self._leave_stream(owner)
            if gone.is_set() and outcome == "ok":
                outcome = "client_gone"
            self.metrics.sessions.labels(outcome).inc()

    @staticmethod
    def _answer(e: Exception, session_id: str) -> tuple[grpc.StatusCode, str, wire.Metadata]:
        """The status that answers `e` (called while handling it). A fault of the edge is logged with
        its traceback and answered INTERNAL without its text: the device gives up on it rather than
        taking it for its own bad input."""
        status = status_of(e)
        if status is None:
            log.exception("session %r failed on the edge", session_id)
            return _C.INTERNAL, INTERNAL_DETAILS, wire.error_trailers(_C.INTERNAL)
        log.info("session %r refused: %s %s", session_id, status[0].name, status[1])
        return status

    def _enter_stream(self, owner: str) -> None:
        """Admit a Generate stream, or refuse it at once: streams beyond max_streams would take the
        worker threads that health checks, Describe and Probe need, and one client beyond
        max_streams_per_client would take the other clients' streams."""
        per_client = self.settings.limits.max_streams_per_client
        with self._streams_lock:
            total = sum(self._streams.values())
            if total >= self.settings.limits.max_streams:
                why = f"edge has {total} streams open (max_streams)"
            elif per_client and self._streams[owner] >= per_client:
                why = f"this client has {per_client} streams open (max_streams_per_client)"
            else:
                self._streams[owner] += 1
                return
        raise Abort(_C.RESOURCE_EXHAUSTED, why + "; retry later", self.sessions.retry_after())

    def _leave_stream(self, owner: str) -> None:
        with self._streams_lock:
            self._streams[owner] -= 1
            if not self._streams[owner]:
                del self._streams[owner]

    def _counted(self, it: Iterator[pb.DeviceMessage]) -> Iterator[pb.DeviceMessage]:
        for msg in it:
            self.metrics.wire_bytes.labels("in").inc(msg.ByteSize())
            yield msg
