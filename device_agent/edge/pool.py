"""Several edge endpoints behind the one-edge interface (EdgeClient's): one serves, the rest stand by.

The active edge is the one with the lowest measured Describe round trip plus reported queue
wait among those not marked down. When the active edge fails (connection lost, restart,
drain: UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED), `failover` marks it down for
`down_seconds` (a full edge: for its retry hint, at most that) and ranks the others; the
device replays the session there (session_runner.py). When no other edge answers, the active edge
stays and failover says so: the caller then waits or gives up (retry_policy), never spins.
`generation` counts changes of the active edge, so the planner knows to fetch the new
edge's cost profile. A one-address pool behaves exactly like its EdgeClient.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from coinfer.config_values import split_list
from coinfer.v1 import edge_pb2 as pb
from device_agent.config import ConnectionSettings
from device_agent.edge.client import EdgeAuth, EdgeClient, EdgeError, EdgeStream, Exchange
from device_agent.edge.retry_policy import FAILOVER

log = logging.getLogger("coinfer.device")


class EdgePool:
    def __init__(
        self,
        addresses: list[str],
        connect_timeout: float = 5.0,
        request_timeout: float = 300.0,
        max_message_bytes: int = 16 << 20,
        down_seconds: float = 10.0,
        auth: EdgeAuth | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("an edge pool needs at least one address")
        self.clients = [
            EdgeClient(a, connect_timeout, request_timeout, max_message_bytes, auth if auth is not None else EdgeAuth())
            for a in addresses
        ]
        self.down_seconds = down_seconds
        self._down_until = [0.0] * len(self.clients)
        self._active = 0
        self.generation = 0  # bumped whenever another edge becomes active
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, conn: ConnectionSettings) -> EdgePool:
        """The pool of the edges the connection settings name (one address or several), with their
        TLS and token."""
        return cls(
            split_list(conn.edge),
            conn.connect_timeout_seconds,
            conn.request_timeout_seconds,
            conn.max_message_bytes,
            auth=EdgeAuth.from_settings(conn),
        )

    # -- the EdgeClient interface --------------------------------------------------------------
    @property
    def active(self) -> EdgeClient:
        return self.clients[self._active]

    @property
    def address(self) -> str:
        return self.active.address

    def describe(self, refresh: bool = False, timeout: float | None = None) -> pb.DescribeResponse:
        return self.active.describe(refresh, timeout)

    def describe_timed(
        self, include_profile: bool = False, timeout: float | None = None
    ) -> tuple[pb.DescribeResponse, Exchange]:
        return self.active.describe_timed(include_profile, timeout)

    def probe(self, bytes_up: int, bytes_down: int, timeout: float | None = None) -> Exchange:
        return self.active.probe(bytes_up, bytes_down, timeout)

    def open(self, open_msg: pb.Open, affinity: str = "") -> tuple[EdgeStream, pb.Opened]:
        """Open on the active edge; an edge that is down or draining hands over to the next one."""
        tried = set()
        while True:
            client = self.active
            tried.add(client.address)
            try:
                return client.open(open_msg, affinity)
            except EdgeError as e:
                if e.code not in FAILOVER or not self.failover(client, e) or self.active.address in tried:
                    raise

    def close(self) -> None:
        for c in self.clients:
            c.close()

    # -- choosing -------------------------------------------------------------------------------
    def failover(self, failed: EdgeClient | None = None, why: Exception | str = "") -> bool:
        """Mark `failed` (default: the active edge) down and make the best other edge active.
        False when there is no other edge to go to."""
        if len(self.clients) == 1:
            return False
        down = self.down_seconds
        full = isinstance(why, EdgeError) and why.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        if full and isinstance(why, EdgeError) and why.retry_after is not None:
            down = min(down, why.retry_after)  # a full edge has room again after its hint
        with self._lock:
            i = self.clients.index(failed) if failed is not None else self._active
            self._down_until[i] = time.monotonic() + down
        log.warning("edge %s failed (%s); failing over", self.clients[i].address, why)
        if self.rank(exclude=i):
            return True
        log.warning("no other edge answered; %s stays active", self.address)
        return False

    def rank(self, exclude: int | None = None, timeout: float = 1.0) -> bool:
        """Measure every edge not marked down (Describe: round trip + queue) and activate the best.
        False when none answered (the active edge stays as it was)."""
        now = time.monotonic()
        scores: dict[int, float] = {}
        for i, c in enumerate(self.clients):
            if i == exclude or self._down_until[i] > now:
                continue
            try:
                reply, ex = c.describe_timed(timeout=timeout)
            except EdgeError:
                self._down_until[i] = now + self.down_seconds
                continue
            scores[i] = ex.wall + reply.load.queue_seconds
        if not scores:
            return False
        best = min(scores, key=scores.__getitem__)
        with self._lock:
            if best != self._active:
                self._active, self.generation = best, self.generation + 1
                log.info("edge %s is now active (Describe %.1f ms)", self.clients[best].address, 1e3 * scores[best])
        return True
