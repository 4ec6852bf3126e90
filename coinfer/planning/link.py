"""Link estimation: uplink / downlink bandwidth and RTT learned from every real transfer.

A transfer is (bytes up, bytes down, wall seconds from send to reply, seconds the edge says
it spent). What is left after the edge's time is `RTT + up / up_bw + down / down_bw`: a
line in the bytes. Small exchanges (decode steps, polls) pin its intercept, the RTT; large
ones (prefills, probes: tens of KB) pin its slope, one over the bandwidth. Both are weighted
means over recent transfers, older ones weighing less (a factor `forget` per newer sample),
so the estimate follows a link that changes.

Change detection: a reply far off the prediction (a factor `jump`) is a surprise. A large
transfer (mostly bytes) is believed at once and ages the older samples hard, so a drop
from 20 Mbit/s to 256 kbit/s shows in the very next plan; a small one (mostly RTT) must be
confirmed by the next sample, else it was a hiccup (a scheduling pause) and is dropped.

`probe_plan` sizes active probes (the edge's `Probe` echo) when estimates are missing or stale.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from coinfer.planning.partitioner import LinkEstimate

MIN_SERIALIZATION = 0.002  # s: a transfer whose bytes took less than this says nothing about bandwidth
LARGE_DOWN = 4 << 10  # smaller replies do not move the downlink estimate
LARGE_BYTES = 16 << 10  # a transfer this big is about bandwidth whatever the estimate says
MIN_SURPRISE = 0.005  # s: smaller misses are jitter, whatever the ratio


@dataclass
class _Line:
    """y = intercept + slope * x over weighted recent samples (x bytes, y seconds).

    Two steps, because the sizes come in two clusters: the intercept (RTT) is the weighted mean
    of `y - x * slope` over the small transfers (< 16 KB), and the slope (seconds per byte) is
    fitted through that intercept over the ones the bytes dominate. A least
    squares line through both clusters would instead set the RTT by extrapolating back from
    100 KB prefills, turning a 1% error in the slope into tens of ms."""

    intercept: float
    slope: float  # seconds per byte
    forget: float
    samples: deque = field(default_factory=lambda: deque(maxlen=256))  # [x, y, weight]
    count: int = 0
    updated: float = 0.0  # when a sample last arrived (0 = prior only)

    def add(self, x: float, y: float, fixed_intercept: float | None = None) -> None:
        for s in self.samples:
            s[2] *= self.forget
        self.samples.append([x, y, 1.0])
        self.count += 1
        self._fit(fixed_intercept)

    def age(self, factor: float) -> None:
        for s in self.samples:
            s[2] *= factor

    def large(self, x: float, y: float) -> bool:
        return x >= LARGE_BYTES or x * self.slope > 0.5 * y

    def _rtt(self) -> float:
        small = [s for s in self.samples if s[0] < LARGE_BYTES]  # their bytes at the fitted rate come off
        w = sum(s[2] for s in small)
        return sum(s[2] * (s[1] - s[0] * self.slope) for s in small) / w if w > 1e-9 else self.intercept

    def _fit(self, fixed_intercept: float | None) -> None:
        rtt = self._rtt() if fixed_intercept is None else fixed_intercept
        big = [s for s in self.samples if self.large(s[0], s[1]) and s[1] - rtt > MIN_SERIALIZATION]
        sxx = sum(s[2] * s[0] ** 2 for s in big)
        if sxx > 0:
            self.slope = sum(s[2] * s[0] * (s[1] - rtt) for s in big) / sxx
        if fixed_intercept is None:
            self.intercept = max(self._rtt(), 1e-5)


class LinkEstimator:
    """Thread-safe; fed by every session and probe, read by the planner."""

    def __init__(
        self,
        up_bytes_per_second: float = 125e3,
        down_bytes_per_second: float = 125e3,
        rtt_seconds: float = 0.02,
        forget: float = 0.9,
        jump: float = 2.0,
    ) -> None:
        self._up = _Line(rtt_seconds, 1 / up_bytes_per_second, forget)
        self._down = _Line(rtt_seconds, 1 / down_bytes_per_second, forget)
        self.jump = jump
        self.changes = 0
        self._pending: tuple | None = None  # a small surprising sample waiting for confirmation
        self._bw_updated = 0.0
        self._lock = threading.Lock()

    def estimate(self) -> LinkEstimate:
        with self._lock:
            return LinkEstimate(1 / self._up.slope, 1 / self._down.slope, self._up.intercept)

    def observe(
        self, bytes_up: float, bytes_down: float, wall: float, edge_seconds: float = 0.0, now: float | None = None
    ) -> None:
        """One request/reply exchange (wall seconds, of which the edge spent edge_seconds)."""
        now = time.monotonic() if now is None else now
        residual = max(wall - edge_seconds, 1e-5)
        with self._lock:
            # only a real download teaches the downlink; small replies (tokens, Describe) are RTT samples
            up_dominant = bytes_down < LARGE_DOWN or bytes_up * self._up.slope >= bytes_down * self._down.slope
            line, other = (self._up, self._down) if up_dominant else (self._down, self._up)
            x, ox = (bytes_up, bytes_down) if up_dominant else (bytes_down, bytes_up)
            y = residual - ox * other.slope
            predicted = self._up.intercept + x * line.slope
            large = line.large(x, predicted)  # by what the estimate expects, not by what came
            surprise = (
                self._up.count > 0
                and max(y / predicted, predicted / max(y, 1e-6)) >= self.jump
                and abs(y - predicted) >= MIN_SURPRISE
            )  # the first sample replaces the prior, no surprise
            if surprise:
                if not large and self._pending is None:
                    self._pending = (up_dominant, x, y)  # maybe a hiccup: wait for the next sample
                    return
                self.changes += 1
                line.age(0.1)
                if self._pending is not None and self._pending[0] == up_dominant:
                    line.samples.append([self._pending[1], self._pending[2], 1.0])
            self._pending = None
            line.add(x, y, None if up_dominant else self._up.intercept)
            line.updated = now
            if large:
                self._bw_updated = now

    def stale(self, max_age: float, now: float | None = None) -> bool:
        """True when the link was never measured, or no transfer taught it for max_age seconds."""
        now = time.monotonic() if now is None else now
        return (
            self._bw_updated == 0.0
            or now - max(self._up.updated, self._down.updated) > max_age
            or now - self._bw_updated > 10 * max_age
        )

    def snapshot(self) -> dict:
        e = self.estimate()
        return {
            "up_bytes_per_second": e.up_bytes_per_second,
            "down_bytes_per_second": e.down_bytes_per_second,
            "rtt_seconds": e.rtt_seconds,
            "samples": {"up": self._up.count, "down": self._down.count},
            "changes": self.changes,
        }


def probe_plan(
    estimate: LinkEstimate, target_seconds: float = 0.15, lo: int = 2048, hi: int = 256 << 10
) -> list[tuple[int, int]]:
    """(bytes up, bytes down) of the probes to send: one tiny (RTT), one per direction sized to
    take about `target_seconds` at the current estimate, so a slow link is not flooded."""

    def size(bw: float) -> int:
        return int(min(hi, max(lo, bw * target_seconds)))

    return [(16, 16), (size(estimate.up_bytes_per_second), 16), (16, size(estimate.down_bytes_per_second))]
