"""Attacks on real edge and agent processes: a hostile device (or anyone behind the same proxy, who
shares its identity) against an honest one. Each test asserts the defence and that the honest
session's output is what it would have been on a quiet edge."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch

from coinfer import codec
from coinfer.model import load_slice
from coinfer.model.weights import read_fingerprint
from coinfer.tools.launcher import start_edge
from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc

PROMPT = [11, 40, 7, 23, 5, 88, 64, 3, 19, 42, 17, 9, 30, 31, 2, 6, 8, 77, 12, 13]


@pytest.fixture(scope="module")
def edge(tiny_dir):
    """One real edge process on the tiny model, with short deadlines so the tests can wait them out."""
    proc = start_edge(
        tiny_dir,
        args=[
            "--profile",
            "false",
            "--first-message-seconds",
            "1",
            "--stream-idle-seconds",
            "1.5",
            "--max-streams",
            "6",
            "--workers",
            "10",
            "--max-probe-bytes",
            "65536",
            "--torch-threads",
            "1",
        ],
    )
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def fp(tiny_dir) -> str:
    return read_fingerprint(tiny_dir)


@pytest.fixture
def channel(edge) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(edge.ready["grpc"]) as ch:
        yield ch


def open_(fp: str, split: int = 0, max_new: int = 6, session_id: str = "victim", **kw) -> pb.DeviceMessage:
    return pb.DeviceMessage(
        open=pb.Open(session_id=session_id, fingerprint=fp, split=split, codec="f32", max_new_tokens=max_new, **kw)
    )


def prefill_ids(ids: list[int], **kw) -> pb.DeviceMessage:
    return pb.DeviceMessage(prefill=pb.Prefill(token_ids=ids, **kw))


def head_rows(model_dir: Path, ids: list[int], k: int, start: int = 0) -> bytes:
    """The f32 frame of the head's hidden states for ids[start:] (computed over all of ids)."""
    head = load_slice(model_dir, 0, k, embed=True, head=False)
    with torch.inference_mode():
        return codec.encode(head(torch.tensor([ids]))[0][start:], "f32")


class Live:
    """A bidi Generate stream driven message by message (a device that can pause)."""

    def __init__(self, ch: grpc.Channel, first: pb.DeviceMessage, timeout: float = 30) -> None:
        self._out: queue.Queue = queue.Queue()
        self._out.put(first)
        self.call = edge_pb2_grpc.EdgeInferenceStub(ch).Generate(iter(self._out.get, None), timeout=timeout)

    def send(self, msg: pb.DeviceMessage | None) -> None:
        self._out.put(msg)

    def recv(self) -> pb.EdgeMessage:
        return next(self.call)

    def rest(self) -> list[pb.EdgeMessage]:
        self._out.put(None)
        return list(self.call)


def tokens(replies: list[pb.EdgeMessage]) -> list[int]:
    return [r.token.id for r in replies if r.WhichOneof("kind") == "token"]


def ops(edge, path: str) -> httpx.Response:
    return httpx.get(edge.ready["ops"] + path, timeout=10)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def in_thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t
