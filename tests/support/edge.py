"""An in-process edge server on port 0 and raw gRPC sessions against it (component, integration and
hostile tests)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc

from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc


@contextmanager
def edge_server(model_dir: Path, **overrides) -> Iterator[EdgeServer]:  # noqa: F821
    from edge_server.config import EdgeSettings
    from edge_server.server import EdgeServer

    server = EdgeServer(EdgeSettings(model_dir=str(model_dir), grpc_port=0, ops_port=0, **overrides))
    server.start()
    try:
        yield server
    finally:
        server.stop(0)


def address(server) -> str:
    return f"127.0.0.1:{server.grpc_port}"


@contextmanager
def stub(addr: str) -> Iterator[edge_pb2_grpc.EdgeInferenceStub]:
    with grpc.insecure_channel(addr) as channel:
        yield edge_pb2_grpc.EdgeInferenceStub(channel)


def open_msg(fingerprint: str, split: int, codec_name: str = "f32", max_new: int = 8, **kw) -> pb.DeviceMessage:
    return pb.DeviceMessage(
        open=pb.Open(
            session_id=kw.pop("session_id", "s-test"),
            fingerprint=fingerprint,
            split=split,
            codec=codec_name,
            max_new_tokens=max_new,
            **kw,
        )
    )


def session(s: edge_pb2_grpc.EdgeInferenceStub, messages: list[pb.DeviceMessage], timeout: float = 30) -> list:
    """Send all messages, read all replies (raises grpc.RpcError on a status)."""
    return list(s.Generate(iter(messages), timeout=timeout))


def wait_sessions(srv, n: int, timeout: float = 5.0) -> bool:
    """Wait until an edge server holds n live sessions. A device returns on Done and a raw client on
    its last reply; the edge releases the session a moment later (after the device's half-close)."""
    deadline = time.monotonic() + timeout
    while len(srv.service.sessions) != n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def hold_session(addr: str, fp: str, release: threading.Event) -> None:
    """Open one session and keep it open (no Prefill) until `release` (run it in a thread)."""

    def messages():
        yield open_msg(fp, 0, session_id="holder")
        release.wait(30)

    with stub(addr) as s:
        try:
            for _ in s.Generate(messages(), timeout=30):
                pass
        except grpc.RpcError:
            pass
