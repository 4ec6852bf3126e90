"""gRPC client of the edge: one bidi stream per request, deadlines, byte accounting."""

from __future__ import annotations

import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from coinfer import wire
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc
from device_agent.config import ConnectionSettings
from device_agent.edge.retry_policy import RETRYABLE

STREAM_BROKEN = "Stream removed"  # grpc-core's details for a stream reset below the gRPC layer
# grpc-core's details when a message is over max_send/receive_message_length, "... (N vs. M)":
# RESOURCE_EXHAUSTED like a full edge, but the request's fault
TOO_LARGE = ("Sent message larger than max", "Received message larger than max")


class EdgeError(RuntimeError):
    """The edge refused or failed a request: carries the gRPC status code and its details."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after: float | None = None) -> None:
        super().__init__(f"edge: {code.name}: {details}")
        self.code, self.details = code, details
        self.retry_after = retry_after  # s: the edge's hint (wire.RETRY_AFTER_KEY) when it is full

    @property
    def retryable(self) -> bool:
        return self.code in RETRYABLE and not self.too_large

    @property
    def too_large(self) -> bool:
        """A message over the gRPC size limit (ours or the edge's), not a full edge."""
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and (self.details or "").startswith(TOO_LARGE)

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> EdgeError:
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = e.details() if hasattr(e, "details") else str(e)
        try:
            trailers = wire.parse_error_trailers(e.trailing_metadata())
        except (AttributeError, TypeError, ValueError):  # no trailing metadata (a connection-level failure)
            trailers = wire.ErrorTrailers()
        told = trailers.code
        if told is not None and told != code:  # a proxy reset the stream after the edge's error status
            code, details = told, f"{details} (the edge said {told.name}; a proxy reset the stream)"
        elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and (details or "").startswith(STREAM_BROKEN):
            # a proxy between us reset the stream (nginx: RST_STREAM when its upstream replica died,
            # HAProxy: END_STREAM with no status): the session is lost, not refused
            code, details = grpc.StatusCode.UNAVAILABLE, f"stream broken on the way to the edge ({details})"
        return cls(code or grpc.StatusCode.UNKNOWN, details or "", trailers.retry_after)


class MessageTooLarge(EdgeError):
    """A message to the edge over the gRPC size limit: the request's fault (a 400), never retried."""

    def __init__(self, size: int | None = None, limit: int | None = None) -> None:
        self.size, self.limit = size, limit
        sizes = f": {size} bytes > limit {limit}" if size is not None and limit is not None else ""
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"prompt too large for one message to the edge{sizes}; use a shorter prompt, "
            "a smaller codec or raise max_message_bytes",
        )

    @property
    def too_large(self) -> bool:
        return True

    @classmethod
    def of(cls, e: EdgeError) -> MessageTooLarge:
        """The client error for a too-large failure (sizes read from grpc's "(N vs. M)" when it gives them)."""
        if isinstance(e, cls):
            return e
        m = re.search(r"\((\d+) vs\. (\d+)\)", e.details or "")
        return cls(int(m[1]), int(m[2])) if m else cls()


@dataclass(frozen=True)
class EdgeAuth:
    """How the device proves itself to the edge: TLS (CA of the edge's certificate, optional client
    certificate for mutual TLS) and an optional bearer token. Empty = plaintext, no token."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    token: str = ""

    @classmethod
    def from_settings(cls, conn: ConnectionSettings) -> EdgeAuth:
        return cls(conn.edge_ca_file, conn.edge_cert_file, conn.edge_key_file, conn.edge_token)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.ca_file:
            return None
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def metadata(self) -> wire.Metadata:
        return wire.bearer_metadata(self.token)


class EdgeStream:
    """One Generate stream = one edge session. send() queues a message; recv() waits for the next reply."""

    def __init__(
        self,
        stub: edge_pb2_grpc.EdgeInferenceStub,
        open_msg: pb.Open,
        timeout: float,
        metadata: tuple = (),
        affinity: str = "",
    ) -> None:
        self._out: queue.Queue[pb.DeviceMessage | None] = queue.Queue()
        self.bytes_up = self.bytes_down = self.messages_up = self.messages_down = 0
        self.replica = ""  # Opened.replica
        self.send(pb.DeviceMessage(open=open_msg))
        # the affinity key (the conversation's, else the session id): session-affine proxies route
        # every stream with it to one replica
        key = affinity or open_msg.session_id
        self._call = stub.Generate(
            iter(self._out.get, None), timeout=timeout, metadata=(*wire.affinity_metadata(key), *metadata)
        )

    def send(self, msg: pb.DeviceMessage) -> None:
        self.bytes_up += msg.ByteSize()
        self.messages_up += 1
        self._out.put(msg)

    def recv(self, expect: str) -> pb.EdgeMessage:
        """The next reply, which must be of kind `expect` (opened / token / done)."""
        try:
            msg = next(self._call)
        except StopIteration:
            raise EdgeError(grpc.StatusCode.UNAVAILABLE, f"stream ended while waiting for {expect}") from None
        except grpc.RpcError as e:
            raise EdgeError.from_rpc(e) from None
        self.bytes_down += msg.ByteSize()
        self.messages_down += 1
        kind = msg.WhichOneof("kind")
        if kind != expect:
            raise EdgeError(grpc.StatusCode.INTERNAL, f"protocol error: expected {expect}, edge sent {kind}")
        return getattr(msg, kind)

    def done_sending(self) -> None:
        """Half-close: the edge answers the rest without more requests (it ends its reply only then)."""
        self._out.put(None)

    def close(self) -> None:
        self.done_sending()
        self._call.cancel()


@dataclass
class Exchange:
    """One timed unary call: what the link estimator learns from."""

    bytes_up: int
    bytes_down: int
    wall: float  # send to reply, s
    edge_seconds: float = 0.0  # time the edge says it spent


class EdgeClient:
    def __init__(
        self,
        address: str,
        connect_timeout: float = 5.0,
        request_timeout: float = 300.0,
        max_message_bytes: int = 16 << 20,
        auth: EdgeAuth = EdgeAuth(),
    ) -> None:
        self.address = address
        self._metadata = auth.metadata()
        self.connect_timeout, self.request_timeout = connect_timeout, request_timeout
        opts = wire.channel_options(max_message_bytes)
        creds = auth.credentials()
        self._channel = (
            grpc.secure_channel(address, creds, options=opts) if creds else grpc.insecure_channel(address, options=opts)
        )
        self._stub = edge_pb2_grpc.EdgeInferenceStub(self._channel)
        self._describe: pb.DescribeResponse | None = None
        self._lock = threading.Lock()

    def describe(self, refresh: bool = False, timeout: float | None = None) -> pb.DescribeResponse:
        with self._lock:
            if self._describe is None or refresh:
                try:
                    self._describe = self._stub.Describe(
                        pb.DescribeRequest(),
                        timeout=timeout or self.connect_timeout,
                        wait_for_ready=True,
                        metadata=self._metadata,
                    )
                except grpc.RpcError as e:
                    raise EdgeError.from_rpc(e) from None
            return self._describe

    def describe_timed(
        self, include_profile: bool = False, timeout: float | None = None
    ) -> tuple[pb.DescribeResponse, Exchange]:
        """A fresh Describe (load, and the cost profile when asked), timed for the link estimator."""
        req = pb.DescribeRequest(include_profile=include_profile)
        t0 = time.perf_counter()
        try:
            reply = self._stub.Describe(req, timeout=timeout or self.connect_timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise EdgeError.from_rpc(e) from None
        wall = time.perf_counter() - t0
        with self._lock:
            self._describe = reply
        return reply, Exchange(req.ByteSize(), reply.ByteSize(), wall)

    def probe(self, bytes_up: int, bytes_down: int, timeout: float | None = None) -> Exchange:
        """Echo `bytes_up` bytes up and `bytes_down` back: an active link measurement."""
        req = pb.ProbeRequest(payload=bytes(bytes_up), reply_bytes=bytes_down)
        t0 = time.perf_counter()
        try:
            reply = self._stub.Probe(req, timeout=timeout or self.request_timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise EdgeError.from_rpc(e) from None
        return Exchange(req.ByteSize(), reply.ByteSize(), time.perf_counter() - t0, reply.edge_seconds)

    def open(self, open_msg: pb.Open, affinity: str = "") -> tuple[EdgeStream, pb.Opened]:
        """Wait (up to connect_timeout) for the channel, open a session, read Opened."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout)
        except grpc.FutureTimeoutError:
            raise EdgeError(
                grpc.StatusCode.UNAVAILABLE, f"edge {self.address} not reachable within {self.connect_timeout:.1f} s"
            ) from None
        stream = EdgeStream(self._stub, open_msg, self.request_timeout, self._metadata, affinity)
        try:
            return stream, stream.recv("opened")
        except EdgeError:
            stream.close()
            raise

    def close(self) -> None:
        self._channel.close()
