"""Watching the edge: gRPC health Check, Describe and RSS polled in a thread, and its /metrics and
/v1/sessions read over the ops port."""

from __future__ import annotations

import re
import threading
import time
from itertools import pairwise

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coinfer.v1 import edge_pb2 as pb
from coinfer.v1 import edge_pb2_grpc
from hostile.common import bearer_md, pct, rss_mib


def edge_outcomes(ops: str, headers: dict[str, str]) -> dict[str, float]:
    """Session outcomes and deadline-ended streams from the edge's /metrics."""
    try:
        text = httpx.get(ops + "/metrics", headers=headers, timeout=10).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r'coinfer_sessions_total\{outcome="([^"]+)"\} (\S+)', line)
        if m:
            out[m.group(1)] = float(m.group(2))
        elif line.startswith("coinfer_streams_ended_total "):
            out["streams_ended_by_deadline"] = float(line.split()[1])
    return out


def wait_sessions_freed(ops: str, headers: dict[str, str], seconds: float = 20) -> None:
    """Until the edge holds no session (its /v1/sessions is empty), at most `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if not httpx.get(ops + "/v1/sessions", headers=headers, timeout=5).json()["sessions"]:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)


class Watch(threading.Thread):
    """Every `period` s until stopped (bounded by `max_seconds`): gRPC health Check and Describe
    (latency or failure), the sessions the edge holds, and the edge's RSS."""

    def __init__(
        self, addr: str, pid: int, t0: float, token: str | None, period: float = 0.1, max_seconds: float = 900
    ) -> None:
        super().__init__(name="watch", daemon=True)
        self.addr, self.pid, self.t0, self.period, self.max_seconds = addr, pid, t0, period, max_seconds
        self.metadata = bearer_md(token)  # health Check needs none; Describe does when the edge has tokens
        self.samples: list[dict] = []  # t, health_s, describe_s (None = failed), sessions, rss
        self.failures: list[dict] = []
        self._halt = threading.Event()

    def run(self) -> None:
        end = time.monotonic() + self.max_seconds
        with grpc.insecure_channel(self.addr) as ch:
            health, edge = health_pb2_grpc.HealthStub(ch), edge_pb2_grpc.EdgeInferenceStub(ch)
            while not self._halt.is_set() and time.monotonic() < end:
                t = time.monotonic()
                self.samples.append(self._poll(health, edge, t))
                self._halt.wait(max(0.0, self.period - (time.monotonic() - t)))

    def _poll(self, health, edge, t: float) -> dict:
        """One sample: health Check, then Describe, each timed or recorded as a failure."""
        sample = {
            "t": t - self.t0,
            "health_s": None,
            "describe_s": None,
            "sessions": None,
            "rss_mib": rss_mib(self.pid),
        }
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                sample["health_s"] = time.monotonic() - t
            else:
                self.failures.append({"t": sample["t"], "call": "health", "error": f"status {reply.status}"})
        except grpc.RpcError as e:
            self.failures.append({"t": sample["t"], "call": "health", "error": e.code().name})
        t1 = time.monotonic()
        try:
            d = edge.Describe(pb.DescribeRequest(), timeout=5, metadata=self.metadata)
            sample["describe_s"], sample["sessions"] = time.monotonic() - t1, d.load.active_sessions
        except grpc.RpcError as e:
            self.failures.append({"t": sample["t"], "call": "describe", "error": e.code().name})
        return sample

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=15)

    def span(self, a: float, b: float) -> dict:
        """Health / Describe latency and failures between a and b (seconds since t0)."""
        ss = [s for s in self.samples if a <= s["t"] <= b]
        hs = [s["health_s"] for s in ss if s["health_s"] is not None]
        ds = [s["describe_s"] for s in ss if s["describe_s"] is not None]
        fails = [f for f in self.failures if a <= f["t"] <= b]
        gaps = [y["t"] - x["t"] for x, y in pairwise(ss)]  # a slow answer shows as a gap too
        return {
            "polls": len(ss),
            "failures": len(fails),
            "failure_examples": fails[:5],
            "health_max_ms": 1000 * max(hs, default=float("nan")),
            "health_p99_ms": 1000 * pct(hs, 99),
            "describe_max_ms": 1000 * max(ds, default=float("nan")),
            "describe_p99_ms": 1000 * pct(ds, 99),
            "longest_poll_gap_ms": 1000 * max(gaps, default=float("nan")),
        }
